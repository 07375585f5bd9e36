"""Truncated SVD of a weight update into LoRA factors, with the relative error it leaves.

    delta (out, in) ≈ B A,  B = U_r √S_r (out, r),  A = √S_r V_rᵀ (r, in)      error = ‖delta − B A‖_F / ‖delta‖_F
"""

from __future__ import annotations

import torch


def truncated_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (r, in), B (out, r), relative Frobenius error) of the best rank-`rank` approximation of `delta` (float32)."""
    delta = delta.detach().float()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # u (out, k), s (k,), vh (k, in)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = u[:, :r] * root  # (out, r)
    a = root[:, None] * vh[:r]  # (r, in)
    if r < rank:  # a delta of smaller shape than the rank: pad with zeros (exact)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    norm = delta.norm()
    error = float((delta - b @ a).norm() / norm) if norm > 0 else 0.0
    return a, b, error
