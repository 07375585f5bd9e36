"""Triton kernel for a LoRA layer's rank-r forward in training: x·Aᵀ and every output's s·(x·Aᵀ)·Bᵀ in one launch.

    xa = round(x Aᵀ)                          x (M, K), A (R, K): kept for backward (dB)
    out_i = s_i · xa[:, cols_i] B_iᵀ + bias_i   for up to three outputs (sibling projections share x and A = [A_i])

The caller then accumulates each base GEMM onto out_i (beta=1), as the cuBLAS path does after its two GEMMs. With
cuBLAS that is one GEMM for xa and one per output, each a host call of 16-50 µs on an H200's host and a memory-bound
kernel with a ramp of its own; the forward of a training step is bound by the host (bench/README.md, seventh pass),
so this is one launch (`direct_launch.py`) reading x once and writing each output once. On an H200 at the
Llama-3.2-1B shapes it takes 36.2 µs for q/k/v against 45.2 for cuBLAS's four GEMMs, 24.7 against 47.8 for o, 94.8
against 108.3 for gate/up and 53.1 against 59.8 for down, with bit-identical outputs there.

Each program owns BM rows: it walks K once for its (BM, R) slice of xa (R padded to RP >= 16, in registers), rounds
it to the input dtype as cuBLAS's xa is rounded, stores it, then walks each output's columns BN at a time. The
padded rank is at most MAX_RANK (a larger accumulator would spill). Imported only where Triton can run, by
`lora_linear.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .direct_launch import DirectLaunch, FastLaunch

MAX_SEGMENTS = 3
MAX_RANK = 64  # padded total rank (R of every output together) the kernel takes
BM, BK, BN, WARPS, STAGES = 64, 128, 128, 4, 4  # from a sweep on an H200 (bench/README.md)


@triton.jit
def _rank_out(xa, rows, row_ok, rr, o_ptr, b_ptr, c_ptr, s,
              R_START: tl.constexpr, RI: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr):
    # out[rows, :] = s · xa[:, R_START:R_START + RI] · Bᵀ (+ bias); B (N, RI) row-major; other rank columns masked.
    in_seg = (rr >= R_START) & (rr < R_START + RI)
    for n0 in range(0, N, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < N
        bt = tl.load(b_ptr + cols[None, :] * RI + (rr[:, None] - R_START), mask=in_seg[:, None] & col_ok[None, :],
                     other=0.0)  # (RP, BN): Bᵀ's rows for this output's rank columns
        tile = tl.dot(xa, bt) * s
        if HAS_BIAS:
            tile += tl.load(c_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptr + rows[:, None] * N + cols[None, :], tile.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M"])  # rows vary per call: one compiled kernel per layer shape
def _lora_fwd_kernel(
    x_ptr, a_ptr, xa_ptr,
    o0_ptr, b0_ptr, c0_ptr, s0, o1_ptr, b1_ptr, c1_ptr, s1, o2_ptr, b2_ptr, c2_ptr, s2,
    M,
    K: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, NSEG: tl.constexpr,
    N0: tl.constexpr, R0: tl.constexpr, BIAS0: tl.constexpr,
    N1: tl.constexpr, R1: tl.constexpr, BIAS1: tl.constexpr,
    N2: tl.constexpr, R2: tl.constexpr, BIAS2: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < M
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        xt = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptr + rr[None, :] * K + ks[:, None], mask=(rr[None, :] < R) & k_ok[:, None], other=0.0)
        acc = tl.dot(xt, at, acc)  # (BM, RP)
    xa = acc.to(xa_ptr.dtype.element_ty)  # rounded, as the unfused xa is
    tl.store(xa_ptr + rows[:, None] * R + rr[None, :], xa, mask=row_ok[:, None] & (rr[None, :] < R))
    _rank_out(xa, rows, row_ok, rr, o0_ptr, b0_ptr, c0_ptr, s0, 0, R0, N0, BIAS0, BN)
    if NSEG > 1:
        _rank_out(xa, rows, row_ok, rr, o1_ptr, b1_ptr, c1_ptr, s1, R0, R1, N1, BIAS1, BN)
    if NSEG > 2:
        _rank_out(xa, rows, row_ok, rr, o2_ptr, b2_ptr, c2_ptr, s2, R0 + R1, R2, N2, BIAS2, BN)


# (K, R, ((N_i, r_i, has bias_i), ...), dtype, device) -> its _Plan, or None where the kernel does not take it.
_plans: dict[tuple, FastLaunch | None] = {}


def _new_plan(k: int, r: int, shapes: tuple) -> FastLaunch | None:
    rp = max(16, triton.next_power_of_2(r))
    if rp > MAX_RANK or len(shapes) > MAX_SEGMENTS or any(n * 2**16 >= 2**31 for n, _, _ in shapes) or k >= 2**15:
        return None  # the accumulator would spill; or offsets past int32 at 65536 rows
    meta = dict(K=k, R=r, RP=rp, NSEG=len(shapes))
    for i in range(MAX_SEGMENTS):
        n, ri, bias = shapes[i] if i < len(shapes) else (1, 1, False)
        meta.update({f"N{i}": n, f"R{i}": ri, f"BIAS{i}": bias})
    meta.update(BM=BM, BK=BK, BN=BN)
    return FastLaunch(DirectLaunch(_lora_fwd_kernel, meta, num_warps=WARPS, num_stages=STAGES))


MAX_ROWS = 2**16  # with K and every N below 2**15, no offset passes int32


def rank_forward(x: torch.Tensor, a: torch.Tensor, outputs) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """(xa, [out_i]) for x (M, K) and a (R, K), `outputs` a sequence of (B_i (N_i, r_i), bias_i or None, s_i) with
    Σ r_i = R; None where the kernel does not take the call (padded rank over MAX_RANK, more than MAX_SEGMENTS
    outputs, no rows or more than MAX_ROWS, a width of 2¹⁵ or more). The caller checks the rest: every operand
    contiguous and on one CUDA device (or Triton's interpreter), one dtype (bf16 or fp16)."""
    m, k = x.shape
    r = a.shape[0]
    shapes = tuple((b.shape[0], b.shape[1], bias is not None) for b, bias, _ in outputs)
    device = x.get_device()
    key = (k, r, shapes, x.dtype, device)
    plan = _plans.get(key, _plans)
    if plan is _plans:
        plan = _plans[key] = _new_plan(k, r, shapes)
    if plan is None or not 0 < m <= MAX_ROWS:  # no rows: no grid to launch (cuBLAS returns the empty outputs)
        return None
    if 0 <= device != torch.cuda.current_device():  # Triton launches on the current device, not the inputs'
        with torch.cuda.device(device):
            return rank_forward(x, a, outputs)
    xa = x.new_empty((m, r))
    outs = [x.new_empty((m, b.shape[0])) for b, _, _ in outputs]
    args = [x, a, xa]
    ptrs = x.data_ptr() | a.data_ptr() | xa.data_ptr()
    for i in range(MAX_SEGMENTS):
        if i < len(outputs):
            b, bias, s = outputs[i]
            out = outs[i]
            ptrs |= out.data_ptr() | b.data_ptr() | (0 if bias is None else bias.data_ptr())
            args += [out, b, out if bias is None else bias, float(s)]
        else:
            args += [outs[0], outputs[0][0], outs[0], 0.0]  # never read
    args.append(m)
    grid = ((m + BM - 1) // BM,)
    plan(grid, tuple(args), not ptrs & 15)  # misaligned: another specialisation, which DirectLaunch keys itself
    return xa, outs
