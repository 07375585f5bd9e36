"""Triton kernels for gathered LoRA: one launch adds every row's own low-rank update to the base output.

Two kernels, both reading the slot of each row from the (rows,) int64 index and rounding h = x A[s]ᵀ to the table
dtype (fp32 accumulation) as the unrouted layer rounds lora_A's output, then adding h B[s]ᵀ into `out` in place:

- prefill (`_gathered_lora_kernel`, many tokens per row): grid (rows, token blocks, output blocks of 64-128),
  h and h B[s]ᵀ as tl.dot tiles.
- decode (`_gathered_decode_kernel`, one token per row): grid (rows, splits), splits ≤ 8. tl.dot needs 16 rows, so
  the prefill kernel pads each token to 16 and, with 128-wide output blocks, recomputes h once per block: A[s] is
  read N/128 times per row (64 rows x 64 blocks x 64 KB = 256 MB from L2 for one 2048 -> 8192 layer). Here h is an
  elementwise product summed over K chunks and each program then walks a wide output range in chunks, so A[s] is
  read `splits` times per row and B[s] once. Splits are chosen for parallelism (about 256 programs in all) but
  capped at 2·N/K, so A's re-reads cost at most twice B's one read. Per row at the Llama-3.2-1B shape (bf16,
  R=16, splits 2/1/1/2/4/4/1 for q/k/v/o/gate/up/down) one layer's 7 linears read 14 x 64 KB + 256 KB = 1152 KB
  of A and 23552·16·2 B = 736 KB of B: 64 rows read ≈ 118 MB from L2 instead of ≈ 975 MB (≈ 2.4 µs per linear
  at 7 TB/s from L2), and the 32 adapters' A/B (≈ 44 MB a layer) come from HBM about once. A two-launch
  shrink/expand would read A once per row (640 KB, saving ≈ 27% of those 118 MB) but costs a second launch per
  linear (eager decode is launch bound) and a scratch tensor for h.
  Tiles are 32 KB (16K bf16 elements) with 8 warps, so each program keeps 32 KB of loads in flight (what one SM
  needs to cover memory latency) at 64 elements a thread (plus 64 fp32 partial sums of h, reduced once after the
  K loop); K, N and R are constexpr (fixed per layer), so the launch passes only the five tensors.
Imported only where Triton can run, by `gathered_lora.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .direct_launch import DirectLaunch
from .optional_triton import on_input_device

TILE_BYTES = 32 * 1024  # one decode program's loads in flight per K chunk / output chunk
DECODE_WARPS = 8
TARGET_PROGRAMS = 256  # about two programs per SM on a 132-SM GPU
MAX_SPLITS = 8


@triton.jit
def _gathered_decode_kernel(
    x_ptr, a_ptr, b_ptr, idx_ptr, out_ptr,
    K: tl.constexpr, N: tl.constexpr, R: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, CHUNKS: tl.constexpr,
):
    # x (rows, K), out (rows, N) contiguous; a (slots, R, K), b (slots, N, R) contiguous.
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    slot = tl.load(idx_ptr + row).to(tl.int64)
    offs_r = tl.arange(0, BR)  # rank, padded to a power of two, masked beyond R
    r_ok = offs_r < R

    a_slot = a_ptr + slot * (R * K)
    acc = tl.zeros((BR, BK), dtype=tl.float32)  # per-lane partial sums: one cross-thread reduction, after the loop
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        x = tl.load(x_ptr + row * K + offs_k, mask=k_ok, other=0.0).to(tl.float32)  # (BK,)
        a = tl.load(a_slot + offs_r[:, None] * K + offs_k[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # (BR, BK)
        acc += a.to(tl.float32) * x[None, :]
    h = tl.sum(acc, axis=1)  # (BR,) fp32
    h = h.to(a_ptr.dtype.element_ty).to(tl.float32)  # the unrouted layer's lora_A output is in the adapter dtype

    b_slot = b_ptr + slot * (N * R)
    for j in range(CHUNKS):
        offs_n = (split * CHUNKS + j) * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        b = tl.load(b_slot + offs_n[:, None] * R + offs_r[None, :],
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # (BN, BR), B[s] rows
        delta = tl.sum(b.to(tl.float32) * h[None, :], axis=1)  # (BN,) fp32
        o_ptrs = out_ptr + row * N + offs_n
        y = tl.load(o_ptrs, mask=n_ok, other=0.0)
        tl.store(o_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=n_ok)


@triton.jit
def _gathered_lora_kernel(
    x_ptr, a_ptr, b_ptr, idx_ptr, out_ptr,
    T, N, R,
    sx_b, sx_t, sx_k,
    sa_s, sa_r, sa_k,
    sb_s, sb_n, sb_r,
    so_b, so_t, so_n,
    K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
):
    row = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(idx_ptr + row).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)  # token positions of this row
    offs_n = pid_n * BN + tl.arange(0, BN)  # output features
    offs_r = tl.arange(0, BR)  # rank (padded to a power of two >= 16; masked beyond R)
    m_ok = offs_m < T
    n_ok = offs_n < N
    r_ok = offs_r < R

    x_row = x_ptr + row.to(tl.int64) * sx_b
    a_slot = a_ptr + slot * sa_s
    h = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):  # K constexpr: fixed per layer
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        x = tl.load(x_row + offs_m[:, None] * sx_t + offs_k[None, :] * sx_k,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        a = tl.load(a_slot + offs_r[None, :] * sa_r + offs_k[:, None] * sa_k,
                    mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BR) = A[s]ᵀ tile
        if IEEE:
            h += tl.dot(x, a, input_precision="ieee")
        else:
            h += tl.dot(x, a)

    b = tl.load(b_ptr + slot * sb_s + offs_r[:, None] * sb_r + offs_n[None, :] * sb_n,
                mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # (BR, BN) = B[s]ᵀ tile
    hq = h.to(b.dtype)  # the unrouted layer's lora_A output is in the adapter dtype too
    if IEEE:
        delta = tl.dot(hq, b, input_precision="ieee")  # (BM, BN) fp32
    else:
        delta = tl.dot(hq, b)

    o_ptrs = out_ptr + row.to(tl.int64) * so_b + offs_m[:, None] * so_t + offs_n[None, :] * so_n
    o_mask = m_ok[:, None] & n_ok[None, :]
    y = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=o_mask)


class DecodeLaunch:
    """The decode kernel bound to one layer's tables and batch size: `launch(x, index, out)`.

    Block sizes, splits and the grid are computed once here; the five tensors are the only runtime arguments (the
    sizes are compile-time constants), so after the first call each launch skips Triton's JIT (`DirectLaunch`).
    x (rows, ..., in) and out (rows, ..., out_features) contiguous with one token per row; a_table (slots, R, in) and
    b_table (slots, out, R) contiguous; index (rows,) int64.
    """

    def __init__(self, rows: int, a_table: torch.Tensor, b_table: torch.Tensor) -> None:
        _, r, n_in = a_table.shape
        n_out = b_table.shape[1]
        br = max(4, triton.next_power_of_2(r))  # no 1-wide blocks: masked lanes cost nothing here
        tile = max(256, TILE_BYTES // a_table.element_size())  # elements of one (BR, BK) or (BN, BR) tile
        bk = min(triton.next_power_of_2(n_in), max(16, tile // br))
        bn = min(triton.next_power_of_2(n_out), max(16, tile // br))
        # Splits: enough programs to fill the GPU, at most 2·N/K (A is re-read per split; B is read once per row).
        splits = max(1, min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, rows), (2 * n_out) // n_in,
                            triton.cdiv(n_out, bn)))
        chunks = triton.cdiv(triton.cdiv(n_out, splits), bn)
        splits = triton.cdiv(n_out, chunks * bn)  # no program left without outputs
        self.a, self.b = a_table, b_table
        self.grid = (rows, splits)
        self.meta = dict(K=n_in, N=n_out, R=r, BR=br, BK=bk, BN=bn, CHUNKS=chunks)
        self.launch = DirectLaunch(_gathered_decode_kernel, self.meta, num_warps=DECODE_WARPS, num_stages=2)

    @on_input_device
    def __call__(self, x: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
        self.launch(self.grid, x, self.a, self.b, index, out)


def decode_launch(rows: int, a_table: torch.Tensor, b_table: torch.Tensor) -> DecodeLaunch:
    """The decode kernel bound to one layer's tables and batch size (see DecodeLaunch)."""
    return DecodeLaunch(rows, a_table, b_table)


