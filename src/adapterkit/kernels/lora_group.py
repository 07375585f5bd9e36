"""Fused LoRA linears of sibling projections, layers that read one input (q/k/v, gate/up), as one autograd node.

    y_i = x W_iᵀ + bias_i + s_i · (x A_iᵀ) B_iᵀ          for each sibling i; W_i frozen; gradients for x, A_i, B_i

Each sibling alone (`lora_linear`) reads x once for x·A_iᵀ in forward and once for dA_i in backward, and its input
gradient is a tensor of x's size that autograd then adds to the others'. Here, with A = [A_1; …; A_n] (R = Σ r_i rows):
- forward: xa = x·Aᵀ, one GEMM for every sibling (x read once); then per sibling s_i·xa_i·B_iᵀ (+ bias) written first
  and x·W_iᵀ accumulated onto it (beta=1), as in `lora_linear`;
- backward: G = [s_1·dY_1·B_1, …] (N, R); dB_i = s_i·dY_iᵀ·xa_i; dA = Gᵀ·x, one GEMM (x read once); dX = G·A, one
  GEMM written once, then every dY_i·W_i accumulated onto it (beta=1): no per-sibling input gradients to add up.

One fewer read of x per extra sibling in each direction, one (N, in) gradient fewer to allocate, write and add, and
fewer launches. On an H200 (bench/README.md, "sixth pass"), all-linear r=16 on a Llama-3.2-1B shape, the training
step took 2.4% less time on bf16 and 7.9% less on an NF4 base in one process with and without it, where each GEMM
fewer is also less of bitsandbytes' host work. Dropout is not fused here (p must be 0: the siblings' masks are
independent draws); `methods/lora_siblings.py` decides when this runs.
"""

from __future__ import annotations

import torch

from .lora_linear import _scaled_mm, rank_kernel
from .recompute import input_recipe


