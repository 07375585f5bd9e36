"""`save`: write a model's adapters in PEFT's format, atomically, refusing non-finite tensors. Never touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterSaveError
from ..model import _require_state
from .format import WEIGHTS_NAME, adapter_dir, adapter_tensors
from .io import atomic_directory


def save(model: nn.Module, directory: str | os.PathLike, *, names: list[str] | None = None) -> Path:
    """Save adapters (default: all) to `directory`: "default" at the top level, other names in sub-folders.

    Files already in `directory` that the save does not rewrite (a tokenizer, trainer state) are kept.
    """
    from safetensors.torch import save_file

    state = _require_state(model)
    names = list(state.configs) if names is None else list(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise AdapterSaveError(f"no adapter named {unknown[0]!r}; attached adapters: {sorted(state.configs)}.")

    payloads = []
    for name in names:
        tensors = {}
        for key, tensor in adapter_tensors(state, name).items():
            value = tensor.detach()
            if not torch.isfinite(value).all():
                raise AdapterSaveError(
                    f"adapter {name!r} has non-finite values (NaN/Inf) in {key}; nothing was written. "
                    "The training run diverged: lower the learning rate or resume from an earlier checkpoint."
                )
            # A private contiguous CPU copy: safetensors refuses tensors that share memory.
            tensors[key] = value.to("cpu", copy=True).contiguous()
        payloads.append((name, state.configs[name], tensors))

    target = Path(directory)
    with atomic_directory(target) as tmp:
        for name, cfg, tensors in payloads:
            out = adapter_dir(tmp, name)
            out.mkdir(parents=True, exist_ok=True)
            cfg.replace(inference_mode=True).save(out)
            save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return target