def _block_m(tokens: int) -> int:
    # tl.dot needs at least 16 rows.
    return 16 if tokens <= 16 else (32 if tokens <= 32 else 64)


@on_input_device
def gathered_lora_add(
    out: torch.Tensor, x: torch.Tensor, a_table: torch.Tensor, b_table: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """out += (x A[s]ᵀ) B[s]ᵀ per row, in place. x (rows, ..., in), out (rows, ..., out_features) contiguous,
    index (rows,) int64 on the tables' device. One token per row: the decode kernel, else the prefill kernel."""
    rows, n_in = x.shape[0], x.shape[-1]
    n_out = out.shape[-1]
    if x.numel() == rows * n_in and a_table.is_contiguous() and b_table.is_contiguous():
        decode_launch(rows, a_table, b_table)(x.contiguous(), index, out)
        return out
    x3 = x.reshape(rows, -1, n_in)  # (rows, T, in)
    o3 = out.view(rows, -1, n_out)  # a view: the kernel writes into `out`
    tokens = x3.shape[1]
    r = a_table.shape[1]
    br = max(16, triton.next_power_of_2(r))
    bm = _block_m(tokens)
    bn = 64 if bm == 64 else 128
    bk = 64 if br > 64 else 128
    grid = (rows, triton.cdiv(tokens, bm), triton.cdiv(n_out, bn))
    _gathered_lora_kernel[grid](
        x3, a_table, b_table, index, o3,
        tokens, n_out, r,
        x3.stride(0), x3.stride(1), x3.stride(2),
        a_table.stride(0), a_table.stride(1), a_table.stride(2),
        b_table.stride(0), b_table.stride(1), b_table.stride(2),
        o3.stride(0), o3.stride(1), o3.stride(2),
        K=n_in, BM=bm, BN=bn, BK=bk, BR=br, IEEE=a_table.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    return out
