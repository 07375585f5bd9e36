"""LoKr (Yeh et al., 2023, "LyCORIS"; PEFT's `LoKrConfig`): a Kronecker product of a small and a larger matrix.

    ΔW = s · W1 ⊗ W2        s = alpha / r; W1 (a, c), W2 (b, d) with out = a·b, in = c·d

(a, b) and (c, d) split out and in by `factorization` (near the square root, or `decompose_factor`). Each of W1, W2
is a full matrix, or a rank-r product when r is under half its larger side: W2 = W2a (b, r) · W2b (r, d) (W1 too only
with decompose_both). On nn.Conv2d, in = in_channels/groups and W2 carries the kernel: (b, d, kh, kw) in full, or
W2a (b, r) · W2b (r, d·kh·kw), or with use_effective_conv2d a Tucker product T (r, r, kh, kw) · W2a (r, b) · W2b (r, d).
PEFT's tensor names: lokr_w1 | lokr_w1_a, lokr_w1_b; lokr_w2 | lokr_w2_a, lokr_w2_b (+ lokr_t2).
Init: W1 (or W1a) zero, the rest kaiming-uniform(a=sqrt(5)); "lycoris": W2 (or W2b) zero instead.

A linear layer's forward need not form ΔW: (W1 ⊗ W2) x = vec(W1 · X · W2ᵀ) with X = x viewed as (c, d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from .lycoris import LycorisConfig, LycorisLayer, LycorisRecord, by_module, kaiming_, product_bound, summary_rows
from .summary import module_norms


@dataclass
class LoKrConfig(LycorisConfig):
    """PEFT's LoKrConfig: LoHa's fields plus decompose_both, decompose_factor, rank_dropout_scale, init "lycoris"."""

    decompose_both: bool = False  # also factor W1 as W1a·W1b (when r is under half its larger side)
    decompose_factor: int = -1  # split sizes as (factor, size/factor) when it divides; -1: near the square root
    rank_dropout_scale: bool = False  # divide kept rows by the kept fraction under rank_dropout
    init_weights: bool | str = True  # True: W1 = 0; "lycoris": W2 = 0; False: random non-zero
    peft_type: str = "LOKR"

    PEFT_TYPE: ClassVar[str] = "LOKR"
    INIT_CHOICES: ClassVar[tuple[Any, ...]] = (True, False, "lycoris")
    FIELD_TYPES: ClassVar[dict[str, str]] = {
        **LycorisConfig.FIELD_TYPES,
        "decompose_both": "bool",
        "decompose_factor": "int",
        "rank_dropout_scale": "bool",
    }


def factorization(size: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of `size` into two factors: (factor, size/factor) when `factor` divides it; otherwise (m, n) with
    m <= n, m the divisor reached when stepping up the divisors to the square root, without exceeding `factor`."""
    if factor > 0 and size % factor == 0:
        return factor, size // factor
    limit = size if factor == -1 else factor
    m = 1
    candidate = 1
    while m < size // m:  # below the square root: step to the next divisor
        candidate += 1
        while size % candidate:
            candidate += 1
        if candidate > limit:
            break
        m = candidate
    n = size // m
    return (m, n) if m <= n else (n, m)


class Layout(NamedTuple):
    """Which LoKr tensors one adapter has on one layer, and the Kronecker split of its sizes."""

    a: int  # W1 rows (out = a·b)
    b: int
    c: int  # W1 columns (in = c·d)
    d: int
    full_w1: bool
    full_w2: bool
    cp: bool  # W2 from a Tucker core (effective conv)


