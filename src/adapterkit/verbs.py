"""The verbs over a user's model: attach, activate, disable, delete, merge, unmerge, unload.

The model stays the user's own nn.Module; adapter layers replace target modules in place and a small
`AdapterState` (state.py) rides on the model, recording configs, active names and wrappers. Which layer class a
module gets comes from the method table (methods/__init__.py), never from a type check here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .base_layers import LinearView, view_of
from .config import AdapterConfig
from .errors import ConfigError, MergeError, TargetError
from .methods import method_for
from .methods.base import AdapterWrapper, AttachContext
from .methods.lora import LoraLinear
from .methods.lora_siblings import link_siblings
from .methods.modules_to_save import TrainableCopy
from .methods.trainable_tokens import TiedTokensHead, TrainableTokens
from .quantized import dequantize_model, quantized_view, to_linear
from .state import STATE_ATTR, AdapterState, adapter_state, require_state, unwrap
from .structure import base_of, embeddings_tied, iter_modules, replace_module, shared_tensor_ids
from .targeting import expand_targets, find_modules_to_save, find_targets, find_token_targets


# (install, remove) pairs called with the model when it gets its first adapter and when it is plain again: how
# integrations give an adapted model instance-level methods (integrations/hf_save.py: save_pretrained).
MODEL_HOOKS: list[tuple[Callable[[nn.Module], None], Callable[[nn.Module], None]]] = []


def adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """The configs of the adapters attached to `model`, by name (empty for a plain model)."""
    state = adapter_state(model)
    return dict(state.configs) if state else {}


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    state = adapter_state(model)
    return state.active if state else ()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or len(name) > 128:
        raise ConfigError(f"adapter name {name!r} must be 1-128 letters, digits, '_' or '-' (it becomes a key).")


def attach(
    model: nn.Module,
    config: AdapterConfig,
    name: str = "default",
    *,
    dtype: torch.dtype | None = None,
    init: bool = True,
) -> nn.Module:
    """Add adapter `name` to `model` in place and return the same model.

    The base is frozen; the first adapter becomes active and trainable. Later adapters are attached inactive, as in
    PEFT: `set_active` switches. Adapter tensors take each base layer's compute dtype and device unless `dtype` is
    given. Nothing in the model changes when targeting fails.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"attach adapts a torch.nn.Module (a transformers model, say), got {type(model).__name__}.")
    method = method_for(config)
    _check_name(name)
    state = adapter_state(model)
    if state is not None and name in state.configs:
        raise ConfigError(f"an adapter named {name!r} is already attached; delete it first or choose another name.")
    if method.plan is not None:  # a method that names its own modules (prompt tuning)
        cfg, targets = method.plan(model, config)
        copies, tokens = [], []
    else:
        modules = list(iter_modules(model))  # one walk of the model, shared by the target searches
        cfg = expand_targets(model, config, modules)
        targets = find_targets(model, cfg, method, modules)
        copies = find_modules_to_save(model, cfg)
        tokens = find_token_targets(model, cfg, {p for p, _, _ in targets} | {p for p, _ in copies})
    if not targets and not copies and not tokens:
        raise TargetError(
            "the config targets no module: set target_modules, modules_to_save or trainable_token_indices."
        )
    if hasattr(cfg, "fan_in_fan_out") and any(getattr(view_of(base_of(m)), "fan_in_fan_out", False)
                                              for _, m, _ in targets):  # bare-parameter targets have no view
        cfg = cfg.replace(fan_in_fan_out=True)  # recorded in the file as PEFT does; handled per layer
    if cfg.base_model_name_or_path is None:
        cfg = cfg.replace(base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None)

    # One list of (path, module, layer class): the method's layers, then full copies, then token rows and the heads
    # tied to them (after the embedding they follow, so they also merge after it).
    plan = list(targets) + [(p, m, TrainableCopy) for p, m in copies]
    for path, module, _, follower_paths in tokens:
        plan.append((path, module, TrainableTokens))
        plan += [(head, model.get_submodule(head), TiedTokensHead) for head in follower_paths]

    if state is None:
        state = AdapterState()
        for pname, p in model.named_parameters():
            state.base_requires_grad[pname] = p.requires_grad
            p.requires_grad_(False)
        model.__dict__[STATE_ATTR] = state
        for install, _ in MODEL_HOOKS:
            install(model)
    ctx = AttachContext(dtype=dtype, init=init)
    ctx.shared["model"] = model  # for layers that hook the model itself (prompt tuning)
    # Every quantized layer, adapted or not, gets its training-safe layout (a 4-bit layer's, quantized.py): the
    # gradient of an adapter passes through the layers above it, and bitsandbytes' CPU-packed layout has no backward.
    for module in model.modules():
        view = quantized_view(module)
        if view is not None:
            view.prepare(module)
    for path, module, layer in plan:
        wrapper = module if isinstance(module, layer) else layer(module)
        if wrapper is not module:
            replace_module(model, path, wrapper)
        wrapper.add_adapter(name, cfg, path, ctx)  # new layers take the base layer's train/eval mode
        state.wrappers.pop(path, None)
        state.wrappers[path] = wrapper
    state.configs[name] = cfg
    link_siblings(model, LoraLinear)
    set_active(model, state.active or (name,))
    return model


