"""Triton kernels for the LoRA linear's rank-r products, with dropout applied on the fly.

The dropout keep-mask is a hash of (seed, row * n_cols + col), regenerated wherever it is needed, so the dropped-out
input is never written to device memory nor saved for backward. Imported only on CUDA, by `lora_linear.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .optional_triton import on_input_device

# Launch shapes, chosen on an H100 with bench/train_step.py --micro --sweep (see bench/NOTES.md).
FWD_BM, FWD_BK, FWD_WARPS, FWD_STAGES = 32, 128, 4, 4
BWD_BM, BWD_BN, BWD_WARPS, BWD_STAGES = 64, 128, 4, 3


@triton.jit
def _keep(rows, cols, n_cols, seed, thresh):
    """Boolean keep-mask of a tile: hash(seed, row * n_cols + col) >= thresh, in wrapping uint32 arithmetic.

    Mirrors `hash_keep_mask` in lora_linear.py bit for bit (a 'lowbias32' integer hash with the seed mixed in).
    """
    idx = rows.to(tl.uint32) * n_cols.to(tl.uint32) + cols.to(tl.uint32)
    h = idx * 0x9E3779B1 + seed.to(tl.uint32)
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return (h >> 8).to(tl.int32) >= thresh


@triton.jit
def _lora_a_fwd_kernel(x_ptr, a_ptr, xa_ptr, M, K, R, stride_xm, stride_am, stride_om, seed, thresh, scale,
                       DROPOUT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    # xa[M, R] = scale * (mask ⊙ x)[M, K] @ A[R, K]ᵀ ; one program per BM rows, streaming x once.
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    rmask = rows < M
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)  # (BM, BK)
        if DROPOUT:
            x = tl.where(_keep(rows[:, None], cols[None, :], K, seed, thresh), x, tl.zeros_like(x))
        a = tl.load(a_ptr + rr[:, None] * stride_am + cols[None, :], mask=(rr[:, None] < R) & cmask[None, :],
                    other=0.0)  # (BR, BK)
        acc = tl.dot(x, tl.trans(a), acc)
    acc = acc * scale
    tl.store(xa_ptr + rows[:, None] * stride_om + rr[None, :], acc.to(xa_ptr.dtype.element_ty),
             mask=rmask[:, None] & (rr[None, :] < R))


@triton.jit
def _lora_a_bwd_kernel(x_ptr, g_ptr, a_ptr, dx_ptr, da_ptr, M, K, R, rows_per_split,
                       stride_xm, stride_gm, stride_am, stride_dxm, seed, thresh, scale,
                       DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    # For columns [n0, n0+BN) and a slice of rows, in one pass:
    #   dx[M, K]        = scale * mask ⊙ (g[M, R] @ A[R, K])   (the caller adds dY W into it with a beta=1 GEMM)
    #   da_part[s, R, K] = Σ_rows g[M, R]ᵀ @ (mask ⊙ x)[M, K]   (summed over splits and scaled on the host)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < K
    rr = tl.arange(0, BR)
    rrmask = rr < R
    a = tl.load(a_ptr + rr[:, None] * stride_am + cols[None, :], mask=rrmask[:, None] & cmask[None, :],
                other=0.0)  # (BR, BN)
    acc = tl.zeros((BR, BN), dtype=tl.float32)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for m0 in range(row_start, row_end, BM):
        rows = m0 + tl.arange(0, BM)
        rmask = rows < row_end
        tile_mask = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_gm + rr[None, :], mask=rmask[:, None] & rrmask[None, :],
                    other=0.0)  # (BM, BR)
        if DROPOUT:
            keep = _keep(rows[:, None], cols[None, :], K, seed, thresh)
        if NEED_DA:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=tile_mask, other=0.0)  # (BM, BN)
            if DROPOUT:
                x = tl.where(keep, x, tl.zeros_like(x))
            acc = tl.dot(tl.trans(g), x, acc)
        if NEED_DX:
            d = tl.dot(g, a)  # (BM, BN) fp32
            if DROPOUT:
                d = tl.where(keep, d, 0.0)
            tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], (d * scale).to(dx_ptr.dtype.element_ty),
                     mask=tile_mask)
    if NEED_DA:
        tl.store(da_ptr + pid_s * R * K + rr[:, None] * K + cols[None, :], acc,
                 mask=rrmask[:, None] & cmask[None, :])


@triton.jit
def _mask_kernel(out_ptr, M, K, seed, thresh, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    m = (rows[:, None] < M) & (cols[None, :] < K)
    keep = _keep(rows[:, None], cols[None, :], K, seed, thresh)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=m)


def _threshold(p: float) -> int:
    # Keep iff the hash's top 24 bits >= p·2²⁴: the keep rate is exact to 6e-8.
    return int(round(p * (1 << 24)))


def _rank_block(r: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(r))


@on_input_device
def lora_a_forward(x: torch.Tensor, a: torch.Tensor, p: float, seed: int, *, bm: int = FWD_BM, bk: int = FWD_BK,
                   num_warps: int = FWD_WARPS, num_stages: int = FWD_STAGES) -> torch.Tensor:
    """xa = dropout(x) @ aᵀ for contiguous x (M, K) and a (R, K); dropout scale 1/(1-p) included."""
    M, K = x.shape
    R = a.shape[0]
    xa = torch.empty(M, R, device=x.device, dtype=x.dtype)
    _lora_a_fwd_kernel[(triton.cdiv(M, bm),)](
        x, a, xa, M, K, R, x.stride(0), a.stride(0), xa.stride(0), seed, _threshold(p), 1.0 / (1.0 - p),
        DROPOUT=p > 0, BM=bm, BK=bk, BR=_rank_block(R), num_warps=num_warps, num_stages=num_stages)
    return xa


@on_input_device
def lora_a_backward(x: torch.Tensor | None, g: torch.Tensor, a: torch.Tensor, p: float, seed: int, scaling: float,
                    need_dx: bool, need_da: bool, *, bm: int = BWD_BM, bn: int = BWD_BN, num_warps: int = BWD_WARPS,
                    num_stages: int = BWD_STAGES, splits: int | None = None):
    """(dx_lora, da): dx_lora = s/(1-p) · mask ⊙ (g @ a), da = s/(1-p) · gᵀ @ (mask ⊙ x); None where not needed.

    x: (M, K) (may be None without need_da), g: (M, R) = dY @ B, a: (R, K); all contiguous. One pass over x and
    dx_lora, the mask regenerated once for both.
    """
    M, K = g.shape[0], a.shape[1]
    R = a.shape[0]
    dx = torch.empty(M, K, device=g.device, dtype=g.dtype) if need_dx else None
    scale = scaling / (1.0 - p)
    n_col = triton.cdiv(K, bn)
    if splits is None:
        # About two programs per multiprocessor; each split owns whole BM-row blocks.
        sms = torch.cuda.get_device_properties(g.device).multi_processor_count
        splits = max(1, min(triton.cdiv(M, bm), (2 * sms) // n_col))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), bm) * bm
    splits = triton.cdiv(M, rows_per_split)
    da_part = torch.empty(splits, R, K, device=g.device, dtype=torch.float32) if need_da else g
    _lora_a_bwd_kernel[(n_col, splits)](
        x if need_da else g, g, a, dx if need_dx else g, da_part, M, K, R, rows_per_split,
        x.stride(0) if need_da else 0, g.stride(0), a.stride(0), dx.stride(0) if need_dx else 0,
        seed, _threshold(p), scale, DROPOUT=p > 0, NEED_DX=need_dx, NEED_DA=need_da,
        BM=bm, BN=bn, BR=_rank_block(R), num_warps=num_warps, num_stages=num_stages)
    if not need_da:
        return dx, None
    da = da_part.sum(0) if splits > 1 else da_part[0]
    return dx, da.mul_(scale).to(a.dtype)


def keep_mask(n_rows: int, n_cols: int, p: float, seed: int, device) -> torch.Tensor:
    """The boolean keep-mask the kernels above use, written out (for tests)."""
    out = torch.empty(n_rows, n_cols, device=device, dtype=torch.int8)
    _mask_kernel[(triton.cdiv(n_rows, 64), triton.cdiv(n_cols, 64))](out, n_rows, n_cols, seed, _threshold(p),
                                                                     BM=64, BN=64)
    return out.bool()
