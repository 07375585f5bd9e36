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

MAX_ROWS = 128  # above this a step is no longer launch-bound enough for the kernel to pay


@triton.jit(do_not_specialize=["M"])  # M varies per call: one compiled kernel for all
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


# (BM, N, K, R, scale, has bias) -> (the launch of its compiled kernel, column blocks): one compiled kernel per layer
# shape and block of rows (16, 32 or 64), whatever the batch size within it.
_launches: dict[tuple, tuple[DirectLaunch, int]] = {}


def _new_launch(bm: int, n: int, k: int, r: int, scale: float, has_bias: bool) -> tuple[DirectLaunch, int]:
    bn = max(16, min(128, triton.next_power_of_2(triton.cdiv(n, 128))))  # about 128 programs per row block
    bk = 256 if bn <= 32 else 128  # a narrow W slice: longer K steps keep enough bytes in flight
    meta = dict(N=n, K=k, R=r, BM=bm, BN=bn, BK=bk, BR=max(16, triton.next_power_of_2(r)), SCALE=float(scale),
                HAS_BIAS=has_bias)
    return DirectLaunch(_lora_decode_kernel, meta, num_warps=4, num_stages=3), triton.cdiv(n, bn)


class _Plan:
    """How one call shape is launched: the compiled kernel's launch, its grid, and (once an aligned call has bound
    it) the launcher that later aligned calls of this shape call directly."""

    __slots__ = ("launch", "grid", "fast")

    def __init__(self, launch: DirectLaunch, grid: tuple[int, int]) -> None:
        self.launch, self.grid, self.fast = launch, grid, None


# (rows, N, K, R, scale, has bias, dtype, device) -> its _Plan, or None where the kernel does not take that shape.
# One dictionary lookup per call decides everything the shape decides.
_plans: dict[tuple, _Plan | None] = {}


def _new_plan(m: int, n: int, k: int, r: int, scale: float, has_bias: bool) -> _Plan | None:
    if m > MAX_ROWS or n * k >= 2**31 or r * k >= 2**31:  # launch-bound no longer; the kernel indexes with int32
        return None
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    key = (bm, n, k, r, scale, has_bias)
    entry = _launches.get(key)
    if entry is None:
        entry = _launches[key] = _new_launch(*key)
    launch, n_blocks = entry
    return _Plan(launch, ((m + bm - 1) // bm, n_blocks))


def lora_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, on_new_shape=None) -> torch.Tensor | None:
    """x (..., K) · Wᵀ + bias + s·round(x Aᵀ) Bᵀ in one launch, into a new (..., N) tensor; None where the kernel
    does not take this shape (more than MAX_ROWS rows, a weight of 2³¹ elements or more).

    The caller checks the rest: every operand contiguous, in one dtype (bf16 or fp16), on one device. This is the
    eager decode step's hot path, so it is one lookup, one allocation and one launch; `on_new_shape(x, weight, bias,
    lora_a, lora_b, scaling)` is called once for each new shape before its first launch.
    """
    n, r = lora_b.shape
    k = x.shape[-1]
    m = x.numel() // k
    device = x.get_device()
    key = (m, n, k, r, scaling, bias is not None, x.dtype, device)
    plan = _plans.get(key, _plans)
    if plan is _plans:
        plan = _plans[key] = _new_plan(m, n, k, r, scaling, bias is not None)
        if plan is not None and on_new_shape is not None:
            on_new_shape(x, weight, bias, lora_a, lora_b, scaling)
    if plan is None:
        return None
    if 0 <= device != torch.cuda.current_device():  # Triton launches on the current device, not the inputs'
        with torch.cuda.device(device):
            return lora_decode(x, weight, bias, lora_a, lora_b, scaling)
    out = x.new_empty((*x.shape[:-1], n))
    args = (x, weight, lora_a, lora_b, out if bias is None else bias, out, m)
    ptrs = x.data_ptr() | weight.data_ptr() | lora_a.data_ptr() | lora_b.data_ptr() | out.data_ptr()
    if bias is not None:
        ptrs |= bias.data_ptr()
    if ptrs & 15:  # some operand off 16-byte alignment: another specialisation, which DirectLaunch keys itself
        plan.launch(plan.grid, *args)
    elif plan.fast is not None:
        plan.fast(plan.grid, args)
    else:  # the first aligned call of this shape: through the launch, which binds the launcher on the way
        plan.fast = plan.launch.bound(plan.grid, *args)
    return out
