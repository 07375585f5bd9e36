"""The optional Triton kernel modules: imported on first CUDA use, remembered as missing when Triton cannot load."""

from __future__ import annotations

import importlib
from types import ModuleType

_loaded: dict[str, ModuleType | bool] = {}  # module name -> the module, or False when it could not be imported


def kernels(name: str) -> ModuleType | None:
    """`adapterkit.kernels.<name>` (a module that imports triton), or None when Triton is not installed or fails to
    load here; the PyTorch paths beside every kernel are always correct, so callers fall back to them."""
    module = _loaded.get(name)
    if module is None:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except Exception:  # no triton, or a triton that cannot load on this machine
            module = False
        _loaded[name] = module
    return module or None
