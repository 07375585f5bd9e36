"""Plain, obviously-correct LoRA linear: the composition of F.linear and F.dropout that PEFT computes.

The fused path in `lora_linear.py` is tested against this function; it is never on a hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x Wᵀ + bias + scaling · (dropout(x) Aᵀ) Bᵀ, each step a separate op, in the inputs' dtypes.

    Args:
        x: (..., in) input.
        weight: (out, in) base weight; bias: (out,) or None.
        lora_a: (r, in), lora_b: (out, r) — the nn.Linear weights of lora_A / lora_B.
        scaling: lora_alpha / r (or alpha / sqrt(r) for rsLoRA).
        dropout_p, training: dropout on the adapter's input only, as in PEFT.
        dropout_mask: optional boolean keep-mask of x's shape; when given it replaces the random draw, so a fused
            kernel's own mask can be checked against this reference (kept elements are scaled by 1 / (1 - p)).
    """
    base = F.linear(x, weight, bias)
    if dropout_mask is not None:
        xd = x * dropout_mask.to(x.dtype) * (1.0 / (1.0 - dropout_p))
    else:
        xd = F.dropout(x, dropout_p, training)
    return base + F.linear(F.linear(xd, lora_a), lora_b) * scaling
