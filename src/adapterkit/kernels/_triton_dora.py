"""Triton kernels for the DoRA linear's per-column passes, so the scale c = m / n is never a tensor of its own.

    weight_norm:       n = ‖W_i + s·(B A)_i‖ from ‖W_i‖² (cached), W Aᵀ (cuBLAS) and A Aᵀ      over (out, r) and A
    scale_columns_:    y ← y ⊙ (m / n) + b, in place                               one pass over (N, out)
    scale_grad:        gc = g ⊙ (m / n);  dm = (Σ_N g ⊙ y − b · Σ_N g) / m       one pass over (N, out), then (out,)
    grouped_norms:     n = ‖M + s·B A‖ for many layers' M at once                    one pass over every M

The plain-PyTorch composition in dora.py computes the same values (it rounds c to the input's dtype before the
multiply; these keep it in float32). Column sums go through per-block partials summed in a fixed order, so the
gradient of m is deterministic. Imported only on CUDA, by `dora.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .optional_triton import on_input_device

NORM_BM, NORM_BK = 64, 128
SCALE_BM, SCALE_BN = 32, 128
GRAD_BM, GRAD_BN, GRAD_ROWS = 32, 128, 128  # each program of scale_grad reduces GRAD_ROWS (or more) rows of BN columns
MAX_PARTS = 64  # partial column sums per column block, summed by one program


@triton.jit
def _norm_kernel(sq_ptr, wa_ptr, a_ptr, b_ptr, n_ptr, n_out, R, s,
                 N_IN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    # n_i² = ‖W_i‖² + Σ_k B_ik (2s·(W Aᵀ)_ik + s²·(B (A Aᵀ))_ik). A Aᵀ (r, r) is summed here in float32 from A,
    # which every program reads (r × in: L2-resident); W Aᵀ comes from cuBLAS, ‖W‖² from the frozen weight's cache.
    # All operands contiguous (rows of R, N_IN): fewer launch arguments, as this runs per layer per step.
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    rmask = rows < n_out
    acc_aa = tl.zeros((BR, BR), dtype=tl.float32)
    for k0 in range(0, N_IN, BK):
        cols = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rr[:, None] * N_IN + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < N_IN),
                    other=0.0).to(tl.float32)  # (BR, BK)
        acc_aa = tl.dot(a, tl.trans(a), acc_aa, input_precision="ieee")
    m2 = rmask[:, None] & (rr[None, :] < R)
    b = tl.load(b_ptr + rows[:, None] * R + rr[None, :], mask=m2, other=0.0).to(tl.float32)  # (BM, BR)
    wa = tl.load(wa_ptr + rows[:, None] * R + rr[None, :], mask=m2, other=0.0).to(tl.float32)
    bg = tl.dot(b, acc_aa, input_precision="ieee")  # B (A Aᵀ)
    sq = tl.load(sq_ptr + rows, mask=rmask, other=0.0) + tl.sum(b * (2.0 * s * wa + s * s * bg), axis=1)
    tl.store(n_ptr + rows, tl.sqrt(tl.maximum(sq, 0.0)), mask=rmask)


@triton.jit
def _scale_kernel(y_ptr, m_ptr, n_ptr, bias_ptr, N, n_out,
                  HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = cols < n_out
    mask = (rows[:, None] < N) & cmask[None, :]
    c = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32) / tl.load(n_ptr + cols, mask=cmask, other=1.0)
    ptrs = y_ptr + rows[:, None].to(tl.int64) * n_out + cols[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * c[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(g_ptr, y_ptr, m_ptr, n_ptr, gc_ptr, part_gy_ptr, part_g_ptr, N, n_out,
                 HAS_BIAS: tl.constexpr, NEED_M: tl.constexpr, ROWS: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr):
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = cols < n_out
    c = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32) / tl.load(n_ptr + cols, mask=cmask, other=1.0)
    acc_gy = tl.zeros((BN,), dtype=tl.float32)
    acc_g = tl.zeros((BN,), dtype=tl.float32)
    for r0 in range(0, ROWS, BM):
        rows = pid_r * ROWS + r0 + tl.arange(0, BM)
        mask = (rows[:, None] < N) & cmask[None, :]
        r64 = rows[:, None].to(tl.int64) * n_out  # g, y and gc: contiguous (N, out)
        g = tl.load(g_ptr + r64 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(gc_ptr + r64 + cols[None, :], (g * c[None, :]).to(gc_ptr.dtype.element_ty), mask=mask)
        if NEED_M:
            y = tl.load(y_ptr + r64 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            acc_gy += tl.sum(g * y, axis=0)
            if HAS_BIAS:
                acc_g += tl.sum(g, axis=0)
    if NEED_M:
        tl.store(part_gy_ptr + pid_r * n_out + cols, acc_gy, mask=cmask)
        if HAS_BIAS:
            tl.store(part_g_ptr + pid_r * n_out + cols, acc_g, mask=cmask)


@triton.jit
def _grad_finish_kernel(part_gy_ptr, part_g_ptr, m_ptr, bias_ptr, dm_ptr, n_parts, n_out,
                        HAS_BIAS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    parts = tl.arange(0, BP)
    cmask = cols < n_out
    mask = (parts[:, None] < n_parts) & cmask[None, :]
    offs = parts[:, None] * n_out + cols[None, :]
    gy = tl.sum(tl.load(part_gy_ptr + offs, mask=mask, other=0.0), axis=0)  # a fixed order: the same sum every run
    if HAS_BIAS:
        gs = tl.sum(tl.load(part_g_ptr + offs, mask=mask, other=0.0), axis=0)
        gy -= tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * gs
    m = tl.load(m_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    tl.store(dm_ptr + cols, (gy / m).to(dm_ptr.dtype.element_ty), mask=cmask)


def _rows_per_program(n_rows: int) -> int:
    """Rows each scale_grad program reduces: GRAD_ROWS, or more for long inputs so there are at most MAX_PARTS."""
    return max(GRAD_ROWS, triton.next_power_of_2(triton.cdiv(n_rows, MAX_PARTS)))


@on_input_device
def weight_norm(sq: torch.Tensor, wa: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """n = ‖W_lin + s·B A‖ per output row (out,) float32, from ‖W_i‖² (out,) float32, W_lin Aᵀ (out, r) in any
    float dtype, lora_a (r, in) and lora_b (out, r): one launch, no (out, in) read."""
    n_out, r = lora_b.shape
    n_in = lora_a.shape[1]
    a, b, wa = lora_a.detach().contiguous(), lora_b.detach().contiguous(), wa.contiguous()
    n = torch.empty(n_out, device=b.device, dtype=torch.float32)
    _norm_kernel[(triton.cdiv(n_out, NORM_BM),)](
        sq, wa, a, b, n, n_out, r, float(scaling),
        N_IN=n_in, BM=NORM_BM, BK=NORM_BK, BR=max(16, triton.next_power_of_2(r)),
    )
    return n


@on_input_device
def scale_columns_(y: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """y (N, out), contiguous, ← y ⊙ (m / n) + bias, in place; returns y. magnitude, norm, bias: (out,)."""
    if not y.is_contiguous():
        raise ValueError("scale_columns_ writes a contiguous (N, out) output in place")
    bias = bias.contiguous() if bias is not None else None
    n_rows, n_out = y.shape
    grid = (triton.cdiv(n_rows, SCALE_BM), triton.cdiv(n_out, SCALE_BN))
    _scale_kernel[grid](
        y, magnitude, norm, bias if bias is not None else y, n_rows, n_out,
        HAS_BIAS=bias is not None, BM=SCALE_BM, BN=SCALE_BN,
    )
    return y


@on_input_device
def scale_grad(g: torch.Tensor, y: torch.Tensor | None, magnitude: torch.Tensor, norm: torch.Tensor,
               bias: torch.Tensor | None, m_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gc = g ⊙ (m / n) (N, out) and, when the output y (N, out) is given, dm = (Σ g ⊙ y − b · Σ g) / m (out,)."""
    g = g.contiguous()
    y = y.contiguous() if y is not None else None
    bias = bias.contiguous() if bias is not None else None
    n_rows, n_out = g.shape
    need_m = y is not None
    gc = torch.empty_like(g)
    rows_per = _rows_per_program(n_rows)
    n_parts = triton.cdiv(n_rows, rows_per)
    has_bias = need_m and bias is not None
    part_gy = torch.empty((n_parts, n_out) if need_m else (1,), device=g.device, dtype=torch.float32)
    part_g = torch.empty((n_parts, n_out) if has_bias else (1,), device=g.device, dtype=torch.float32)
    _grad_kernel[(n_parts, triton.cdiv(n_out, GRAD_BN))](
        g, y if need_m else g, magnitude, norm, gc, part_gy, part_g, n_rows, n_out,
        HAS_BIAS=has_bias, NEED_M=need_m, ROWS=rows_per, BM=GRAD_BM, BN=GRAD_BN,
    )
    if not need_m:
        return gc, None
    dm = torch.empty(n_out, device=g.device, dtype=m_dtype)
    _grad_finish_kernel[(triton.cdiv(n_out, GRAD_BN),)](
        part_gy, part_g, magnitude, bias if has_bias else magnitude, dm, n_parts, n_out, HAS_BIAS=has_bias,
        BP=max(2, triton.next_power_of_2(n_parts)), BN=GRAD_BN,
    )
    return gc, dm


