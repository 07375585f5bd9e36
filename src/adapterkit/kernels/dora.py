"""DoRA numerics: the detached weight norm, the DoRA linear as one autograd node, embedding forward and merge.

Semantics match PEFT's `LoraConfig(use_dora=True)` (peft 0.21), learned from its source:

Notation: W_lin is the base weight as an (out, in) matrix, s the LoRA scaling (alpha / r, or alpha / sqrt(r) with
rsLoRA), A = lora_A (r, in), B = lora_B (out, r), m = lora_magnitude_vector (out,), and
    n = ||W_lin + s·B A||₂ over the `in` axis, one value per output row, shape (out,), always DETACHED
(no gradient flows into n, per section 4.3 of the DoRA paper), c = m / n.

Per layer type (what is "out" and "in" and how the stored weight maps to W_lin):
- nn.Linear: weight stored (out, in), W_lin = weight. m has shape (out_features,).
- HF Conv1D (fan_in_fan_out): weight stored (in, out), W_lin = weightᵀ; A is (r, in), B is (out, r) as for
  nn.Linear. m has shape (out,) = (nf,), the norm runs over the stored weight's first axis.
- nn.Embedding: weight stored (V, D); lora_embedding_A is (r, V), lora_embedding_B is (D, r), and PEFT treats the
  weight as fan_in_fan_out, so W_lin = weightᵀ (D, V): n and m have shape (D,) = (embedding_dim,) and the norm runs
  over the VOCABULARY axis (a column norm of the embedding table), not over each token's row.

Init: m = n computed at attach time from the initial A, B, so c = 1 at step 0 and the layer computes
x (W_lin + sBA)ᵀ + b — the base itself with PEFT's default B = 0. PEFT takes n in the input's dtype (W and BA
cast to it); here n is always float32 (identical for fp32, more accurate for bf16). Linear casts x to lora_A's dtype.

Linear / Conv1D forward (x: (N, in), y: (N, out); bias b is never scaled by c):
- no dropout, or eval mode:  y = b + c ⊙ (x W_linᵀ + s·(x Aᵀ) Bᵀ)
  (PEFT writes it as base(x) + (c-1) ⊙ (x W_linᵀ) + c ⊙ s·(x Aᵀ)Bᵀ, taking the bias back out of base(x)).
- dropout active (training, p > 0), x_d = dropout(x): the base output keeps the undropped x and the DoRA part
  recomputes the base product on x_d, without bias:
      y = x W_linᵀ + b + (c-1) ⊙ (x_d W_linᵀ) + c ⊙ s·(x_d Aᵀ) Bᵀ
  so the result is NOT the no-dropout formula applied to x_d: the term (x - x_d) W_linᵀ survives.
Embedding forward (ids: (...,), no dropout, no bias; E = F.embedding):
      y = c ⊙ (E(ids, weight) + s·E(ids, Aᵀ) Bᵀ)        c broadcast over the last (D) axis
  (a model-specific embedding scale, as Gemma's, multiplies both terms after the norm is taken.)
Merge (all three types, delta = s·B A as (out, in), transposed to the stored layout for Conv1D / Embedding):
      W' = c ⊙ (W + delta)     c as a column (out, 1) for nn.Linear, as a row (1, out) for Conv1D and Embedding,
  with n taken from the UNMERGED weight. PEFT's unmerge is arithmetic, W = W' / c - delta, with the n cached at
  merge time (n of W' would differ); it does not give back W bit-exactly.

Implementation notes. `dora_weight_norm` never forms the (out, in) matrix W_lin + sBA:
      n_i² = ||W_i||² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·Σ_k (B (A Aᵀ))_ik B_ik
needs only (out, r) and (r, r) products; ||W_i||² of a frozen base can come from `cached_weight_sq_norm`.
`dora_linear` is one autograd node that saves x, x·Aᵀ and (unless `recompute=True`) the (N, out) pre-scale output
needed for m's gradient; with dropout it keeps only the seed and regenerates the mask rather than storing x_d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .dora_reference import dora_linear_reference
from .lora_linear import _scaled_mm, get_backend, torch_keep_mask
from .optional_triton import kernels

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton():
    """The Triton kernels module, or None where Triton cannot run (see optional_triton)."""
    return kernels("_triton_dora")


def _use_triton(t: torch.Tensor) -> bool:
    """The DoRA Triton passes run on CUDA unless the LoRA backend is set to "torch" (kernels.set_backend)."""
    return t.is_cuda and get_backend() != "torch" and not torch.compiler.is_compiling() and _triton() is not None

# Rows of W cast to float32 at a time when W is not float32 (bf16/fp16 base): bounds the temporary to this many
# elements instead of a full float32 copy of W.
_CAST_BLOCK_ELEMS = 1 << 20


def _as_out_in(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The stored weight as an (out, in) view: itself for nn.Linear, its transpose for Conv1D / Embedding."""
    if weight.dim() != 2:
        raise ValueError(f"DoRA kernels take a 2-D weight, got shape {tuple(weight.shape)}")
    return weight.t() if fan_in_fan_out else weight


