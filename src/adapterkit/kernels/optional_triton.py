"""The optional Triton kernel modules: imported on first CUDA use, remembered as missing when Triton cannot load; and
the device guard their launches run under."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

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


def on_input_device(fn):
    """Run `fn(...)` with the GPU of its first tensor argument as the current device.

    Triton launches a kernel on the current CUDA device, not on its arguments' device. So on a model spread over
    several GPUs (transformers' device_map="auto"), a layer on cuda:1 called while cuda:0 is current would launch
    on the wrong device. When that tensor is already on the current device, or on no GPU at all (Triton's
    interpreter on a CPU), `fn` runs as it is.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        index = -1
        for arg in args:
            if isinstance(arg, torch.Tensor):
                index = arg.get_device()
                break
        if index < 0 or index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(index):
            return fn(*args, **kwargs)

    return run
