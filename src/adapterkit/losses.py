"""Output losses that never hold the full (tokens x vocab) logits: the head and the cross-entropy run chunk by chunk.

`chunked_loss(hidden, head, labels)` for any head module; `causal_lm_loss(model, input_ids, ...)` for a transformers
causal LM (its forward with the head bypassed, then the chunked head loss on the shifted labels).

Each chunk runs under `torch.utils.checkpoint` (non-reentrant): the forward keeps only the chunk's scalar loss, the
backward recomputes that chunk's logits, so at most one chunk of logits (and its gradient) is alive at a time. The head
module itself is called on each chunk, so whatever wraps it (LoRA, DoRA, trainable-token rows tied to the embedding)
is honoured and its parameters get their gradients. On CUDA, a plain frozen-or-not `nn.Linear` head uses Liger-Kernel's
fused linear cross-entropy when that package is installed (never required); everything else takes the chunked path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024  # tokens per chunk: 1024 x 128256 fp32 logits = 0.5 GiB, and their gradient as much again
_BACKENDS = ("auto", "chunked", "liger")
_liger = None  # liger_kernel's fused function, False when unavailable, None before the first try


def _liger_fn():
    global _liger
    if _liger is None:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            _liger = liger_fused_linear_cross_entropy
        except Exception:  # not installed, or no usable Triton: the chunked path is always correct
            _liger = False
    return _liger or None


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V): this chunk only
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def _uses_liger(head: nn.Module, hidden: torch.Tensor, backend: str) -> bool:
    if backend == "chunked" or type(head) is not nn.Linear or not hidden.is_cuda:
        return False
    if backend == "liger":
        if _liger_fn() is None:
            raise ConfigError("backend='liger' needs the liger-kernel package (pip install liger-kernel) and Triton; "
                              "use backend='auto' to fall back to the chunked path.")
        return True
    return _liger_fn() is not None


def chunked_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` against `labels`, computed `chunk_size` tokens at a time.

    Equals `F.cross_entropy(head(hidden).float().flatten(0, -2), labels.flatten(), ignore_index=..., reduction=...)`
    in value and gradient (to float rounding), without materialising the (tokens, vocab) logits.

    Args:
        hidden: (..., H) hidden states already aligned with `labels` (for a causal LM: positions 0..T-2 against
            tokens 1..T-1; `causal_lm_loss` does that shift).
        head: the output head module (e.g. `model.get_output_embeddings()`), called on (chunk, H) slices.
        labels: (...) token ids; `ignore_index` marks positions without a target.
        chunk_size: tokens per chunk (a larger chunk is faster, a smaller one holds less memory).
        reduction: "mean" over the non-ignored tokens (nan when there are none, like F.cross_entropy) or "sum".
        backend: "auto" (Liger's fused kernel for a plain nn.Linear head on CUDA when installed, else chunked),
            "chunked", or "liger" (an error when it is unavailable).
    """
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if backend not in _BACKENDS:
        raise ConfigError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ConfigError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}: expected "
                          "hidden (..., H) and labels (...) with the same leading shape (shift them first)")
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    targets = labels.reshape(-1).to(flat.device)  # (N,)
    if _uses_liger(head, flat, backend):
        return _liger_fn()(flat, head.weight, targets, bias=head.bias, ignore_index=ignore_index, reduction=reduction)
    total = flat.new_zeros((), dtype=torch.float32)
    # Gradients flow only when something needs them; without, checkpointing would be pure overhead.
    needs_graph = torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in head.parameters()))
    for start in range(0, flat.shape[0], chunk_size):
        h, y = flat[start:start + chunk_size], targets[start:start + chunk_size]  # (n, H), (n,)
        if needs_graph:
            total = total + checkpoint(_chunk_loss, head, h, y, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y, ignore_index)
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder returning hidden states, output head) of a transformers causal LM, or None when the logits are more
    than `head(hidden)` (soft-capped or scaled logits, multimodal wrappers) or the model is not split that way."""
    prefix = getattr(model, "base_model_prefix", None)
    decoder = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if decoder is None or head is None or decoder is model or getattr(config, "final_logit_softcapping", None) \
            or getattr(config, "logit_scale", None) or type(model).__name__.endswith("ForConditionalGeneration"):
        return None
    return decoder, head


@contextlib.contextmanager
def head_bypassed(head: nn.Module) -> Iterator[None]:
    """Within the block, `head(x)` returns x: the model's own forward (through DDP or any other wrapper) then hands
    back the hidden states in place of the logits, which never get computed."""
    previous = head.__dict__.get("forward")
    head.forward = _identity
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def _identity(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x


def _unwrapped(model: nn.Module) -> nn.Module:
    # DistributedDataParallel and DataParallel keep the user's model as `.module`; their forward must still run.
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _check_token_batch(input_ids, labels) -> None:
    """input_ids and labels: integer (batch, sequence) tensors of one shape (what the shift and the mask assume)."""
    for name, t in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype.is_floating_point or t.dtype.is_complex \
                or t.dtype == torch.bool:
            shown = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConfigError(f"causal_lm_loss: {name} must be an integer tensor of shape (batch, sequence), got "
                              f"{shown}.")
    if labels.shape != input_ids.shape:
        raise ConfigError(f"causal_lm_loss: labels {tuple(labels.shape)} must have the shape of input_ids "
                          f"{tuple(input_ids.shape)} (position t's label is the token t+1 should predict).")


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    only_labelled: bool = True,
    **model_kwargs,
) -> torch.Tensor:
    """Next-token cross-entropy of a transformers causal LM, as `model(input_ids, labels=labels).loss` computes it
    (labels default to input_ids; position t predicts label t+1), without materialising the logits.

    The model's own forward runs (so a DistributedDataParallel wrapper syncs gradients as usual) with its output
    head bypassed; the head then runs chunk by chunk on the hidden states. only_labelled: run the head only at
    positions whose target is not ignored (the same loss, less head work when prompts or padding are masked out).
    Other keyword arguments go to the model's forward (e.g. position_ids).
    """
    inner = _unwrapped(model)
    parts = split_head(inner)
    if parts is None:
        raise ConfigError(f"{type(inner).__name__}: the chunked loss needs a causal LM whose logits are "
                          "`get_output_embeddings()(hidden states of base_model_prefix)`; this model post-processes "
                          "its logits or is not split that way. Use model(..., labels=...).loss instead.")
    head = parts[1]
    labels = input_ids if labels is None else labels
    _check_token_batch(input_ids, labels)
    model_kwargs.setdefault("use_cache", False)  # a training step needs no KV cache
    with head_bypassed(head):
        out = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.logits if hasattr(out, "logits") else out[0]  # (B, T, H): what the head would have read
    hidden, targets = hidden[:, :-1], labels[:, 1:].to(hidden.device)  # (B, T-1, H), (B, T-1)
    if only_labelled:
        keep = targets != ignore_index  # (B, T-1)
        hidden, targets = hidden[keep], targets[keep]  # (N, H), (N,)
    return chunked_loss(hidden, head, targets, chunk_size=chunk_size, ignore_index=ignore_index,
                        reduction=reduction, backend=backend)
