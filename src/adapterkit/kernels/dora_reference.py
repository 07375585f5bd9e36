"""Plain, obviously-correct DoRA: PEFT's formulas composed from ordinary ops, materialising B @ A.

The kernels in `dora.py` are tested against these functions; they are never on a hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_out_in(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.t() if fan_in_fan_out else weight  # (out, in)


def dora_weight_norm_reference(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """||W_lin + s·B A||₂ over the `in` axis, (out,), float32, detached — the full (out, in) matrix is formed.

    weight (out, in), or (in, out) / the (V, D) embedding table with `fan_in_fan_out`; lora_a (r, in); lora_b (out, r).
    """
    w = _as_out_in(weight.detach(), fan_in_fan_out).float()
    full = w + scaling * (lora_b.detach().float() @ lora_a.detach().float())  # (out, in)
    return torch.linalg.vector_norm(full, dim=1)


def dora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,
    *,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """PEFT's DoRA linear, term by term: base(x) + (c-1) ⊙ (x_d W_linᵀ) + c ⊙ s·(x_d Aᵀ) Bᵀ, c = m / n, n detached.

    Without active dropout x_d = x, and PEFT reuses base(x) minus the bias for x W_linᵀ — the same value.
    dropout_mask: optional boolean keep-mask of x's shape replacing the random draw (kept elements scaled 1/(1-p)).
    Computed in x's dtype except n (float32, then cast).
    """
    w_lin = _as_out_in(weight, fan_in_fan_out).to(x.dtype)
    norm = dora_weight_norm_reference(weight, lora_a, lora_b, scaling, fan_in_fan_out)
    c = (magnitude.to(torch.float32) / norm).to(x.dtype)  # (out,), gradient reaches m only
    base = F.linear(x, w_lin, bias)
    active = training and dropout_p > 0.0
    if not active:
        xd = x
    elif dropout_mask is not None:
        xd = x * dropout_mask.to(x.dtype) * (1.0 / (1.0 - dropout_p))
    else:
        xd = F.dropout(x, dropout_p, True)
    base_d = F.linear(xd, w_lin)  # no bias
    lora = F.linear(F.linear(xd, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return base + (c - 1) * base_d + c * lora * scaling


def dora_embedding_reference(
    ids: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """c ⊙ (weight[ids] + s·(Aᵀ)[ids] Bᵀ), n over the vocabulary axis.

    weight (V, D), lora_a (r, V), lora_b (D, r), magnitude (D,).
    """
    norm = dora_weight_norm_reference(weight, lora_a, lora_b, scaling, True)  # (D,)
    c = magnitude / norm
    return c * F.embedding(ids, weight) + c * (F.embedding(ids, lora_a.t()) @ lora_b.t()) * scaling


def dora_merge_reference(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """c ⊙ (W + s·B A) in float32, in weight's stored layout."""
    delta = scaling * (lora_b.detach().float() @ lora_a.detach().float())  # (out, in)
    full = _as_out_in(weight.detach(), fan_in_fan_out).float() + delta
    c = magnitude.detach().float() / torch.linalg.vector_norm(full, dim=1)
    merged = c.view(-1, 1) * full  # (out, in)
    return merged.t() if fan_in_fan_out else merged
