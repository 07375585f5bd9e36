"""Triton kernel for a LoRA linear at decode sizes: the base GEMM and the rank-r update in one launch.

    out = x Wᵀ + bias + s · round(x Aᵀ) Bᵀ          x (M, K), M small (decode: a token or a few per row)

Eager decode is bound by the host issuing kernels (bench/README.md: a 64-token forward of a 1B model takes 9-10 ms
eager against 2.8 ms as a CUDA graph). cuBLAS needs three calls per adapted linear (x Wᵀ, x Aᵀ, the accumulating
h Bᵀ) where the base needs one; this kernel is one launch, and after its first call it is relaunched directly
(`direct_launch.py`), so an adapted linear costs the host about what the plain linear does.

Each program computes BN output columns for BM rows: it walks K once, accumulating x Wᵀ and h = x Aᵀ (A is read by
every program, R·K elements from L2 beside its BN·K slice of W), rounds h to the adapter dtype as the unfused
layer's lora_A output is rounded, and adds s·h Bᵀ and the bias before its one store. Output blocks are narrow
(16-128 columns) so that even a 512-wide projection gets 32 programs. The blocks are chosen for eager decode, where
the GPU waits for the host; while a CUDA graph is captured the host drops out and GPU time decides, and there the
caller keeps cuBLAS (the kernel's GPU time has not been measured against it). Imported only where Triton can run, by
`lora_linear.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .direct_launch import DirectLaunch
from .optional_triton import on_input_device

MAX_ROWS = 128  # above this a step is no longer launch-bound enough for the kernel to pay


@triton.jit
def _lora_decode_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, out_ptr, M,
    N: tl.constexpr, K: tl.constexpr, R: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # x (M, K), w (N, K), a (R, K), b (N, R), bias (N,), out (M, N): all contiguous, one dtype. M is a runtime
    # argument (one compiled kernel serves every batch size of a block size); the layer's sizes are constexpr.
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, BR)  # rank, padded to a power of two >= 16, masked beyond R
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    h = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # Wᵀ and Aᵀ tiles, (BK, BN) and (BK, BR), read straight from the row-major (N, K) and (R, K) matrices.
        wt = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        at = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(x, wt)  # (BM, BN)
        h += tl.dot(x, at)  # (BM, BR)
    bt = tl.load(b_ptr + offs_n[None, :] * R + offs_r[:, None], mask=n_ok[None, :] & r_ok[:, None], other=0.0)
    hq = h.to(bt.dtype)  # the unfused layer's lora_A output is in the adapter dtype too
    acc += SCALE * tl.dot(hq, bt)  # (BM, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# (BM, N, K, R, scale, has bias) -> (the bound launch, output blocks): one compiled kernel per layer shape and
# block of rows (16, 32 or 64), whatever the batch size within it.
_launches: dict[tuple, tuple[DirectLaunch, int]] = {}


def _new_launch(bm: int, n: int, k: int, r: int, scale: float, has_bias: bool) -> tuple[DirectLaunch, int]:
    bn = max(16, min(128, triton.next_power_of_2(triton.cdiv(n, 128))))  # about 128 programs per row block
    bk = 256 if bn <= 32 else 128  # a narrow W slice: longer K steps keep enough bytes in flight
    meta = dict(N=n, K=k, R=r, BM=bm, BN=bn, BK=bk, BR=max(16, triton.next_power_of_2(r)), SCALE=float(scale),
                HAS_BIAS=has_bias)
    return DirectLaunch(_lora_decode_kernel, meta, num_warps=4, num_stages=3), triton.cdiv(n, bn)


@on_input_device
def lora_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """x (M, K) · Wᵀ + bias + s·round(x Aᵀ) Bᵀ in one launch, into a new (M, N) tensor. All contiguous, one dtype,
    M ≤ MAX_ROWS (the caller checks)."""
    m, k = x.shape
    n, r = lora_b.shape
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    key = (bm, n, k, r, scaling, bias is not None)
    entry = _launches.get(key)
    if entry is None:
        entry = _launches[key] = _new_launch(*key)
    launch, n_blocks = entry
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    launch(((m + bm - 1) // bm, n_blocks), x, weight, lora_a, lora_b, out if bias is None else bias, out, m)
    return out
