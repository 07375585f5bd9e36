"""PEFT's on-disk layout: file names, folder per adapter, and tensor keys <-> model modules.

A tensor key is `base_model.model.<module path>.<suffix>`, the suffix being PEFT's parameter name without the
adapter name (`lora_A.weight`, `lora_embedding_B`, or the module's own `weight` for a modules_to_save copy).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..config import MAX_CONFIG_BYTES, parse_json
from ..errors import AdapterLoadError, ConfigError
from ..state import AdapterState

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
DEFAULT_ADAPTER = "default"
# Header metadata entry {alias file key: saved file key} for tensors shared by tied modules and written once.
ALIASES_METADATA_KEY = "adapterkit.aliases"


def adapter_dir(root: str | os.PathLike, name: str) -> Path:
    """PEFT puts the adapter named "default" at the top level and any other name in a sub-folder of that name."""
    root = Path(root)
    return root if name == DEFAULT_ADAPTER else root / name


def file_key(module_path: str, suffix: str) -> str:
    return f"{KEY_PREFIX}{module_path}.{suffix}"


def adapter_tensors(state: AdapterState, name: str) -> dict[str, nn.Parameter]:
    """Every tensor adapter `name` owns, by file key (live parameters, not copies): each layer's own tensors under
    its module path, then tensors of the whole adapter under the keys their owning layer gives."""
    out: dict[str, nn.Parameter] = {}
    for path, wrapper in state.wrappers.items():
        if name in wrapper.adapter_names:
            for suffix, tensor in wrapper.file_tensors(name).items():
                out[file_key(path, suffix)] = tensor
            out.update(wrapper.adapter_level_tensors(name))
    return out


def expand_aliases(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str = "the weights file"
) -> dict[str, torch.Tensor]:
    """The file's tensors plus, for each recorded alias, the shared tensor under the alias key too.

    A damaged alias entry (not a JSON object of key -> key, an alias naming an absent tensor or shadowing a stored
    one) raises AdapterLoadError naming `where`: loading it anyway would leave tied parameters without values.
    """
    text = metadata.get(ALIASES_METADATA_KEY)
    if text is None:
        return tensors
    entry = f"{where}: metadata {ALIASES_METADATA_KEY!r}"
    try:
        aliases = parse_json(text, entry, MAX_CONFIG_BYTES)
    except ConfigError as exc:
        raise AdapterLoadError(f"{exc}. The alias record is damaged; re-save the adapter.") from exc
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise AdapterLoadError(
            f"{entry} must map alias keys to stored tensor keys (strings), found {text[:120]!r}; re-save the adapter."
        )
    out = dict(tensors)
    for alias, source in aliases.items():
        if source not in tensors:
            raise AdapterLoadError(
                f"{entry} says {alias[:120]!r} shares the tensor {source[:120]!r}, which the file does not hold; "
                "the file is damaged. Re-save the adapter."
            )
        if alias in tensors:
            raise AdapterLoadError(
                f"{entry} lists {alias[:120]!r} as an alias of {source[:120]!r}, but the file also stores a tensor "
                "under that key; the file is ambiguous. Re-save the adapter."
            )
        out[alias] = tensors[source]
    return out


def strip_prefix(key: str) -> str | None:
    return key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else None


def base_parameter_for(params: dict[str, torch.Tensor], key: str) -> tuple[str, torch.Tensor] | None:
    """If a file key names a base model parameter (PEFT can save `...embed_tokens.base_layer.weight` or plain base
    keys), return its path in the plain model and the live tensor. `params`: the model's named_parameters."""
    inner = strip_prefix(key)
    if inner is None:
        return None
    candidates = [inner, inner.replace(".base_layer.", ".")]
    for candidate in candidates:
        for live in (candidate, _wrapped_name(candidate)):
            if live in params:
                return candidate, params[live]
    return None


def _wrapped_name(path: str) -> str:
    module, _, param = path.rpartition(".")
    return f"{module}.base_layer.{param}" if module else path
