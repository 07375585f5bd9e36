"""`save`: write a model's adapters in PEFT's format, atomically and byte-stably, refusing non-finite, empty or partial
tensors; sharded (FSDP2) adapters are gathered first and written once. Never touches the network."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed, vocab
from ..errors import AdapterSaveError
from ..state import require_state, unwrap
from . import fingerprint
from ..methods import lora_init
from .base_record import module_base_weight
from .format import ALIASES_METADATA_KEY, WEIGHTS_NAME, adapter_dir, adapter_tensors, alias_marker, file_key
from .io import atomic_directory
from .serialize import to_bytes


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    names: str | list[str] | None = None,
    tokenizer: Any = None,
    peft_compatible: bool = False,
    writer: bool | None = None,
    as_plain_lora: bool = False,
) -> Path:
    """Save adapters (`names`: one name or a list; default all) to `directory`: "default" at the top level, other
    names in sub-folders.

    Files already in `directory` that the save does not rewrite (a tokenizer, trainer state) are kept.
    `tokenizer`: saved beside the adapter (top level), e.g. after `vocab.add_tokens` changed its vocabulary.
    A tensor shared by several adapter modules (tied modules_to_save copies) is written once; each other key holds
    an empty marker tensor and is recorded as an alias in the header metadata, and `load` restores the sharing.
    Readers that do not know the alias (PEFT, transformers' load_adapter) fail on the marker's shape instead of
    loading the model wrongly; `peft_compatible=True` writes the shared tensor under each key for them.

    Distributed: when any adapter tensor or signed base weight is sharded (FSDP2 DTensor), every rank must call
    `save` (the shards are gathered collectively); rank 0 writes and the others wait until the files exist. Otherwise
    (one process, DDP) the calling process writes. `writer` overrides who writes (e.g. `is_main_process`).
    The same weights always give the same bytes, whichever way they were sharded.
    as_plain_lora: adapters initialised by PiSSA / OLoRA (which replaced base weights by residuals) are written as
    plain LoRA adapters of rank 2r for the ORIGINAL base (PEFT's `path_initial_model_for_weight_conversion`); without
    it they are written for the residual base, and the file records that the base was modified.
    """
    model = unwrap(model)  # DDP / torch.compile wrappers: the adapters live on the user's model inside
    state = require_state(model)
    names = list(state.configs) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise AdapterSaveError(f"no adapter named {unknown[0]!r}; attached adapters: {sorted(state.configs)}.")

    payloads = []
    sharded = False
    for name in names:
        tensors = {}
        first_key: dict[int, str] = {}  # id(live tensor) -> the file key it is saved under
        aliases: dict[str, str] = {}
        for key, tensor in adapter_tensors(state, name).items():
            sharded = sharded or distributed.is_sharded(tensor)
            if id(tensor) in first_key and not peft_compatible:
                aliases[key] = first_key[id(tensor)]
                tensors[key] = alias_marker(tensor.dtype)
                continue
            first_key[id(tensor)] = key
            value = _whole(tensor, name, key)
            if not torch.isfinite(value).all():
                raise AdapterSaveError(
                    f"adapter {name!r} has non-finite values (NaN/Inf) in {key}; nothing was written. "
                    "The training run diverged: lower the learning rate or resume from an earlier checkpoint."
                )
            # A private contiguous CPU copy: safetensors refuses tensors that share memory.
            tensors[key] = value.to("cpu", copy=True).contiguous()
        # The base this adapter was trained on, in the header metadata (PEFT ignores it): checked by `load`.
        modules = sorted(p for p, w in state.wrappers.items() if name in w.adapter_names)
        fp = fingerprint.compute(model, modules)
        cfg, residual_meta = _residual_base(state, name, state.configs[name], tensors, fp, as_plain_lora)
        metadata = {"format": "pt", **fingerprint.to_metadata(fp), **residual_meta}
        metadata.update(vocab.sizes_metadata(model))
        if aliases:
            metadata[ALIASES_METADATA_KEY] = json.dumps(aliases, sort_keys=True)
        payloads.append((name, _file_config(model, cfg), to_bytes(tensors, metadata)))

    target = Path(directory)
    collective = sharded or distributed.world_size() > 1 and _signs_sharded(model)
    if writer is None:
        writer = distributed.is_writer() if collective else True
    if writer:
        with atomic_directory(target) as tmp:
            for name, cfg, blob in payloads:
                out = adapter_dir(tmp, name)
                out.mkdir(parents=True, exist_ok=True)
                cfg.save(out)
                with open(out / WEIGHTS_NAME, "wb") as fh:
                    fh.write(blob)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    if collective:
        distributed.barrier()  # the other ranks return once rank 0's files are in place
    return target


def _whole(tensor: torch.Tensor, name: str, key: str) -> torch.Tensor:
    """The complete value of an adapter tensor (gathered when sharded); refuses a placeholder or partial tensor."""
    value = distributed.full(tensor)
    # DeepSpeed ZeRO-3 leaves an empty placeholder with the real shape in `ds_shape`: writing it gives an
    # adapter of a few bytes that loads as zeros.
    expected = getattr(tensor, "ds_shape", None)
    # A rank pruned to nothing (AdaLoRA) is a legitimate (0, n) tensor; a placeholder is flat and empty.
    placeholder = value.dim() == 1 and value.numel() == 0
    if placeholder or (expected is not None and tuple(value.shape) != tuple(expected)):
        shown = list(expected) if expected is not None else "its adapter shape"
        raise AdapterSaveError(
            f"adapter {name!r}: {key} holds {list(value.shape)} ({value.numel()} values) where {shown} is expected: "
            "only a partitioned piece is present on this process (DeepSpeed ZeRO-3 or FSDP1 sharding). Nothing was "
            "written. Gather the parameters first (e.g. deepspeed.zero.GatheredParameters) or save with FSDP2, "
            "whose shards adapterkit gathers itself."
        )
    return value


def _signs_sharded(model: nn.Module) -> bool:
    """Whether any parameter is a DTensor: the fingerprint then gathers base weights, which takes every rank."""
    return any(distributed.is_sharded(p) for p in model.parameters())


def _file_config(model: nn.Module, cfg):
    """The config as written: inference mode, and PEFT's auto_mapping (the base class) when no task type says it."""
    cfg = cfg.replace(inference_mode=True)
    return cfg.with_auto_mapping(distributed.model_class(model)) if cfg.task_type is None else cfg


def _residual_base(state, name: str, cfg, tensors: dict, fp: dict, as_plain_lora: bool) -> tuple[Any, dict]:
    """PiSSA / OLoRA adapters: (config to write, extra metadata); `tensors` and `fp` are updated in place.

    Converted: the rank-2r factors replace A and B, and the fingerprint signs the original weights W_res + s B0 A0.
    Not converted: the fingerprint signs the residual weights and the metadata records the original ones too, so
    that `load` can tell the two bases apart.
    """
    layers = lora_init.residual_layers(state.wrappers, name)
    if not layers:
        return cfg, {}
    originals = {path: module_base_weight(layer).detach().float() + lora_init.initial_delta(layer, name)
                 for path, layer in layers.items()}
    signed = dict(zip(originals, fingerprint.signatures(list(originals.values()))))
    if not as_plain_lora:
        record = {"init": cfg.init_lora_weights, "original": signed}
        return cfg, {lora_init.RESIDUAL_METADATA_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"))}
    for path, layer in layers.items():
        for suffix, tensor in lora_init.plain_lora_factors(layer, name).items():
            tensors[file_key(path, suffix)] = tensor
    fp["modules"].update(signed)
    return lora_init.plain_lora_config(cfg), {}
