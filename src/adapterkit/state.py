"""The record of adapters a model carries: `AdapterState`, kept on the model itself as `model._adapterkit`.

Read by the verbs, the checkpoint code and the vocabulary helpers; it imports nothing of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError
from .methods.base import AdapterWrapper

STATE_ATTR = "_adapterkit"


@dataclass
class AdapterState:
    configs: dict[str, Any] = field(default_factory=dict)  # adapter name -> its config
    active: tuple[str, ...] = ()
    wrappers: dict[str, AdapterWrapper] = field(default_factory=dict)  # module path -> wrapper
    disabled: bool = False
    # requires_grad of every parameter before the first attach: restored when the model is plain again.
    base_requires_grad: dict[str, bool] = field(default_factory=dict)
    # tie_word_embeddings before a merge untied something; restored by unmerge.
    tie_flag_before_merge: bool | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside the wrappers torch puts around it: `torch.compile`'s OptimizedModule
    (`_orig_mod`) and DistributedDataParallel / DataParallel (`.module`)."""
    seen = 0
    while seen < 8:
        seen += 1
        if model.__dict__.get(STATE_ATTR) is not None:
            return model
        inner = model._modules.get("_orig_mod")
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = model._modules.get("module")
        if inner is None:
            return model
        model = inner
    return model


def adapter_state(model: nn.Module) -> AdapterState | None:
    return unwrap(model).__dict__.get(STATE_ATTR)


def require_state(model: nn.Module) -> AdapterState:
    state = adapter_state(model)
    if state is None or not state.configs:
        raise ConfigError(f"{type(model).__name__} has no adapters attached; call adapterkit.attach or load first.")
    return state
