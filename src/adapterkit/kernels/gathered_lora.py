"""Gathered LoRA: per-row low-rank updates for a batch in which each row uses its own adapter (or none).

    out[b, t] = y[b, t] + (x[b, t] A[s_b]ᵀ) B[s_b]ᵀ        s_b = index[b]: the slot of row b's adapter

Tables hold every adapter of a layer padded to one rank R (zero padding keeps the products exact) with the scaling
folded into B; slot 0 is all zeros (rows without an adapter). On CUDA (bf16/fp16/fp32, no autograd) one Triton
launch covers the whole batch (a decode kernel for one token per row); elsewhere the plain-PyTorch reference runs
(a gather and two bmm).
`RoutedLinear` is one layer's update for a routed block, with the path and launch settled once when it is made.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from ..errors import ConfigError

_triton_mod = None  # the imported _triton_gathered module, False when Triton is unusable, None before the first try
# "auto": the Triton kernel for decode (one token per row) only. Measured on an H200 (bench/serve.py, Llama-3.2-1B
# shape, bf16): at prefill (32x256, 8 adapters) the torch gather path took 57.7 ms and the tl.dot kernel 84.5 ms.
# "torch" / "triton" force one path.
_BACKEND = os.environ.get("ADAPTERKIT_GATHERED_BACKEND", "auto")
# Triton's CPU interpreter runs kernels on CPU tensors: then the kernel path is taken off CUDA too (tests, debugging).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_rows(x: torch.Tensor, index: torch.Tensor) -> None:
    if x.dim() < 2 or x.shape[0] != index.shape[0]:
        raise ConfigError(
            f"routed batch has {index.shape[0]} rows but a layer got an input of shape {tuple(x.shape)}; routing "
            "needs the batch as the first dimension of every adapted layer's input (no beam search or "
            "num_return_sequences > 1 inside routed(), and one route per batch row)."
        )


def gathered_lora_reference(
    x: torch.Tensor, a_table: torch.Tensor, b_table: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(x A[s]ᵀ) B[s]ᵀ per row (+ out), each step a plain op, in the tables' dtype.

    Args:
        x: (rows, ..., in) the layer input, rows first.
        a_table: (slots, R, in); b_table: (slots, out, R) with the scaling folded in.
        index: (rows,) long, the slot of each row.
        out: optional (rows, ..., out) base output to add the update to (not modified).
    """
    _check_rows(x, index)
    rows, n_in = x.shape[0], x.shape[-1]
    a = a_table.index_select(0, index)  # (rows, R, in)
    b = b_table.index_select(0, index)  # (rows, out, R)
    h = torch.bmm(x.reshape(rows, -1, n_in).to(a.dtype), a.transpose(1, 2))  # (rows, T, R)
    delta = torch.bmm(h, b.transpose(1, 2))  # (rows, T, out)
    delta = delta.view(*x.shape[:-1], b.shape[1])
    return delta if out is None else out + delta.to(out.dtype)


