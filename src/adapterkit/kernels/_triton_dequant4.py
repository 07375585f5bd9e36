"""Triton kernel dequantizing bitsandbytes 4-bit weights (NF4, FP4): one weight, or up to three in one launch.

    w[i] = table[code_i] · absmax[i // blocksize]        in float32, rounded once to the output dtype

which is what bitsandbytes' own dequantize kernel computes: its 16-entry table is read from bitsandbytes itself
(its kernel run once per quant type and device on all sixteen codes), so the values are bit for bit its own. The
packed codes hold two per byte, the high nibble first; absmax is float32 per block, its double quantization undone
(`quantized._expanded_absmax`).

Why not bitsandbytes' op: a training step on a 4-bit base dequantizes every layer's weight twice (forward and
backward), and that step's forward is bound by the host issuing work. bitsandbytes' op costs the host 19.6-34 µs a
call on an H200's host (a torch.library Python kernel around a ctypes call); this launch, called through its bound
launcher (`direct_launch.py`), 11.2 µs, and its GPU time is lower too (18.1 against 23.4 µs for 8192x2048;
bench/README.md, seventh pass). Sibling projections (q/k/v, gate/up), whose weights share their input width, are
dequantized by one launch into one (Σ out, in) buffer, where bitsandbytes needs a call each.

Each program writes BLOCK consecutive elements of one weight (one segment of the output); the grid covers the
segments one after another. Imported only where Triton can run, by `quantized.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .direct_launch import DirectLaunch

MAX_SEGMENTS = 3
BLOCK = 2048  # output elements per program: 1024 bytes of codes read, 4 KiB of bf16 written


@triton.jit
def _dequant4_kernel(
    out_ptr, table_ptr,
    q0_ptr, a0_ptr, n0, q1_ptr, a1_ptr, n1, q2_ptr, a2_ptr, n2,
    BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr, NSEG: tl.constexpr,
):
    # Segment s holds n_s elements (codes q_s: (n_s + 1) // 2 bytes; absmax a_s: cdiv(n_s, BLOCKSIZE) floats) and
    # owns cdiv(n_s, BLOCK) programs; its output starts where the previous segments' elements end.
    pid = tl.program_id(0)
    q_ptr, a_ptr, n, first, start = q0_ptr, a0_ptr, n0, pid * 0, pid * 0
    if NSEG > 1:
        end0 = (n0 + BLOCK - 1) // BLOCK
        if pid >= end0:
            q_ptr, a_ptr, n, first, start = q1_ptr, a1_ptr, n1, first + end0, start + n0
        if NSEG > 2:
            end1 = end0 + (n1 + BLOCK - 1) // BLOCK
            if pid >= end1:
                q_ptr, a_ptr, n, first, start = q2_ptr, a2_ptr, n2, first * 0 + end1, start * 0 + n0 + n1
    local = (pid - first) * BLOCK + tl.arange(0, BLOCK)  # element index within the segment
    ok = local < n
    byte = tl.load(q_ptr + local // 2, mask=ok, other=0).to(tl.int32)  # each byte read by its two elements' lanes
    code = (byte >> (4 - 4 * (local & 1))) & 15  # even element: the high nibble; odd: the low one
    scale = tl.load(a_ptr + local // BLOCKSIZE, mask=ok, other=0.0)
    values = tl.load(table_ptr + code) * scale
    tl.store(out_ptr + start + local, values.to(out_ptr.dtype.element_ty), mask=ok)


_launches: dict[tuple[int, int], DirectLaunch] = {}  # (segments, blocksize) -> its launch


def launch_for(segments: int, blocksize: int) -> DirectLaunch:
    key = (segments, blocksize)
    launch = _launches.get(key)
    if launch is None:
        launch = _launches[key] = DirectLaunch(_dequant4_kernel, dict(BLOCKSIZE=blocksize, BLOCK=BLOCK, NSEG=segments),
                                               num_warps=4)
    return launch


def grid_for(numels: tuple[int, ...]) -> tuple[int]:
    return (sum(triton.cdiv(n, BLOCK) for n in numels),)


def kernel_args(table: torch.Tensor, parts: tuple[tuple[torch.Tensor, torch.Tensor, int], ...]) -> tuple:
    """The kernel's runtime arguments after the output, for `parts` ((codes as uint8, absmax float32, numel) per
    weight, at most MAX_SEGMENTS); unused segments repeat the first's (never read)."""
    flat = [table]
    for i in range(MAX_SEGMENTS):
        q, a, n = parts[i] if i < len(parts) else parts[0]
        flat += [q, a, n]
    return tuple(flat)