class _GroupedLoraFn(torch.autograd.Function):
    """apply(x, n, joint, *(W_i, bias_i, A_i, B_i, s_i) for each of n siblings) -> (y_1, …, y_n).

    W_i is the (out_i, in) weight or, for a packed base, a zero-argument callable returning it dequantized (called
    in forward and again in backward). `joint`, where not None, is one such callable for all of them, returning the
    weights stacked (Σ out_i, in) (one 4-bit dequantize launch for the group, `dequant4.py`); the W_i are not called
    then. Outputs that get no gradient come back as None (grads not materialised), and their sibling's dA and dB are
    None then, as for a layer whose output was not used."""

    @staticmethod
    def forward(ctx, x, n, joint, *flat):
        ctx.set_materialize_grads(False)
        lead, n_in = x.shape[:-1], x.shape[-1]
        x2d = x.reshape(-1, n_in)  # (N, in); a view of a contiguous x, so saving it costs nothing
        weights, biases, lora_as, lora_bs, scales = flat[0::5], flat[1::5], flat[2::5], flat[3::5], flat[4::5]
        a_cat = torch.cat(lora_as)  # (R, in): tiny
        ranks = tuple(a.shape[0] for a in lora_as)
        fused = rank_kernel(x2d, a_cat, tuple(zip(lora_bs, biases, scales))) if x.is_cuda else None
        if fused is not None:
            xa, rank_outs = fused  # x·Aᵀ and every s_i·xa_i·B_iᵀ (+ bias) in one launch
        else:
            xa, rank_outs = torch.mm(x2d, a_cat.t()), None  # (N, R): x read once for every sibling
        if joint is not None:
            stacked = joint()  # (Σ out_i, in)
            weights = tuple(stacked[start:start + rows] for start, rows in joint.rows)
        outs = []
        start = 0
        for i, (weight, bias, lora_b, s, r) in enumerate(zip(weights, biases, lora_bs, scales, ranks)):
            if rank_outs is not None:
                out = rank_outs[i]
            else:
                out = _scaled_mm(xa[:, start:start + r], lora_b.t(), s, bias)  # (N, out_i) = s·xa_i·B_iᵀ (+ bias)
            start += r
            out.addmm_(x2d, (weight() if callable(weight) else weight).t())  # += x·W_iᵀ in the GEMM's epilogue
            outs.append(out.view(*lead, out.shape[-1]))

        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_a = tuple(needs[5 + 5 * i] for i in range(n))
        need_b = tuple(needs[6 + 5 * i] for i in range(n))
        need_g = need_x or any(need_a)
        ctx.n, ctx.ranks, ctx.scales, ctx.lead, ctx.n_in = n, ranks, scales, lead, n_in
        ctx.need_a, ctx.need_b = need_a, need_b
        ctx.joint = joint if need_x else None
        ctx.weight_fns = tuple(w if callable(w) else None for w in weights) if need_x and joint is None else None
        ctx.x_recipe = input_recipe(x) if any(need_a) else None  # rebuild x in backward where it can (recompute.py)
        # The factors themselves, not their concatenation: they are alive anyway, a copy would not be (remade in
        # backward, it is R·in elements).
        ctx.save_for_backward(
            x2d if any(need_a) and ctx.x_recipe is None else None,
            xa if any(need_b) else None,
            *(a if need_x else None for a in lora_as),
            *(b if need_g else None for b in lora_bs),
            *(w if need_x and joint is None and not callable(w) else None for w in weights),
        )
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        n, ranks, scales = ctx.n, ctx.ranks, ctx.scales
        saved = ctx.saved_tensors
        x2d, xa = saved[:2]
        lora_as, lora_bs, weights = saved[2:2 + n], saved[2 + n:2 + 2 * n], saved[2 + 2 * n:2 + 3 * n]
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.need_a, ctx.need_b
        grads = [None] * (3 + 5 * n)
        dy2d = [None if dy is None else dy.reshape(-1, dy.shape[-1]) for dy in dys]
        live = [i for i in range(n) if dy2d[i] is not None]
        if not live:
            return tuple(grads)
        first = dy2d[live[0]]
        want_a = any(need_a[i] for i in live)
        g_cat = None
        if need_x or want_a:
            g_cat = torch.empty(first.shape[0], sum(ranks), device=first.device, dtype=first.dtype)  # (N, R)
        start = 0
        for i, (r, s, dy) in enumerate(zip(ranks, scales, dy2d)):
            cols = slice(start, start + r)
            start += r
            if dy is None:
                if g_cat is not None:
                    g_cat[:, cols].zero_()
                continue
            if need_b[i]:
                grads[6 + 5 * i] = _scaled_mm(dy.t(), xa[:, cols], s)  # dB_i = s·dY_iᵀ·xa_i (out_i, r_i)
            if g_cat is not None:
                g_cat[:, cols].addmm_(dy, lora_bs[i], beta=0, alpha=s)  # s·dY_i·B_i, into G's columns
        if want_a:
            if ctx.x_recipe is not None:
                x2d = ctx.x_recipe().reshape(-1, ctx.n_in)  # bit-identical to the forward's x
            da_cat = torch.mm(g_cat.t(), x2d)  # (R, in): x read once for every sibling
            start = 0
            for i, r in enumerate(ranks):
                if need_a[i] and dy2d[i] is not None:
                    grads[5 + 5 * i] = da_cat[start:start + r]
                start += r
        if need_x:
            dx = torch.mm(g_cat, torch.cat(lora_as))  # (N, in) = Σ s_i·g_i·A_i, written once
            if ctx.joint is not None:
                stacked = ctx.joint()  # dequantized again, as in forward
                weights = tuple(stacked[start:start + rows] for start, rows in ctx.joint.rows)
            for i in live:
                fn = ctx.weight_fns[i] if ctx.weight_fns is not None else None
                dx.addmm_(dy2d[i], fn() if fn is not None else weights[i])  # += dY_i·W_i in the GEMM's epilogue
            grads[0] = dx.view(*ctx.lead, ctx.n_in)
        return tuple(grads)


def grouped_lora_linear(x: torch.Tensor, specs: list[tuple], joint=None) -> tuple[torch.Tensor, ...]:
    """Every sibling's `lora_linear(x, W_i, bias_i, A_i, B_i, s_i)` (p = 0) as one node; `specs` holds each
    sibling's (W_i or its dequantizer, bias_i, A_i, B_i, s_i), all in x's dtype with frozen W_i and bias_i (the
    caller checks). `joint`: None, or one dequantizer for every W_i, returning them stacked (Σ out_i, in), with
    `rows`, each sibling's (first row, rows) in that stack (`dequant4.JointDequant4`). Returns the outputs in the
    order of `specs`."""
    return _GroupedLoraFn.apply(x, len(specs), joint, *(t for spec in specs for t in spec))
