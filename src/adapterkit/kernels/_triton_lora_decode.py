"""Triton kernel for a LoRA linear at decode sizes: the base GEMM and the rank-r update in one launch.

    out = x Wᵀ + bias + s · round(x Aᵀ) Bᵀ          x (M, K), M small (decode: a token or a few per row)

Eager decode is bound by the host issuing kernels (bench/README.md: a 64-token forward of a 1B model takes 9-10 ms
eager against 2.8 ms as a CUDA graph). cuBLAS needs three calls per adapted linear (x Wᵀ, x Aᵀ, the accumulating
h Bᵀ) where the base needs one; this kernel is one launch, and after its first call it is relaunched directly
(`direct_launch.py`), so an adapted linear costs the host about what the plain linear does.

Each program computes BN output columns for 64 rows (fewer rows are masked): it walks K once, accumulating x Wᵀ
and h = x Aᵀ (A is read by every program, R·K elements from L2 beside its BN·K slice of W), rounds h to the adapter
dtype as the unfused layer's lora_A output is rounded, and adds s·h Bᵀ and the bias before its one store. Output
blocks are narrow (16-128 columns: about 128 programs per row block) so that even a 512-wide projection gets 32.

Launch shape, from a sweep of the kernel inside CUDA graphs on an H200 (GPU time alone, distinct weights per call,
bench/README.md): 64-row blocks, K steps of 128, five stages were the fastest or within 5% of it for every
Llama-3.2-1B projection at 16 and 64 rows (16-row blocks were up to 1.9x slower at 16 rows). There the kernel beats
cuBLAS's three GEMMs for K ≤ 4096 (q, k, v, o, gate, up: 7.9-13.4 µs against 13.2-20.1) but not at K = 8192 (down:
25.9 against 22.2 µs, one pass over K per program leaves too little in flight), so while a graph is captured it is
taken only for K ≤ GRAPH_MAX_K and only for a shape already launched eagerly (nothing compiles or binds inside a
capture). Imported only where Triton can run, by `lora_linear.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .direct_launch import DirectLaunch, FastLaunch

MAX_ROWS = 128  # above this a step is no longer launch-bound enough for the kernel to pay
GRAPH_MAX_K = 4096  # inside a CUDA graph, cuBLAS's three GEMMs are faster for longer K (the module docstring)
BM = 64  # rows per program


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


# (N, K, R, scale, has bias) -> (the launch of its compiled kernel, column blocks): one compiled kernel per layer
# shape, whatever the batch size.
_launches: dict[tuple, tuple[DirectLaunch, int]] = {}


def _new_launch(n: int, k: int, r: int, scale: float, has_bias: bool) -> tuple[DirectLaunch, int]:
    bn = max(16, min(128, triton.next_power_of_2(triton.cdiv(n, 128))))  # about 128 programs per row block
    meta = dict(N=n, K=k, R=r, BM=BM, BN=bn, BK=128, BR=max(16, triton.next_power_of_2(r)), SCALE=float(scale),
                HAS_BIAS=has_bias)
    return DirectLaunch(_lora_decode_kernel, meta, num_warps=4, num_stages=5), triton.cdiv(n, bn)


class _Plan:
    """How one call shape is launched: its grid, whether graphs take it, and the compiled kernel's launch (whose bound
    launcher, once an aligned call has bound it, later aligned calls of this shape call directly)."""

    __slots__ = ("run", "grid", "in_graphs")

    def __init__(self, launch: DirectLaunch, grid: tuple[int, int], in_graphs: bool) -> None:
        self.run, self.grid, self.in_graphs = FastLaunch(launch), grid, in_graphs


# (rows, N, K, R, scale, has bias, dtype, device) -> its _Plan, or None where the kernel does not take that shape.
# One dictionary lookup per call decides everything the shape decides.
_plans: dict[tuple, _Plan | None] = {}


def _new_plan(m: int, n: int, k: int, r: int, scale: float, has_bias: bool) -> _Plan | None:
    if not 0 < m <= MAX_ROWS or n * k >= 2**31 or r * k >= 2**31:  # no rows: no grid; more: launch-bound no
        return None  # longer; and the kernel indexes with int32
    key = (n, k, r, scale, has_bias)
    entry = _launches.get(key)
    if entry is None:
        entry = _launches[key] = _new_launch(*key)
    launch, n_blocks = entry
    return _Plan(launch, ((m + BM - 1) // BM, n_blocks), k <= GRAPH_MAX_K)


def lora_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, on_new_shape=None, capturing: bool = False) -> torch.Tensor | None:
    """x (..., K) · Wᵀ + bias + s·round(x Aᵀ) Bᵀ in one launch, into a new (..., N) tensor; None where the kernel
    does not take this call: no rows or more than MAX_ROWS, a weight of 2³¹ elements or more, and while a CUDA graph
    is captured (`capturing`) K > GRAPH_MAX_K or a shape not yet launched and bound outside the capture.

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
    if capturing and (plan is _plans or plan is None or plan.run.fast is None or not plan.in_graphs):
        return None
    if plan is _plans:
        plan = _plans[key] = _new_plan(m, n, k, r, scaling, bias is not None)
        if plan is not None and on_new_shape is not None:
            on_new_shape(x, weight, bias, lora_a, lora_b, scaling)
    if plan is None:
        return None
    if 0 <= device != torch.cuda.current_device():  # Triton launches on the current device, not the inputs'
        with torch.cuda.device(device):
            return lora_decode(x, weight, bias, lora_a, lora_b, scaling, capturing=capturing)
    out = x.new_empty((*x.shape[:-1], n))
    args = (x, weight, lora_a, lora_b, out if bias is None else bias, out, m)
    ptrs = x.data_ptr() | weight.data_ptr() | lora_a.data_ptr() | lora_b.data_ptr() | out.data_ptr()
    if bias is not None:
        ptrs |= bias.data_ptr()
    aligned = not ptrs & 15  # else another specialisation, which DirectLaunch keys itself
    if capturing and not aligned:
        return None  # its first call would compile inside the capture
    plan.run(plan.grid, args, aligned)
    return out