def set_active(model: nn.Module, names: str | list[str] | tuple[str, ...]) -> None:
    """Make `names` the active adapter(s). Active adapters are trainable (unless in inference mode), others frozen."""
    state = require_state(model)
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ConfigError(f"no adapter named {unknown[0]!r}; attached adapters: {sorted(state.configs)}.")
    state.active = names
    _apply_activation(state)


def _apply_activation(state: AdapterState) -> None:
    live = () if state.disabled else state.active
    trainable_names = {n for n in state.active if not state.configs[n].inference_mode}
    for wrapper in state.wrappers.values():
        wrapper.set_active(live)
        for adapter in wrapper.adapter_names:
            trainable = adapter in trainable_names
            for p in wrapper.adapter_parameters(adapter):
                if p.requires_grad != trainable:
                    p.requires_grad_(trainable)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model without any adapter inside the `with` block."""
    state = require_state(model)
    if any(w.merged_names for w in state.wrappers.values()):
        raise MergeError("adapters are merged into the base weights; unmerge before disabling them.")
    previous = state.disabled
    state.disabled = True
    _apply_activation(state)
    try:
        yield model
    finally:
        state.disabled = previous
        _apply_activation(state)


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; layers left with no adapter are unwrapped. The last delete returns the plain model."""
    model = unwrap(model)
    state = require_state(model)
    if name not in state.configs:
        raise ConfigError(f"no adapter named {name!r}; attached adapters: {sorted(state.configs)}.")
    for path, wrapper in list(state.wrappers.items()):
        if name in wrapper.adapter_names:
            wrapper.remove_adapter(name)
            if not wrapper.adapter_names:
                replace_module(model, path, wrapper.base_layer)
                del state.wrappers[path]
    del state.configs[name]
    state.active = tuple(n for n in state.active if n != name)
    if not state.configs:
        _forget(model, state)
    else:
        link_siblings(model, LoraLinear)
        _apply_activation(state)


def _forget(model: nn.Module, state: AdapterState) -> None:
    for pname, p in model.named_parameters():
        if pname in state.base_requires_grad:
            p.requires_grad_(state.base_requires_grad[pname])
    del unwrap(model).__dict__[STATE_ATTR]
    for _, remove in MODEL_HOOKS:
        remove(unwrap(model))


def _check_mergeable(state: AdapterState, names: tuple[str, ...]) -> None:
    """Refuse a non-finite delta before any weight changes. A cheap norm bound clears almost every layer."""
    for path, wrapper in state.wrappers.items():
        stored = wrapper.view.stored_dtype(wrapper.base_layer) if wrapper.method != "modules_to_save" else None
        weight_dtype = stored if stored is not None and stored.is_floating_point else torch.float32
        limit = torch.finfo(weight_dtype).max / 4
        for name in names:
            if name not in wrapper.adapter_names or name in wrapper.merged_names:
                continue
            bound = wrapper.max_delta_bound(name)
            if bound < limit:
                continue
            delta = None if isinstance(wrapper, TrainableCopy) else wrapper.delta_weight(name)  # float32
            if delta is None or not torch.isfinite(delta).all():
                raise MergeError(
                    f"adapter {name!r} has a non-finite (NaN/Inf) update at {path!r}; merge refused and no weight "
                    "was changed. Check the training run (learning rate, loss scaling) that produced it."
                )
            if not torch.isfinite(delta.to(weight_dtype)).all():
                wider = (
                    "unload(model, merge=True, dtype=torch.float32) merges without requantizing"
                    if wrapper.view.quantized(wrapper.base_layer) else "model.float()"
                )
                raise MergeError(
                    f"adapter {name!r} at {path!r} overflows {weight_dtype} when merged; merge refused and no weight "
                    f"was changed. Merge into a wider dtype ({wider})."
                )


