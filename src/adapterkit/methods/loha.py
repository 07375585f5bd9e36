"""LoHa (Hyeon-Woo et al., 2022, "FedPara"; PEFT's `LoHaConfig`): a Hadamard product of two low-rank matrices.

    ΔW = s · (W1a W1b) ⊙ (W2a W2b)            s = alpha / r; W1a, W2a (out, r); W1b, W2b (r, in)

On nn.Conv2d, `in` is in_channels/groups · kh · kw (ΔW reshaped to the kernel), or with use_effective_conv2d and a
kernel larger than 1x1 each factor is a Tucker product: T (r, r, kh, kw) · W_a (r, out) · W_b (r, in/groups).
PEFT's tensor names: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (+ hada_t1, hada_t2). Default init: W2b = 0, the rest
kaiming-uniform(a=sqrt(5)), so ΔW starts at zero.

A linear layer's forward need not form ΔW: (A1B1) ⊙ (A2B2) = (A1 ⊙ᵣ A2)(B1 ⊙ᶜ B2) with the row-wise Kronecker product
A (out, r²) and the column-wise one B (r², in), a rank-r² product applied like LoRA when that is cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .lycoris import LycorisConfig, LycorisLayer, LycorisRecord, by_module, kaiming_, product_bound, summary_rows
from .summary import module_norms


@dataclass
class LoHaConfig(LycorisConfig):
    """PEFT's LoHaConfig: r, alpha, rank_dropout, module_dropout, use_effective_conv2d, init_weights, patterns."""

    peft_type: str = "LOHA"

    PEFT_TYPE: ClassVar[str] = "LOHA"


class LoHaLayer(LycorisLayer):
    """LoHa around nn.Linear or nn.Conv2d. Layout per adapter: "cp" (Tucker cores, effective conv) or "flat"."""

    method = "LOHA"
    containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def _create(self, r: int, cfg: LycorisConfig, factory: dict) -> tuple[dict[str, torch.Tensor], Any]:
        out, *rest = self.weight_shape
        if self.kind == "conv2d" and cfg.use_effective_conv2d and tuple(rest[1:]) != (1, 1):
            in_g, kh, kw = rest
            core = (r, r, kh, kw)
            shapes = {"hada_w1_a": (r, out), "hada_w1_b": (r, in_g), "hada_t1": core,
                      "hada_w2_a": (r, out), "hada_w2_b": (r, in_g), "hada_t2": core}
            layout = "cp"
        else:
            cols = 1
            for size in rest:
                cols *= size  # in, or in/groups · kh · kw for a conv kernel
            shapes = {"hada_w1_a": (out, r), "hada_w1_b": (r, cols), "hada_w2_a": (out, r), "hada_w2_b": (r, cols)}
            layout = "flat"
        return {k: torch.empty(s, **factory) for k, s in shapes.items()}, layout

    def _init(self, tensors: dict[str, torch.Tensor], layout: Any, init: Any) -> None:
        for key, t in tensors.items():
            if key == "hada_w2_b" and init is True:
                t.zero_()  # one zero factor makes ΔW zero
            else:
                kaiming_(t)

    def _rescales(self, cfg: LycorisConfig) -> bool:
        return True  # PEFT always rescales LoHa's rank dropout

    def _prefers_structured(self, r: int, layout: Any) -> bool:
        # Per token: r²·(in + out) multiply-adds through the rank-r² product vs in·out through a formed ΔW.
        return layout == "flat" and r * r * (self.in_features + self.out_features) <= self.in_features * self.out_features

    def _weight(self, t: dict[str, torch.Tensor], rec: LycorisRecord) -> torch.Tensor:
        if rec.layout == "cp":
            # (r, r, kh, kw) core, (r, in) and (r, out) modes -> (out, in, kh, kw)
            w1 = torch.einsum("ijkl,jq,ip->pqkl", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            w2 = torch.einsum("ijkl,jq,ip->pqkl", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            return w1 * w2
        w = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])  # (out, cols)
        return w.reshape(self.weight_shape)

    def _structured_out(self, h: torch.Tensor, t: dict[str, torch.Tensor], rec: LycorisRecord) -> torch.Tensor:
        r = rec.r
        w1a, w2a, w1b, w2b = t["hada_w1_a"], t["hada_w2_a"], t["hada_w1_b"], t["hada_w2_b"]
        a = (w1a[:, :, None] * w2a[:, None, :]).reshape(self.out_features, r * r)  # (out, r²): a[o, ir+j] = w1a w2a
        b = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, self.in_features)  # (r², in): b[ir+j, n] = w1b w2b
        return F.linear(F.linear(h, b), a)  # (..., in) -> (..., r²) -> (..., out)

    def _bound(self, t: dict[str, torch.Tensor], rec: LycorisRecord) -> float:
        if rec.layout == "cp":
            return float("inf")  # small conv kernels: checked exactly
        # |(P ⊙ Q)_ij| = |P_ij| |Q_ij|, each bounded by row-norm × column-norm of its factors
        return product_bound(t["hada_w1_a"], t["hada_w1_b"]) * product_bound(t["hada_w2_a"], t["hada_w2_b"])


def summary(cfg: LoHaConfig, tensors: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """`adapterkit inspect` rows: hyperparameters and ||ΔW||_F per module, from the file's tensors alone."""

    def norm_of(path: str, t: dict[str, torch.Tensor]) -> float:
        t = {k: v.double() for k, v in t.items()}  # a missing factor is a KeyError: reported, not skipped
        if "hada_t1" in t:  # conv kernels are small: form ΔW
            w1 = torch.einsum("ijkl,jq,ip->pqkl", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            w2 = torch.einsum("ijkl,jq,ip->pqkl", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            norm = float((w1 * w2).norm())
        else:  # ||A B||² = trace((AᵀA)(BBᵀ)) with the rank-r² factors of the module docstring: r²×r² products only
            r = t["hada_w1_a"].shape[1]
            a = (t["hada_w1_a"][:, :, None] * t["hada_w2_a"][:, None, :]).reshape(-1, r * r)
            b = (t["hada_w1_b"][:, None, :] * t["hada_w2_b"][None, :, :]).reshape(r * r, -1)
            norm = float(torch.trace((a.T @ a) @ (b @ b.T)).clamp_min(0).sqrt())
        return abs(cfg.scaling_for(path)) * norm

    norms, problems = module_norms(by_module(tensors, "hada_"), norm_of)
    return summary_rows(cfg, norms, problems=problems)