# ------------------------------------------------------------------------------------------- the grouped norm
GROUP_BM, GROUP_BK = 64, 64


@triton.jit
def _group_norm_kernel(base_ptr, meta_ptr, rank_ptr, scale_ptr, prog_ptr, out_ptr, N_COLS: tl.constexpr,
                       IEEE: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    # One program: BM rows of one item's M; every item of a launch has N_COLS columns. n_i = ‖M_i + s·(B A)_i‖,
    # summed tile by tile over the columns in float32, the (BM, BK) tile of B A from one dot of B's rows (BM, r)
    # with A's columns (r, BK): M + s·B A is never stored.
    item = tl.load(prog_ptr + 2 * tl.program_id(0))
    row0 = tl.load(prog_ptr + 2 * tl.program_id(0) + 1)
    # int64 fields: where M, A and B start (in elements from base_ptr, the first item's M), the output offset,
    # rows, M's two strides
    meta = meta_ptr + item * 7
    m_ptr = base_ptr + tl.load(meta)
    a_ptr = base_ptr + tl.load(meta + 1)
    b_ptr = base_ptr + tl.load(meta + 2)
    out_off = tl.load(meta + 3)
    n_rows = tl.load(meta + 4)
    stride_row = tl.load(meta + 5)
    stride_col = tl.load(meta + 6)
    r = tl.load(rank_ptr + item)
    s = tl.load(scale_ptr + item)
    rows = row0 + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    rmask = rows < n_rows
    b = tl.load(b_ptr + rows[:, None] * r + rr[None, :], mask=rmask[:, None] & (rr[None, :] < r),
                other=0.0).to(tl.float32)
    acc = tl.zeros((BM,), dtype=tl.float32)
    row_offs = rows[:, None].to(tl.int64) * stride_row
    for k0 in range(0, N_COLS, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < N_COLS
        w = tl.load(m_ptr + row_offs + cols[None, :].to(tl.int64) * stride_col,
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # (BM, BK)
        a = tl.load(a_ptr + rr[:, None] * N_COLS + cols[None, :], mask=(rr[:, None] < r) & cmask[None, :],
                    other=0.0).to(tl.float32)  # (BR, BK)
        if IEEE:
            ba = tl.dot(b, a, input_precision="ieee")  # float32 factors
        else:
            ba = tl.dot(b, a, input_precision="tf32")  # bf16 / fp16 values are exact in tf32: exact products
        v = w + s * ba
        acc += tl.sum(v * v, axis=1)
    tl.store(out_ptr + out_off + rows, tl.sqrt(acc), mask=rmask)


class _Tables:
    """The device tables of one set of items (pointers, shapes, ranks, scalings, program map), kept while the items'
    storages, shapes and scalings are those they were built for: a training loop builds them once."""

    def __init__(self, key: tuple, items, scalings, device) -> None:
        meta, prog, sizes = [], [], []
        offset = 0
        base, size = items[0][0].data_ptr(), items[0][0].element_size()  # every item: one dtype, so whole elements
        for index, (m, a, b) in enumerate(items):
            n_rows = m.shape[0]
            starts = [(t.data_ptr() - base) // size for t in (m, a, b)]
            meta.append([*starts, offset, n_rows, m.stride(0), m.stride(1)])
            prog.extend((index, row0) for row0 in range(0, n_rows, GROUP_BM))
            sizes.append(n_rows)
            offset += n_rows
        self.key, self.sizes, self.total, self.programs = key, sizes, offset, len(prog)
        self.n_cols = items[0][0].shape[1]  # the same for every item of a launch
        self.meta = torch.tensor(meta, dtype=torch.int64).to(device)
        self.ranks = torch.tensor([a.shape[0] for _, a, _ in items], dtype=torch.int32).to(device)
        self.scales = torch.tensor(scalings, dtype=torch.float32).to(device)
        self.prog = torch.tensor(prog, dtype=torch.int32).to(device)
        self.block_r = max(16, triton.next_power_of_2(max(a.shape[0] for _, a, _ in items)))


_tables: dict[tuple, _Tables] = {}  # by (device, dtype, columns): the last set of items seen there


def grouped_norms(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  scalings: list[float]) -> list[torch.Tensor]:
    """n = ‖M + s·B A‖ per row (rows,) float32 for every (M (rows, cols) any strides, A (r, cols) contiguous,
    B (rows, r) contiguous) item, all with the same number of columns, in one dtype on one device: one launch."""
    m0 = items[0][0]
    key = tuple((m.data_ptr(), m.shape, m.stride(), a.data_ptr(), a.shape, b.data_ptr()) for m, a, b in items)
    key = (key, tuple(scalings))
    slot = (m0.device, m0.dtype, m0.shape[1])
    tables = _tables.get(slot)
    if tables is None or tables.key != key:
        tables = _tables[slot] = _Tables(key, items, scalings, m0.device)
    return list(torch.split(_launch_group(m0, tables), tables.sizes))


@on_input_device
def _launch_group(m0: torch.Tensor, tables: _Tables) -> torch.Tensor:
    out = torch.empty(tables.total, device=m0.device, dtype=torch.float32)
    _group_norm_kernel[(tables.programs,)](
        m0, tables.meta, tables.ranks, tables.scales, tables.prog, out, N_COLS=tables.n_cols,
        IEEE=m0.dtype is torch.float32, BR=tables.block_r, BM=GROUP_BM, BK=GROUP_BK,
    )
    return out