@dataclass
class MergeReport:
    """What a merge did to quantized layers: each one was dequantized, given its delta and requantized.

    requantization: plain path -> (max |error|, relative error ‖error‖ / ‖merged weight‖), the error being the
    requantized weight's values minus the exact float merge. Empty when no quantized layer was merged.
    """

    merged: tuple[str, ...] = ()
    requantization: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def max_abs_error(self) -> float:
        return max((a for a, _ in self.requantization.values()), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((r for _, r in self.requantization.values()), default=0.0)

    def __str__(self) -> str:
        if not self.requantization:
            return f"merged {list(self.merged)} into float weights (no requantization)"
        return (
            f"merged {list(self.merged)}; {len(self.requantization)} quantized layers requantized: max |error| "
            f"{self.max_abs_error:.3g}, max relative error {self.max_rel_error:.3g} (unload(merge=True, "
            "dtype=torch.bfloat16) merges without requantizing)"
        )


def merge(model: nn.Module, names: str | list[str] | None = None, *, keep_original: bool = True) -> MergeReport:
    """Fold adapters (default: the active ones) into the base weights. `unmerge` restores them bit-exactly.

    Weights tied to another module (shared input/output embeddings) are untied for the merged module only, so the
    merged model computes what the unmerged one did; `tie_word_embeddings` in the model config follows. A quantized
    layer is dequantized, given its delta and requantized with its own settings; the returned MergeReport gives the
    error that requantization added.
    """
    model = unwrap(model)
    state = require_state(model)
    chosen = state.active if names is None else ((names,) if isinstance(names, str) else tuple(names))
    unknown = [n for n in chosen if n not in state.configs]
    if unknown:
        raise ConfigError(f"no adapter named {unknown[0]!r}; attached adapters: {sorted(state.configs)}.")
    return _merge(model, state, chosen, keep_original)


def _merge(model: nn.Module, state: AdapterState, chosen: tuple[str, ...], keep_original: bool) -> MergeReport:
    if not chosen:
        raise MergeError("no adapter is active, so there is nothing to merge; pass names=[...] or set_active first.")
    _check_mergeable(state, chosen)
    shared = set() if keep_original else shared_tensor_ids(model)
    report = MergeReport(merged=chosen)
    for path, wrapper in state.wrappers.items():
        names = tuple(n for n in chosen if n in wrapper.adapter_names and n not in wrapper.merged_names)
        base = wrapper.base_layer
        exact = wrapper.merged_weight(names) if names and wrapper.view.quantized(base) else None
        wrapper.merge(names, keep_original=keep_original, shared=keep_original or id(wrapper.weight) in shared)
        if exact is not None:
            error = wrapper.view.float_weight(base) - exact  # (out, in) float32
            scale = float(exact.norm())
            report.requantization[path] = (float(error.abs().max()), float(error.norm()) / scale if scale else 0.0)
    _sync_tie_flag(model, state)
    return report


def unmerge(model: nn.Module) -> None:
    """Undo `merge`: the original base weight tensors are put back (bit-exact, ties restored)."""
    model = unwrap(model)
    state = require_state(model)
    for wrapper in state.wrappers.values():
        wrapper.unmerge()
    if state.tie_flag_before_merge is not None:
        _set_tie_flag(model, state.tie_flag_before_merge)
        state.tie_flag_before_merge = None


def unload(model: nn.Module, merge: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Remove every adapter and return the same model as a plain module.

    merge=False gives back the original model exactly (trained `modules_to_save` copies are dropped too);
    merge=True folds the active adapters in first and keeps trained `modules_to_save` copies in place of the originals.
    dtype: a full-precision model in `dtype`: every quantized linear layer (adapted or not) becomes a plain nn.Linear
    holding its dequantized weight (merged in float32 first when merge=True, so nothing is requantized) and every
    float parameter (not buffers) is cast to `dtype`. Without dtype, merging into a quantized layer requantizes it; the
    MergeReport is then kept at `model.adapterkit_merge_report`.
    """
    model = unwrap(model)
    state = require_state(model)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"unload's dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}.")
    if dtype is not None:
        unmerge(model)
        for wrapper in state.wrappers.values():
            base = wrapper.base_layer
            if wrapper.view.quantized(base):  # a float32 copy to merge into; cast to dtype at the end
                wrapper.base_layer = to_linear(base, torch.float32)
                wrapper._set_plain(view=LinearView)
                wrapper._refresh()
    if merge:
        report = _merge(model, state, state.active, keep_original=False)
        if report.requantization:
            model.__dict__["adapterkit_merge_report"] = report
    else:
        unmerge(model)
    for path, wrapper in list(state.wrappers.items()):
        replacement = wrapper.base_layer
        if merge and isinstance(wrapper, TrainableCopy):
            replacement = wrapper._current
        replace_module(model, path, replacement)
    _forget(model, state)
    if dtype is not None:
        dequantize_model(model, dtype)
        # Parameters only: buffers such as rotary inv_freq stay as the model computes them (float32 in transformers).
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "dtype"):
            config.dtype = dtype
    return model


def _tie_flag(model: nn.Module) -> bool | None:
    config = getattr(model, "config", None)
    return getattr(config, "tie_word_embeddings", None) if config is not None else None


def _set_tie_flag(model: nn.Module, value: bool) -> None:
    config = model.config
    config.tie_word_embeddings = value
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config and hasattr(text, "tie_word_embeddings"):
        text.tie_word_embeddings = value


def _sync_tie_flag(model: nn.Module, state: AdapterState) -> None:
    """When merging untied the embedding pair, say so in the config so save_pretrained / from_pretrained agree."""
    if _tie_flag(model) and embeddings_tied(model) is False:
        if state.tie_flag_before_merge is None:
            state.tie_flag_before_merge = True
        _set_tie_flag(model, False)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