def _row_blocks(w_lin: torch.Tensor):
    """(start, stop) row ranges of w_lin (out, in) small enough to cast to float32 one at a time."""
    n_out, n_in = w_lin.shape
    if w_lin.dtype == torch.float32:
        yield 0, n_out
        return
    step = max(1, _CAST_BLOCK_ELEMS // max(1, n_in))
    for start in range(0, n_out, step):
        yield start, min(n_out, start + step)


def row_sq_norm(weight: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """||W_i||² per output row of the base weight, float32, shape (out,), without a float32 copy of W.

    Args:
        weight: (out, in), or (in, out) when `fan_in_fan_out` (HF Conv1D, and nn.Embedding's (V, D) table).
    """
    with torch.no_grad():
        w_lin = _as_out_in(weight, fan_in_fan_out)
        parts = [
            torch.linalg.vector_norm(w_lin[i:j].float(), dim=1).square_() for i, j in _row_blocks(w_lin)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class _SqNormCache:
    """||W||² per frozen base weight, recomputed only when the tensor changed.

    An entry is keyed on the tensor object (weakly: it dies with the tensor) and is valid while the tensor's
    `_version`, `data_ptr()`, shape, dtype and device are those seen when it was stored. In-place ops bump
    `_version`; `param.data = other`, `.to()`, merges that swap storage change `data_ptr()`. Writes through a
    `.data` alias (`param.data.add_(...)`) bump neither: call `clear()` (or `forget(weight)`) after such a write.
    """

    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    @staticmethod
    def _stamp(weight: torch.Tensor, fan_in_fan_out: bool) -> tuple:
        return (weight._version, weight.data_ptr(), tuple(weight.shape), weight.dtype, weight.device, fan_in_fan_out)

    def get(self, weight: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
        stamp = self._stamp(weight, fan_in_fan_out)
        hit = self._entries.get(weight)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = row_sq_norm(weight, fan_in_fan_out)
        self._entries[weight] = (stamp, value)
        return value

    def forget(self, weight: torch.Tensor) -> None:
        self._entries.pop(weight, None)

    def clear(self) -> None:
        self._entries = WeakIdKeyDictionary()

    def __len__(self) -> int:
        return len(self._entries)


weight_sq_norm_cache = _SqNormCache()


def cached_weight_sq_norm(weight: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """`row_sq_norm(weight)` (out,) float32, computed once per version of `weight` (see `_SqNormCache`)."""
    return weight_sq_norm_cache.get(weight, fan_in_fan_out)


def dora_weight_norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
    weight_sq_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """n = ||W_lin + s·B A||₂ per output row, float32 (out,), detached, without forming an (out, in) matrix.

        n_i² = ||W_i||² + 2s·Σ_k B_ik (W_lin Aᵀ)_ik + s²·Σ_k (B (A Aᵀ))_ik B_ik,  clamped at 0 before sqrt

    Args:
        weight: base weight, (out, in) for nn.Linear; (in, out) with `fan_in_fan_out` for HF Conv1D; the (V, D)
            embedding table with `fan_in_fan_out=True` for nn.Embedding (then out = D: PEFT's column norm).
        lora_a: (r, in) — lora_A.weight, or lora_embedding_A (r, V).
        lora_b: (out, r) — lora_B.weight, or lora_embedding_B (D, r).
        scaling: s.
        weight_sq_norm: optional precomputed ||W_i||² (out,), e.g. from `cached_weight_sq_norm`.

    All products run in float32 (bf16/fp16 weights are cast block by block). Non-finite factors give non-finite n.
    """
    w_lin = _as_out_in(weight, fan_in_fan_out)  # (out, in) view
    n_out, n_in = w_lin.shape
    if lora_a.shape[1] != n_in or lora_b.shape[0] != n_out or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(
            f"DoRA factors do not fit the weight: weight as (out, in) = {(n_out, n_in)}, "
            f"lora_a {tuple(lora_a.shape)} (expected (r, {n_in})), lora_b {tuple(lora_b.shape)} "
            f"(expected ({n_out}, r))"
        )
    if weight_sq_norm is None:
        weight_sq_norm = row_sq_norm(weight, fan_in_fan_out)
    if w_lin.dtype in _TRITON_DTYPES and _use_triton(w_lin):
        # W Aᵀ on cuBLAS (W's dtype, float32 sums), the rest in one launch: 2 launches instead of ~10. This runs per
        # layer and step (A changes with every optimizer step), so it stays short: detached operands, no context.
        a = lora_a.detach()
        wa = torch.mm(w_lin.detach(), (a if a.dtype is w_lin.dtype else a.to(w_lin.dtype)).t())  # (out, r)
        return _triton().weight_norm(weight_sq_norm.float(), wa, a, lora_b.detach(), scaling)
    with torch.no_grad():
        a = lora_a.detach().float()  # (r, in)
        b = lora_b.detach().float()  # (out, r)
        if w_lin.dtype == torch.float32:
            wa = w_lin @ a.t()  # (out, r)
        elif w_lin.is_cuda:
            # One tensor-core GEMM in the weight's dtype (float32 accumulation, the (out, r) result rounded once);
            # casting W block by block to float32 was ~1,000 small launches per step on a 1B model.
            wa = (w_lin @ a.to(w_lin.dtype).t()).float()
        else:
            wa = torch.cat([w_lin[i:j].float() @ a.t() for i, j in _row_blocks(w_lin)])  # (out, r)
        # n² = ‖W‖² + rowsum(B ⊙ (2s·W Aᵀ + s²·B (A Aᵀ))): few launches, as this runs per layer per step.
        cross = torch.addmm(wa, b, a @ a.t(), beta=2.0 * scaling, alpha=scaling * scaling)  # (out, r)
        sq = torch.linalg.vecdot(b, cross).add_(weight_sq_norm.float())
        return sq.clamp_(min=0.0).sqrt_()  # (out,)


class _DoraLinearFn(torch.autograd.Function):
    """y = x W_linᵀ + b + (c-1) ⊙ (x_d W_linᵀ) + c ⊙ s·(x_d Aᵀ) Bᵀ, c = m / n with n given (detached).

    Without dropout x_d = x and the first and third terms fold: y = b + c ⊙ (x W_linᵀ + s·(x Aᵀ) Bᵀ).
    Gradients, with g = dY (N, out), gc = c ⊙ g, y_pre = x_d W_linᵀ + s·(x_d Aᵀ) Bᵀ:
        dm = Σ_N (g ⊙ y_pre) / n;   dB = s·gcᵀ (x_d Aᵀ);   dA = s·(gc B)ᵀ x_d
        dx = g W_lin + ((gc - g) W_lin + s·(gc B) A) ⊙ keep / (1-p)     (= gc W_lin + s·(gc B) A without dropout)
    """

    @staticmethod
    def forward(ctx, x, w_lin, bias, lora_a, lora_b, magnitude, norm, scaling, p, seed, recompute, from_output,
                use_triton):
        lead, n_in = x.shape[:-1], x.shape[-1]
        x2d = x.reshape(-1, n_in)  # (N, in)
        mask = torch_keep_mask(x2d.shape, p, seed, x.device) if p > 0.0 else None
        xd = x2d * mask * (1.0 / (1.0 - p)) if mask is not None else x2d  # (N, in)
        need_x, need_a, need_b, need_m = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        # from_output (no dropout): m's gradient needs y_pre / n = (out - b) / m, and `out` is usually saved by the
        # next op anyway (RoPE, SiLU, the gate product share its storage), so keeping it costs little.
        from_output = from_output and mask is None and need_m
        # The Triton passes (no dropout): c = m / n applied to the output and to dY inside one pass each.
        fast = use_triton and mask is None and (from_output or not need_m)
        c_minus_1 = None if fast else (magnitude.detach().float() / norm - 1.0).to(x.dtype)  # (out,)

        xa = xd @ lora_a.t()  # (N, r)
        # s·(x_d Aᵀ) Bᵀ first, then the base GEMM accumulates onto it (beta=1: the add rides in its epilogue).
        y_pre = _scaled_mm(xa, lora_b.t(), scaling)  # (N, out)
        y_pre.addmm_(xd, w_lin.t())
        if fast:
            out = _triton().scale_columns_(y_pre, magnitude.detach(), norm, bias)
        elif mask is None:
            keeps_y = ctx.needs_input_grad[5] and not (recompute or from_output)
            out = y_pre * (c_minus_1 + 1) if keeps_y else y_pre.mul_(c_minus_1 + 1)  # c ⊙ y_pre
            if bias is not None:
                out.add_(bias)
        else:
            # (c-1) ⊙ (x_d W_linᵀ) + c ⊙ s·lora_d = (c-1) ⊙ y_pre + s·lora_d: x_d W_linᵀ lives only in y_pre.
            out = torch.addmm(bias, x2d, w_lin.t()) if bias is not None else x2d @ w_lin.t()  # base on undropped x
            out.addmm_(xa, lora_b.t(), alpha=scaling).addcmul_(y_pre, c_minus_1)

        ctx.scaling, ctx.p, ctx.seed, ctx.lead, ctx.fast = scaling, p, seed, lead, fast
        ctx.x2d_shape, ctx.m_dtype = x2d.shape, magnitude.dtype
        ctx.from_output = from_output
        recompute = recompute and not from_output
        keep_y = need_m and not recompute and not from_output
        ctx.save_for_backward(
            x2d if (need_a or (need_m and recompute)) else None,
            w_lin if (need_x or (need_m and recompute)) else None,
            lora_a if (need_x or need_a) else None,
            lora_b if (need_x or need_a or (need_m and recompute)) else None,
            xa if (need_b or (need_m and recompute)) else None,
            c_minus_1,
            norm,
            y_pre if keep_y else None,
            out if from_output else None,
            bias if from_output else None,
            magnitude.detach() if from_output or fast else None,
        )
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, w_lin, lora_a, lora_b, xa, c_minus_1, norm, y_pre, out, bias, magnitude = ctx.saved_tensors
        need_x, need_a, need_b, need_m = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        s, p = ctx.scaling, ctx.p
        g = dy.reshape(-1, dy.shape[-1])  # (N, out)
        dx = da = db = dm = None
        if ctx.fast:  # gc = c ⊙ g and m's gradient from the saved output, one pass over g
            gc, dm = _triton().scale_grad(g, out if need_m else None, magnitude, norm, bias, ctx.m_dtype)
        else:
            gc = g * (c_minus_1 + 1)  # c ⊙ g
        g_c1 = gc - g if p > 0.0 else None  # (c-1) ⊙ g, only the dropout path needs it
        mask = None
        if p > 0.0 and (need_x or need_a or (need_m and y_pre is None)):
            mask = torch_keep_mask(ctx.x2d_shape, p, ctx.seed, g.device)  # regenerated from the seed, never stored
        if need_m and ctx.from_output and not ctx.fast:
            # Σ_N g ⊙ y_pre / n = Σ_N g ⊙ (out - b) / m: one product pass, reduced in float32.
            dm = (g * out).sum(0, dtype=torch.float32)
            if bias is not None:
                dm -= bias.float() * g.sum(0, dtype=torch.float32)
            dm = dm.div_(magnitude.float()).to(ctx.m_dtype)
        elif need_m and not ctx.fast:
            if y_pre is None:  # recompute: x_d W_linᵀ + s·(x_d Aᵀ) Bᵀ
                xd = x2d * mask * (1.0 / (1.0 - p)) if mask is not None else x2d
                y_pre = xd @ w_lin.t()
                y_pre.addmm_(xa, lora_b.t(), alpha=s)
            dm = (g * y_pre).sum(0, dtype=torch.float32).div_(norm).to(ctx.m_dtype)  # (out,)
        if need_b:
            db = _scaled_mm(gc.t(), xa, s)  # (out, r)
        if need_x or need_a:
            gcb = gc @ lora_b  # (N, r)
            if need_a:
                xd = x2d * mask * (1.0 / (1.0 - p)) if mask is not None else x2d
                da = _scaled_mm(gcb.t(), xd, s)  # (r, in)
            if need_x:
                dx = _scaled_mm(gcb, lora_a, s)  # (N, in), scaled inside the GEMM
                if mask is None:
                    dx.addmm_(gc, w_lin)
                else:
                    dx.addmm_(g_c1, w_lin).mul_(mask).mul_(1.0 / (1.0 - p))
                    dx.addmm_(g, w_lin)  # the undropped base path
                dx = dx.view(*ctx.lead, dx.shape[-1])
        return dx, None, None, da, db, dm, None, None, None, None, None, None, None


class _DoraFastFn(torch.autograd.Function):
    """`_DoraLinearFn`'s path on CUDA without dropout, with the Triton passes: y = (x W_linᵀ + s·(x Aᵀ) Bᵀ) ⊙ c + b.

    A separate node because the DoRA step on a 1B model is bound by the host issuing it (about 14 launches per layer
    and step): this one does the same GEMMs and passes as `_DoraLinearFn` with `fast` set and from the output, with
    none of its dropout and recompute branches. Saves x, W_lin, A, B, x·Aᵀ, n, the output, the bias and m.
    """

    @staticmethod
    def forward(ctx, x, w_lin, bias, lora_a, lora_b, magnitude, norm, scaling):
        x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        xa = torch.mm(x2d, lora_a.t())  # (N, r)
        y = _scaled_mm(xa, lora_b.t(), scaling)  # s·(x Aᵀ) Bᵀ, then the base GEMM accumulates onto it
        y.addmm_(x2d, w_lin.t())
        out = _triton().scale_columns_(y, magnitude, norm, bias)  # ⊙ m / n, + bias, in place
        ctx.scaling, ctx.lead = scaling, x.shape[:-1]
        ctx.save_for_backward(x2d, w_lin, lora_a, lora_b, xa, norm, out, bias, magnitude)
        return out.view(*ctx.lead, out.shape[1])

    @staticmethod
    def backward(ctx, dy):
        x2d, w_lin, lora_a, lora_b, xa, norm, out, bias, magnitude = ctx.saved_tensors
        need_x, _, _, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        s = ctx.scaling
        g = dy.reshape(-1, dy.shape[-1])  # (N, out)
        gc, dm = _triton().scale_grad(g, out if need_m else None, magnitude, norm, bias, magnitude.dtype)
        dx = da = db = None
        if need_b:
            db = _scaled_mm(gc.t(), xa, s)  # (out, r)
        if need_x or need_a:
            gcb = torch.mm(gc, lora_b)  # (N, r)
            if need_a:
                da = _scaled_mm(gcb.t(), x2d, s)  # (r, in)
            if need_x:
                dx = _scaled_mm(gcb, lora_a, s)
                dx = dx.addmm_(gc, w_lin).view(*ctx.lead, x2d.shape[1])  # + c ⊙ dY W_lin
        return dx, None, None, da, db, dm, None, None


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    weight_sq_norm: torch.Tensor | None = None,
    *,
    fan_in_fan_out: bool = False,
    seed: int | None = None,
    recompute: bool = False,
    from_output: bool = False,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """PEFT's DoRA output of a Linear / Conv1D layer (base included), differentiable for x, A, B and m.

        y = b + c ⊙ (x W_linᵀ + s·(x Aᵀ) Bᵀ)                                     no dropout / eval
        y = x W_linᵀ + b + (c-1) ⊙ (x_d W_linᵀ) + c ⊙ s·(x_d Aᵀ) Bᵀ              dropout, x_d = dropout(x)
        c = m / n,  n = ||W_lin + s·B A|| per output row, detached (see `dora_weight_norm`)

    Args:
        x: (..., in). weight: (out, in), or (in, out) with `fan_in_fan_out` (HF Conv1D); frozen.
        bias: (out,) or None, frozen. lora_a: (r, in). lora_b: (out, r). magnitude: (out,) lora_magnitude_vector.
        scaling: s = alpha / r (alpha / sqrt(r) for rsLoRA).
        dropout_p, training: dropout on the adapter path, active only when training and p > 0.
        weight_sq_norm: ||W_i||² (out,) float32 of the frozen base, e.g. `cached_weight_sq_norm(weight)`; computed
            from `weight` when None.
        seed: dropout seed (drawn from torch's default generator when None); the keep-mask is
            `lora_linear.torch_keep_mask(x.reshape(-1, in).shape, p, seed, x.device)`.
        recompute: recompute x_d W_linᵀ in backward for m's gradient instead of saving the (N, out) pre-scale output:
            less saved memory, one more (N, in, out) GEMM per backward.
        from_output: without dropout, take m's gradient from the saved output, Σ g ⊙ (y - b) / m, instead of the
            pre-scale output: no extra GEMM, and the output is usually kept by the next op anyway. (m must be
            non-zero; a zero magnitude gives a non-finite gradient for that row.) With dropout: `recompute`.
        norm: n when the caller has it (cached while A, B and W are unchanged); computed here when None.

    Returns (..., out) in x's dtype. Adapters in another dtype than x are cast to it (differentiably).
    Falls back to `dora_linear_reference` (same values, more saved memory) when the base weight or bias requires
    grad, or under autocast.
    """
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if norm is None:
        norm = dora_weight_norm(weight, lora_a, lora_b, scaling, fan_in_fan_out, weight_sq_norm)  # (out,) fp32
    dtype = x.dtype
    if (p == 0.0 and from_output and x.is_cuda and dtype is weight.dtype and dtype is lora_a.dtype
            and dtype is lora_b.dtype and (bias is None or bias.dtype is dtype) and dtype in _TRITON_DTYPES
            and not weight.requires_grad and (bias is None or not bias.requires_grad)
            and not torch.is_autocast_enabled("cuda") and _use_triton(x)):
        # The common training and serving case on a GPU: the lean node (the host issues this per layer and step).
        return _DoraFastFn.apply(x, weight.t() if fan_in_fan_out else weight, bias, lora_a, lora_b, magnitude, norm,
                                 float(scaling))
    if p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    base_trainable = (weight.requires_grad or (bias is not None and bias.requires_grad)) and torch.is_grad_enabled()
    if base_trainable or torch.is_autocast_enabled(x.device.type):
        mask = torch_keep_mask(x.reshape(-1, x.shape[-1]).shape, p, seed, x.device).view(x.shape) if p else None
        return dora_linear_reference(
            x, weight, bias, lora_a, lora_b, magnitude, scaling, p, p > 0.0, mask, fan_in_fan_out=fan_in_fan_out
        )
    w_lin = _as_out_in(weight, fan_in_fan_out).to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    return _DoraLinearFn.apply(x, w_lin, bias, a, b, magnitude, norm, float(scaling), p, seed, recompute,
                               from_output, _use_triton(x))


def dora_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    weight_sq_norm: torch.Tensor | None = None,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """PEFT's DoRA embedding output: c ⊙ (weight[ids] + s·Aᵀ[ids] Bᵀ), c = m / n over the vocabulary axis.

    Args:
        ids: (...) token ids. weight: (V, D) frozen table. lora_a: (r, V) lora_embedding_A. lora_b: (D, r)
            lora_embedding_B. magnitude: (D,). weight_sq_norm: optional ||W[:, d]||² (D,), e.g.
            `cached_weight_sq_norm(weight, fan_in_fan_out=True)`.
    Returns (..., D). Plain ops (the rank-r lookup is already cheap); no dropout, as in PEFT.
    """
    norm = dora_weight_norm(weight, lora_a, lora_b, scaling, True, weight_sq_norm)  # (D,)
    c = (magnitude / norm).to(weight.dtype)  # (D,), differentiable for m only
    base = F.embedding(ids, weight, padding_idx=padding_idx)  # (..., D)
    low = F.embedding(ids, lora_a.t(), padding_idx=padding_idx) @ lora_b.t()  # (..., r) @ (r, D)
    return c * (base + scaling * low)


def dora_delta_merge(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """The merged weight c ⊙ (W + s·B A) in float32, in the stored layout of `weight`, n from the unmerged W.

    Args:
        weight: (out, in) nn.Linear; (in, out) with `fan_in_fan_out` for Conv1D; (V, D) with `fan_in_fan_out=True`
            for nn.Embedding. lora_a: (r, in). lora_b: (out, r). magnitude: (out,).
    Returns a new float32 tensor of weight's shape; the caller casts it and keeps whatever it needs to restore W.
    """
    with torch.no_grad():
        norm = dora_weight_norm(weight, lora_a, lora_b, scaling, fan_in_fan_out)  # (out,)
        c = magnitude.detach().float() / norm  # (out,)
        a, b = lora_a.detach().float(), lora_b.detach().float()
        if fan_in_fan_out:  # stored (in, out): delta = s·Aᵀ Bᵀ, c scales columns
            merged = torch.addmm(weight.float(), a.t(), b.t(), alpha=scaling)
            return merged.mul_(c.view(1, -1))
        merged = torch.addmm(weight.float(), b, a, alpha=scaling)  # (out, in)
        return merged.mul_(c.view(-1, 1))


def dora_unmerge(
    merged: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    norm: torch.Tensor,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """PEFT's arithmetic unmerge W = W' / c - s·B A (float32), with `norm` the n of the unmerged weight.

    Only approximate in finite precision; restoring a kept copy of W is the exact way back.
    """
    with torch.no_grad():
        c = magnitude.detach().float() / norm.float()
        a, b = lora_a.detach().float(), lora_b.detach().float()
        if fan_in_fan_out:
            return torch.addmm(merged.float() / c.view(1, -1), a.t(), b.t(), alpha=-scaling)
        return torch.addmm(merged.float() / c.view(-1, 1), b, a, alpha=-scaling)
