"""`ModelUndo`: a record of a model taken before `load` changes it, and the exact restore after a failed load.

It holds references, not copies: every module's attribute, child, parameter and buffer tables, each parameter's data
tensor and requires_grad flag, the adapter state and the config's vocabulary size. A vocabulary resize swaps
parameter data, attach swaps modules for wrappers; restoring the references brings back the very tensors (bit-exact,
ties by identity included) and the very modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..state import AdapterState, adapter_state, unwrap


class ModelUndo:
    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap(model)
        # (module, its __dict__, _modules, _parameters, _buffers): shallow copies of the tables themselves.
        self.modules = [
            (m, dict(m.__dict__), dict(m._modules), dict(m._parameters), dict(m._buffers))
            for m in {id(m): m for m in self.model.modules()}.values()
        ]
        # parameter -> (data tensor, requires_grad): a resize assigns `weight.data`, attach clears requires_grad.
        self.params: list[tuple[nn.Parameter, torch.Tensor, bool]] = [
            (p, p.data, p.requires_grad) for p in {id(p): p for p in self._all_params()}.values()
        ]
        self.state = adapter_state(self.model)
        self.state_fields = _state_fields(self.state) if self.state is not None else None
        self.configs = _vocab_fields(self.model)

    def _all_params(self) -> list[nn.Parameter]:
        return [p for m in self.model.modules() for p in m._parameters.values() if p is not None]

    def restore(self, name: str) -> None:
        """Put the model back as it was when this record was taken; `name` is the adapter being loaded."""
        # Adapter `name` in wrappers that existed before (a layer carrying another adapter too): removed through
        # the wrapper, so its caches follow. Wrappers attach created are dropped with the module tables below.
        for module, *_ in self.modules:
            records = getattr(module, "records", None)
            if isinstance(records, dict) and name in records and hasattr(module, "remove_adapter"):
                module.remove_adapter(name)
            for attr in getattr(module, "containers", ()):
                container = module._modules.get(attr)
                if container is not None and name in container:
                    del container[name]
        for module, attrs, children, params, buffers in self.modules:
            _refill(module._modules, children)
            _refill(module._parameters, params)
            _refill(module._buffers, buffers)
            _refill(module.__dict__, attrs)
        for param, data, requires_grad in self.params:
            if param.data.data_ptr() != data.data_ptr() or param.data.shape != data.shape:
                param.data = data
            param.requires_grad_(requires_grad)
        if self.state is not None:
            for key, value in self.state_fields.items():
                setattr(self.state, key, value)
        for config, key, value in self.configs:
            setattr(config, key, value)


def _refill(table: dict, saved: dict) -> None:
    if table.keys() != saved.keys() or any(table[k] is not v for k, v in saved.items()):
        table.clear()
        table.update(saved)


def _state_fields(state: AdapterState) -> dict[str, Any]:
    return {
        "configs": dict(state.configs),
        "active": state.active,
        "wrappers": dict(state.wrappers),
        "disabled": state.disabled,
        "base_requires_grad": dict(state.base_requires_grad),
        "tie_flag_before_merge": state.tie_flag_before_merge,
    }


def _vocab_fields(model: nn.Module) -> list[tuple[Any, str, Any]]:
    """(config object, attribute, value) for the vocabulary sizes a resize rewrites (model and text config)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    configs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        configs.append(text)
    return [(c, "vocab_size", c.vocab_size) for c in configs if hasattr(c, "vocab_size")]