def gathered_embedding_reference(
    ids: torch.Tensor, a_table: torch.Tensor, b_table: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Embedding LoRA per row: rows of A[s]ᵀ looked up by id, then projected by B[s]ᵀ (+ out).

    Args:
        ids: (rows, ...) token ids. a_table: (slots, num_embeddings, R) — Aᵀ per slot, so a lookup reads one row.
        b_table: (slots, dim, R), scaling folded in. index: (rows,) long. out: optional (rows, ..., dim).
    """
    _check_rows(ids.unsqueeze(-1) if ids.dim() == 1 else ids, index)
    slots, n_emb, r = a_table.shape
    flat = ids + (index * n_emb).view(-1, *([1] * (ids.dim() - 1)))  # (rows, ...) ids into the stacked tables
    h = F.embedding(flat, a_table.view(slots * n_emb, r))  # (rows, ..., R)
    rows = ids.shape[0]
    b = b_table.index_select(0, index)  # (rows, dim, R)
    delta = torch.bmm(h.reshape(rows, -1, r), b.transpose(1, 2)).view(*ids.shape, b.shape[1])
    return delta if out is None else out + delta.to(out.dtype)


def _triton():
    """The Triton kernel module, imported on first CUDA use; None when Triton is missing or cannot load."""
    global _triton_mod
    if _triton_mod is None:
        try:
            from . import _triton_gathered

            _triton_mod = _triton_gathered
        except Exception:  # no triton, or one that cannot load here: the reference is always correct
            _triton_mod = False
    return _triton_mod or None


def _use_triton(x: torch.Tensor, a_table: torch.Tensor, out: torch.Tensor | None) -> bool:
    if _BACKEND == "torch" or not ((x.is_cuda or _INTERPRET) and out is not None and out.is_contiguous()):
        return False
    if _BACKEND == "auto" and x.numel() != x.shape[0] * x.shape[-1]:
        return False  # several tokens per row (prefill): the gather path is faster
    if x.dtype != a_table.dtype or a_table.dtype not in _DTYPES:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or a_table.requires_grad or out.requires_grad):
        return False  # the kernel has no backward; routed serving runs under no_grad / inference_mode
    if torch.compiler.is_compiling():
        return False  # inside torch.compile the reference's ops are traced and fused instead
    return _triton() is not None


def gathered_lora(
    x: torch.Tensor, a_table: torch.Tensor, b_table: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`out + (x A[s]ᵀ) B[s]ᵀ` per row (see the module docstring); the Triton kernel on CUDA, else the reference.

    With `out` on the Triton path the update is accumulated into `out` in place and `out` is returned.
    """
    if _use_triton(x, a_table, out):
        _check_rows(x, index)
        try:  # the kernels read the slots as int64 on the tables' device (a no-op when already so)
            return _triton().gathered_lora_add(out, x, a_table, b_table, index.to(a_table.device, torch.long))
        except Exception as exc:  # a Triton that cannot compile this kernel here: the reference is always correct
            _disable_triton(exc)
    return gathered_lora_reference(x, a_table, b_table, index, out)


def _disable_triton(exc: Exception) -> None:
    global _triton_mod
    _triton_mod = False
    warnings.warn(f"gathered LoRA: the Triton kernel failed ({type(exc).__name__}: {exc}); using the PyTorch path.",
                  RuntimeWarning, stacklevel=3)


class RoutedLinear:
    """One linear layer's routed update for a routed block: `routed(x, out)` is `gathered_lora(x, a, b, index, out)`.

    Made once when routing is installed (routing.py), so a decode call does only what can change per call: it
    checks the input (dtype, one token per row, rows, no autograd, not tracing) and launches the decode kernel with
    its five tensors. Anything else (prefill, CPU, torch.compile, gradients) goes through `gathered_lora`.

    Args:
        a_table: (slots, R, in); b_table: (slots, out, R), scaling folded in. index: (rows,) int64 slot per row, on
            the tables' device, written in place between blocks (a captured CUDA graph reads the new route).
    """

    def __init__(self, a_table: torch.Tensor, b_table: torch.Tensor, index: torch.Tensor) -> None:
        self.a, self.b, self.index = a_table, b_table, index
        self.rows = index.shape[0]
        self.dtype = a_table.dtype
        self.decode_numel = self.rows * a_table.shape[-1]  # x.numel() of a one-token-per-row input
        self.backend = _BACKEND
        self.decode = None  # the bound decode launch (x, index, out), or None: every call takes gathered_lora
        usable = (a_table.is_cuda or _INTERPRET) and a_table.dtype in _DTYPES and b_table.dtype == a_table.dtype
        if (_BACKEND != "torch" and usable and index.dtype == torch.long and a_table.is_contiguous()
                and b_table.is_contiguous() and not (a_table.requires_grad or b_table.requires_grad)):
            kernels = _triton()
            if kernels is not None:
                self.decode = kernels.decode_launch(self.rows, a_table, b_table)

    def current(self, a_table: torch.Tensor, b_table: torch.Tensor, index: torch.Tensor) -> bool:
        """Whether this is still the update for these tensors under the current backend (else make a new one)."""
        return (self.a is a_table and self.b is b_table and self.index is index and self.backend == _BACKEND
                and (self.decode is None or _triton_mod is not False))

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        decode = self.decode
        if (decode is not None and x.dtype == self.dtype and x.numel() == self.decode_numel
                and x.shape[0] == self.rows and out.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or out.requires_grad))
                and not torch.compiler.is_compiling()):
            try:
                decode(x if x.is_contiguous() else x.contiguous(), self.index, out)
                return out
            except Exception as exc:  # a Triton that cannot compile this kernel here: the reference is always correct
                self.decode = None
                _disable_triton(exc)
        return gathered_lora(x, self.a, self.b, self.index, out)


def gathered_embedding(
    ids: torch.Tensor, a_table: torch.Tensor, b_table: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Embedding LoRA per row (one table lookup and one bmm; no kernel of its own: it is a gather)."""
    return gathered_embedding_reference(ids, a_table, b_table, index, out)
