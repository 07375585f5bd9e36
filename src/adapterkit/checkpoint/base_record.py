"""What a fingerprint records of a model's base: plain module paths, base weights as they were before any merge,
ties, structural config and embedding shapes, read through adapter wrappers."""

from __future__ import annotations

import torch
from torch import nn

from ..base_layers import BaseView, view_of
from ..errors import TargetError
from ..methods.base import AdapterWrapper
from ..state import adapter_state

# Config keys that decide parameter shapes or how they are wired; read with getattr so aliases (GPT-2's n_embd for
# hidden_size) resolve. Names, dtypes, rope scaling and position limits are deliberately absent.
STRUCTURAL_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "n_inner",
    "n_positions",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "d_ff",
    "d_kv",
    "encoder_layers",
    "decoder_layers",
)
# Vocabulary size may differ legitimately (tokens added before training, restored by the vocabulary code).
_VOCAB_KEYS = ("vocab_size",)

# Packages whose tensor subclasses hold packed integers behind a float dtype (Params4bit with a float quant_storage).
_PACKED_PACKAGES = ("bitsandbytes", "torchao")


def plain_path(path: str) -> str:
    return path.replace(".base_layer.", ".").replace(".base_layer", "")


def _view(module: nn.Module) -> type[BaseView] | None:
    try:
        return view_of(module)
    except TargetError:  # a quantized layer of a kind adapterkit refuses: not signable, never an error here
        return None


def module_base_weight(module: nn.Module) -> torch.Tensor | None:
    """The base weight of a (possibly wrapped, possibly merged) module, as it was before any merge.

    A quantized weight (bitsandbytes, torchao) is read dequantized to float32, in whichever layout the layer holds
    it, so its signature compares with the float base it was quantized from.
    """
    if isinstance(module, AdapterWrapper):
        view, base = module.view, module.base_layer
        if module.merged_names and module._unmerged_weight is not None:
            saved = module._unmerged_weight
            return view.saved_float_weight(base, saved) if view.quantized(base) else saved
        weight = getattr(base, "weight", None)
        if view.quantized(base):
            weight = view.float_weight(base)
        if module.merged_names and weight is not None and hasattr(module, "delta_weight"):
            # Merged without keeping the original: subtract the deltas again (rare; costs one delta per adapter).
            try:
                base_weight = weight.detach().float()
                for name in module.merged_names:
                    base_weight = base_weight - module.delta_weight(name)
                return base_weight
            except NotImplementedError:
                return weight
        return weight
    view = _view(module)
    if view is not None and view.quantized(module):
        return view.float_weight(module)
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of the plain model by their plain path; a wrapper stands for the module it wraps."""
    out: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        out[prefix] = module
        inner = module.base_layer if isinstance(module, AdapterWrapper) else module
        for child_name, child in inner.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return out


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base parameters by plain path (adapter parameters left out, merged weights replaced by their originals)."""
    state = adapter_state(model)
    wrappers = state.wrappers if state is not None else {}
    adapter_attrs = {"_unmerged_weight"}
    for wrapper in wrappers.values():
        adapter_attrs.update(wrapper.containers)
    originals = {
        f"{path}.weight": w._unmerged_weight
        for path, w in wrappers.items()
        if w.merged_names and w._unmerged_weight is not None
    }
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        # An adapter parameter sits under `<wrapper path>.<adapter container>.`; names, not a walk over every
        # adapter's parameters (that walk alone would cost more than the whole signature).
        if not adapter_attrs.isdisjoint(parts) and any(
            part in adapter_attrs and ".".join(parts[:i]) in wrappers for i, part in enumerate(parts)
        ):
            continue
        plain = plain_path(name)
        out[plain] = originals.get(plain, p)
    return out


def ties(params: dict[str, torch.Tensor]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for path, p in params.items():
        groups.setdefault(id(p), []).append(path)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def structural_config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    out = {}
    for key in STRUCTURAL_KEYS:
        try:
            value = getattr(config, key, None)
        except Exception:  # some configs raise on unknown attribute aliases
            value = None
        if isinstance(value, (int, str, bool)):
            out[key] = value
    return out


def embedding_shapes(model: nn.Module) -> dict:
    out = {}
    for key, getter in (("input", "get_input_embeddings"), ("output", "get_output_embeddings")):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):
            module = None
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            out[key] = list(weight.shape)
    return out


def signable(weight: torch.Tensor | None) -> bool:
    """A plain float tensor with entries (a packed quantized parameter is read through `module_base_weight`)."""
    return (
        weight is not None
        and weight.dtype.is_floating_point
        and type(weight).__module__.split(".")[0] not in _PACKED_PACKAGES
        and weight.numel() > 0
        and weight.device.type != "meta"
    )
