"""`save`: write a model's adapters in PEFT's format, atomically, refusing non-finite tensors. Never touches the network."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .. import vocab
from ..errors import AdapterSaveError
from ..state import require_state, unwrap
from . import fingerprint
from ..methods import lora_init
from .base_record import module_base_weight
from .format import ALIASES_METADATA_KEY, WEIGHTS_NAME, adapter_dir, adapter_tensors, file_key
from .io import atomic_directory


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    names: list[str] | None = None,
    tokenizer: Any = None,
    peft_compatible: bool = False,
    as_plain_lora: bool = False,
) -> Path:
    """Save adapters (default: all) to `directory`: "default" at the top level, other names in sub-folders.

    Files already in `directory` that the save does not rewrite (a tokenizer, trainer state) are kept.
    `tokenizer`: saved beside the adapter (top level), e.g. after `vocab.add_tokens` changed its vocabulary.
    A tensor shared by several adapter modules (tied modules_to_save copies) is written once; the other keys are
    recorded as aliases in the header metadata and `load` restores the sharing. PEFT (0.21) needs every key and
    raises KeyError on such a file: `peft_compatible=True` writes the shared tensor under each key instead.
    as_plain_lora: adapters initialised by PiSSA / OLoRA (which replaced base weights by residuals) are written as
    plain LoRA adapters of rank 2r for the ORIGINAL base (PEFT's `path_initial_model_for_weight_conversion`); without
    it they are written for the residual base, and the file records that the base was modified.
    """
    model = unwrap(model)  # DDP / torch.compile wrappers: the adapters live on the user's model inside
    state = require_state(model)
    names = list(state.configs) if names is None else list(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise AdapterSaveError(f"no adapter named {unknown[0]!r}; attached adapters: {sorted(state.configs)}.")

    payloads = []
    for name in names:
        tensors = {}
        first_key: dict[int, str] = {}  # id(live tensor) -> the file key it is saved under
        aliases: dict[str, str] = {}
        for key, tensor in adapter_tensors(state, name).items():
            if id(tensor) in first_key and not peft_compatible:
                aliases[key] = first_key[id(tensor)]
                continue
            first_key[id(tensor)] = key
            value = tensor.detach()
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
        payloads.append((name, cfg, tensors, metadata))

    target = Path(directory)
    with atomic_directory(target) as tmp:
        for name, cfg, tensors, metadata in payloads:
            out = adapter_dir(tmp, name)
            out.mkdir(parents=True, exist_ok=True)
            cfg.replace(inference_mode=True).save(out)
            save_file(tensors, str(out / WEIGHTS_NAME), metadata=metadata)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return target


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
