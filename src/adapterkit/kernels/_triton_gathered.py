"""Triton kernel for gathered LoRA: one launch adds every row's own low-rank update to the base output.

Grid (rows, token blocks, output blocks); a program reads its row's slot, computes h = x A[s]ᵀ for its tokens
(fp32 accumulation over `in`, h rounded to the table dtype as the unrouted layer rounds it), then out += h B[s]ᵀ for
its output block. Decode (one token per row) and prefill (many tokens per row) differ only in the token block.
Imported only on CUDA, by `gathered_lora.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gathered_lora_kernel(
    x_ptr, a_ptr, b_ptr, idx_ptr, out_ptr,
    T, K, N, R,
    sx_b, sx_t, sx_k,
    sa_s, sa_r, sa_k,
    sb_s, sb_n, sb_r,
    so_b, so_t, so_n,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
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
    for k0 in range(0, K, BK):
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


def _block_m(tokens: int) -> int:
    # tl.dot needs at least 16 rows; decode (1 token per row) wastes the padding but stays one launch.
    return 16 if tokens <= 16 else (32 if tokens <= 32 else 64)


def gathered_lora_add(
    out: torch.Tensor, x: torch.Tensor, a_table: torch.Tensor, b_table: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """out += (x A[s]ᵀ) B[s]ᵀ per row, in place. x (rows, ..., in), out (rows, ..., out_features)."""
    rows, n_in = x.shape[0], x.shape[-1]
    n_out = out.shape[-1]
    x3 = x.reshape(rows, -1, n_in)  # (rows, T, in)
    o3 = out.view(rows, -1, n_out)  # a view: the kernel writes into `out`
    tokens = x3.shape[1]
    r = a_table.shape[1]
    br = max(16, triton.next_power_of_2(r))
    bm = _block_m(tokens)
    bn = 64 if bm == 64 else 128
    bk = 64 if br > 64 else 128
    index = index.to(device=x.device, dtype=torch.int32)
    grid = (rows, triton.cdiv(tokens, bm), triton.cdiv(n_out, bn))
    _gathered_lora_kernel[grid](
        x3, a_table, b_table, index, o3,
        tokens, n_in, n_out, r,
        x3.stride(0), x3.stride(1), x3.stride(2),
        a_table.stride(0), a_table.stride(1), a_table.stride(2),
        b_table.stride(0), b_table.stride(1), b_table.stride(2),
        o3.stride(0), o3.stride(1), o3.stride(2),
        BM=bm, BN=bn, BK=bk, BR=br, IEEE=a_table.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    return out
