"""`from_pretrained(adapter_dir)`: the base model an adapter records (or one given) with the adapter loaded on it."""

from __future__ import annotations

import importlib
import os
from typing import Any

from torch import nn

from ..checkpoint.load import load, read_adapter
from ..errors import AdapterLoadError


def from_pretrained(
    adapter_dir: str | os.PathLike,
    base: str | os.PathLike | nn.Module | None = None,
    *,
    name: str = "default",
    load_kwargs: dict[str, Any] | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load the base (default: the adapter's `base_model_name_or_path`) and `adapterkit.load` the adapter onto it.

    `base`: a model directory or hub id, or a model already built (then used as is). The class comes from the
    config's `auto_mapping` when it names a transformers class, else AutoModelForCausalLM. `from_pretrained_kwargs`
    go to the transformers from_pretrained call (dtype, device_map, local_files_only, ...); `load_kwargs` to
    `adapterkit.load`. Raises AdapterLoadError when no base is recorded or given.
    """
    _, cfg, _, _ = read_adapter(adapter_dir, name)
    if isinstance(base, nn.Module):
        model = base
    else:
        source = base if base is not None else cfg.base_model_name_or_path
        if not source:
            raise AdapterLoadError(
                f"adapter {adapter_dir} records no base_model_name_or_path; pass base= (a model directory, hub id "
                "or a loaded model)."
            )
        model = _model_class(cfg).from_pretrained(str(source), **from_pretrained_kwargs)
    load(model, adapter_dir, name, **(load_kwargs or {}))
    return model


def _model_class(cfg) -> type:
    import transformers

    mapping = cfg.passthrough.get("auto_mapping") or {}
    module, cls = mapping.get("parent_library"), mapping.get("base_model_class")
    # Only transformers classes are imported from a file's say-so (a config must not pick arbitrary code).
    if isinstance(module, str) and isinstance(cls, str) and module.split(".")[0] == "transformers":
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            pass
    return transformers.AutoModelForCausalLM