class LoKrLayer(LycorisLayer):
    """LoKr around nn.Linear or nn.Conv2d."""

    method = "LOKR"
    containers = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def _create(self, r: int, cfg: LycorisConfig, factory: dict) -> tuple[dict[str, torch.Tensor], Any]:
        out, in_g, *kernel = self.weight_shape
        c, d = factorization(in_g, cfg.decompose_factor)
        a, b = factorization(out, cfg.decompose_factor)
        full_w1 = not (cfg.decompose_both and r < max(a, c) / 2)
        full_w2 = not (r < max(b, d) / 2)
        cp = bool(kernel) and cfg.use_effective_conv2d and tuple(kernel) != (1, 1) and not full_w2
        shapes: dict[str, tuple[int, ...]] = {}
        if full_w1:
            shapes["lokr_w1"] = (a, c)
        else:
            shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, r), (r, c)
        k = 1
        for size in kernel:
            k *= size
        if full_w2:
            shapes["lokr_w2"] = (b, d, *kernel)
        elif cp:
            shapes["lokr_w2_a"], shapes["lokr_w2_b"], shapes["lokr_t2"] = (r, b), (r, d), (r, r, *kernel)
        else:
            shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, r), (r, d * k)
        layout = Layout(a, b, c, d, full_w1, full_w2, cp)
        return {key: torch.empty(s, **factory) for key, s in shapes.items()}, layout

    def _init(self, tensors: dict[str, torch.Tensor], layout: Any, init: Any) -> None:
        # The zero factor that makes ΔW = 0: W1 (or W1a) by default, W2 (or W2b) for "lycoris", none for False.
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(init, ())
        for key, t in tensors.items():
            if key in zero:
                t.zero_()
            else:
                kaiming_(t)

    def _rescales(self, cfg: LycorisConfig) -> bool:
        return cfg.rank_dropout_scale

    def _factors(self, t: dict[str, torch.Tensor], layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """W1 (a, c) and W2: (b, d), (b, d, kh, kw) in full or from a Tucker core, or (b, d·kh·kw)."""
        w1 = t["lokr_w1"] if layout.full_w1 else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if layout.full_w2:
            w2 = t["lokr_w2"]
        elif layout.cp:
            w2 = torch.einsum("ijkl,ip,jq->pqkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])  # (b, d, kh, kw)
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        return w1, w2

    def _weight(self, t: dict[str, torch.Tensor], rec: LycorisRecord) -> torch.Tensor:
        w1, w2 = self._factors(t, rec.layout)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]  # (a, c, 1, 1) ⊗ (b, d, kh, kw) -> (out, in, kh, kw)
        # A flat conv W2 (b, d·kh·kw) gives (out, in·kh·kw), whose row-major reshape is the kernel layout.
        return torch.kron(w1, w2.contiguous()).reshape(self.weight_shape)

    def _prefers_structured(self, r: int, layout: Any) -> bool:
        # Per token: c·b·(a + d) multiply-adds for W1·X·W2ᵀ vs a·b·c·d through a formed ΔW.
        return 2 * (layout.a + layout.d) <= layout.a * layout.d

    def _structured_out(self, h: torch.Tensor, t: dict[str, torch.Tensor], rec: LycorisRecord) -> torch.Tensor:
        layout = rec.layout
        w1, w2 = self._factors(t, layout)  # (a, c), (b, d)
        lead = h.shape[:-1]
        z = h.reshape(*lead, layout.c, layout.d) @ w2.T  # (..., c, b)
        return (w1 @ z).reshape(*lead, self.out_features)  # (..., a, b) -> (..., out)

    def _bound(self, t: dict[str, torch.Tensor], rec: LycorisRecord) -> float:
        layout = rec.layout
        if layout.cp:
            return float("inf")  # small conv kernels: checked exactly
        # |(W1 ⊗ W2)_ij| = |W1_pq| |W2_uv|
        b1 = float(t["lokr_w1"].detach().abs().max()) if layout.full_w1 else product_bound(t["lokr_w1_a"],
                                                                                          t["lokr_w1_b"])
        b2 = float(t["lokr_w2"].detach().abs().max()) if layout.full_w2 else product_bound(t["lokr_w2_a"],
                                                                                          t["lokr_w2_b"])
        return b1 * b2


def summary(cfg: LoKrConfig, tensors: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """`adapterkit inspect` rows: hyperparameters and ||ΔW||_F = s·||W1||_F·||W2||_F per module, from the file."""

    def norm_of(path: str, t: dict[str, torch.Tensor]) -> float | None:
        t = {k: v.double() for k, v in t.items()}
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"] if "lokr_w1_a" in t else None
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("ijkl,ip,jq->pqkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"] if "lokr_w2_a" in t else None
        if w1 is None or w2 is None:
            return None
        return abs(cfg.scaling_for(path)) * float(w1.norm() * w2.norm())

    norms, problems = module_norms(by_module(tensors, "lokr_"), norm_of)
    extra = f", decompose_factor={cfg.decompose_factor}" + (", decompose_both" if cfg.decompose_both else "")
    return summary_rows(cfg, norms, extra, problems)
