"""Vocabulary: adding tokens, resizing embeddings with their tie kept, and the embedding sizes an adapter records.

Ties themselves are found by tensor identity in structure.py (`find_ties`, re-exported here as part of the public
`adapterkit.vocab`), so a model that ties `wte` to `lm_head`, `embed_tokens` to `lm_head`, or anything else is handled
alike.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from .config import parse_json
from .errors import AdapterLoadError, ConfigError
from .state import adapter_state
from .structure import base_of, embeddings, find_ties

__all__ = ["add_tokens", "embedding_sizes", "embeddings", "find_ties", "read_sizes", "resize", "sizes_metadata"]

# Key of the safetensors header metadata entry that records the embedding sizes an adapter was trained with.
VOCAB_METADATA_KEY = "adapterkit.vocab"
# Most rows (or widths) a recorded embedding may have; real vocabularies are under a million.
MAX_ROWS = 2**24


def _weight(module: nn.Module | None) -> torch.Tensor | None:
    return None if module is None else getattr(module, "weight", None)


def embedding_sizes(model: nn.Module) -> dict[str, Any]:
    """{"input": [rows, dim], "output": [rows, dim], "tied": bool} for the model's embedding pair (sides it has).

    Looks through adapter wrappers: the sizes are the base tables', which is what a loading base must match.
    """
    emb, head = embeddings(model)
    out: dict[str, Any] = {}
    w_in, w_out = _weight(base_of(emb) if emb is not None else None), _weight(base_of(head) if head is not None else None)
    if w_in is not None:
        out["input"] = list(w_in.shape)
    if w_out is not None:
        out["output"] = list(w_out.shape)
    if w_in is not None and w_out is not None:
        out["tied"] = w_in is w_out
    return out


def sizes_metadata(model: nn.Module) -> dict[str, str]:
    """The header metadata entry (string values, as safetensors requires) recording `embedding_sizes`."""
    sizes = embedding_sizes(model)
    return {VOCAB_METADATA_KEY: json.dumps(sizes, sort_keys=True)} if sizes else {}


def read_sizes(metadata: dict[str, str], where: str = "the weights file") -> dict[str, Any] | None:
    """The embedding sizes recorded in a file's header metadata, or None when it records none (PEFT-made).

    A present but damaged entry raises AdapterLoadError naming `where`: guessing would resize the model wrongly.
    """
    text = metadata.get(VOCAB_METADATA_KEY)
    if text is None:
        return None
    entry = f"{where}: metadata {VOCAB_METADATA_KEY!r}"
    try:
        sizes = parse_json(text, entry, 4096)
    except ConfigError as exc:
        raise AdapterLoadError(f"{exc}. The vocabulary record is damaged; re-save the adapter.") from exc
    problem = _sizes_problem(sizes)
    if problem:
        raise AdapterLoadError(
            f"{entry} is damaged: {problem} (found {text[:120]!r}). Expected e.g. "
            '{"input": [rows, dim], "output": [rows, dim], "tied": true}; re-save the adapter.'
        )
    return sizes


def _sizes_problem(sizes: object) -> str:
    if not isinstance(sizes, dict):
        return f"a JSON {type(sizes).__name__}, expected an object"
    unknown = sorted(set(sizes) - {"input", "output", "tied"})
    if unknown:
        return f"unknown entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))[:80]}"
    for side in ("input", "output"):
        shape = sizes.get(side)
        if shape is not None and not (
            isinstance(shape, list) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_ROWS for n in shape)
        ):
            return f"{side!r} must be [rows, dim] with sizes from 1 to {MAX_ROWS:,}"
    if "tied" in sizes and not isinstance(sizes["tied"], bool):
        return "'tied' must be true or false"
    return ""


def resize(model: nn.Module, rows: int) -> None:
    """Resize the input embedding (and output head) to `rows` rows, keeping the model's tie as it was.

    New rows start as the mean of the existing ones (deterministic); callers restore trained rows afterwards.
    """
    emb, head = embeddings(model)
    tied_before = emb is not None and head is not None and _weight(emb) is _weight(head)
    old_rows = _weight(emb).shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    emb, head = embeddings(model)
    if tied_before and _weight(emb) is not _weight(head):
        head.weight = emb.weight  # transformers re-ties from the config flag; keep what the model had
    if rows > old_rows:
        with torch.no_grad():
            for module in {id(m): m for m in (emb, head) if m is not None}.values():
                w = module.weight
                w[old_rows:] = w[:old_rows].float().mean(0).to(w.dtype)
                bias = getattr(module, "bias", None)
                if bias is not None and bias.shape[0] == rows:
                    bias[old_rows:] = 0


def add_tokens(model: nn.Module, tokenizer: Any, tokens: list[str], *, init: str = "mean", special: bool = False) -> list[int]:
    """Add `tokens` to the tokenizer and grow the model's embeddings to match; returns the new tokens' ids.

    init="mean": new rows start at the mean of the existing embedding rows (and output head rows, if untied);
    init="random": left as transformers initialises them. Ties between the embedding and the head are kept.
    Pass the returned ids as `trainable_token_indices` to train (and save) only those rows.
    """
    if init not in ("mean", "random"):
        raise ConfigError(f"add_tokens init={init!r}; choose 'mean' or 'random'.")
    if adapter_state(model) is not None:
        raise ConfigError("add tokens before attaching adapters: the embedding is already wrapped by an adapter.")
    tokenizer.add_tokens(list(tokens), special_tokens=special)
    new_ids = tokenizer.convert_tokens_to_ids(list(tokens))
    emb, _ = embeddings(model)
    rows = max(len(tokenizer), _weight(emb).shape[0])
    if init == "mean":
        resize(model, rows)
    else:
        model.resize_token_embeddings(rows)
    return list(new_ids)
