"""Activation memory for long contexts: per-decoder-layer checkpointing, offload of what is kept to host memory, and a
meter of the bytes autograd keeps for backward.

`checkpoint_layers(model)` wraps each decoder layer's forward (found generically: the outermost ModuleLists of
identical blocks, e.g. `model.model.layers`, `transformer.h`) in non-reentrant `torch.utils.checkpoint`, so it works
when nothing entering the layer requires grad (a frozen input embedding). `offload=True` moves what each layer keeps
to host memory (`torch.autograd.graph.save_on_cpu`): with recompute, the layers' inputs; without, all their saved
activations. No module is replaced, so state-dict keys, hooks and saving are untouched; `uncheckpoint_layers` undoes it.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError
from .kernels.recompute import transparent

_STATE = "_adapterkit_memory"  # layer.__dict__ key: (forward to call, offload, recompute, previous instance forward)
# Keyword arguments that carry a KV cache: a recomputed layer would append to it a second time in backward.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of `model`: children of the outermost ModuleLists whose entries are all one class (with
    parameters), in model order. Lists nested inside such a block (experts, sub-layers) are part of their block."""
    found: list[nn.Module] = []
    stack = [model]
    while stack:
        module = stack.pop()
        children = [c for c in module._modules.values() if c is not None]
        if isinstance(module, nn.ModuleList) and children and len({type(c) for c in children}) == 1 \
                and any(True for _ in children[0].parameters()):
            found.extend(children)
            continue
        stack.extend(reversed(children))
    return found


def _pin() -> bool:
    return torch.cuda.is_available()


def _memory_forward(self: nn.Module, *args, **kwargs):
    forward, offload, recompute, _ = self.__dict__[_STATE]
    if not torch.is_grad_enabled():  # inference: nothing is kept for backward, run the layer as it is
        return forward(*args, **kwargs)
    offloading = torch.autograd.graph.save_on_cpu(pin_memory=_pin()) if offload else contextlib.nullcontext()
    if not recompute:
        with offloading:
            return forward(*args, **kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    for key in _CACHE_KWARGS:
        if kwargs.get(key) is not None:
            kwargs[key] = None
    # Every argument goes in positionally: checkpoint keeps positional tensors as saved tensors (offloaded with the
    # rest when offloading), keyword arguments only by reference.
    names = tuple(kwargs)
    n_args = len(args)

    def run(*flat):
        return forward(*flat[:n_args], **dict(zip(names, flat[n_args:])))

    with offloading:
        return checkpoint(run, *args, *kwargs.values(), use_reentrant=False)


def checkpoint_layers(
    model: nn.Module,
    *,
    offload: bool | int = False,
    recompute: bool = True,
    layers: list[nn.Module] | None = None,
) -> nn.Module:
    """Recompute each decoder layer in backward instead of keeping its activations (in place; returns the model).

    Args:
        offload: keep what remains on host memory instead of the accelerator (pinned when CUDA is present). True:
            every layer; an int N: the first N layers only, the rest keep theirs on the accelerator. For when host
            memory cannot hold every layer's checkpoint (at 400k tokens an 8B model's 32 checkpoints are 105 GB) but
            the accelerator has room for some: the first layers' checkpoints wait longest for backward, the last
            layers' are read back first.
        recompute: False keeps every activation but offloads it (needs offload=True): no recompute, more transfers.
        layers: the blocks to wrap (default: `decoder_layers(model)`).

    Gradients equal those of the plain model (the recompute replays the RNG state, so dropout matches). A KV cache
    handed to a recomputed layer is dropped, as transformers' own gradient checkpointing does. Calling it again
    reconfigures the same layers; `uncheckpoint_layers` restores the plain forward.
    """
    if not isinstance(offload, (bool, int)) or offload < 0:
        raise ConfigError(f"offload must be True, False or a number of layers (an int >= 0), got {offload!r}")
    if not recompute and not offload:
        raise ConfigError("checkpoint_layers(recompute=False) only makes sense with offload=True: without either, "
                          "the layers keep their activations as they do unwrapped")
    targets = decoder_layers(model) if layers is None else list(layers)
    if not targets:
        raise ConfigError(f"{type(model).__name__}: found no decoder layers (an nn.ModuleList of identical blocks, "
                          "e.g. model.model.layers); pass layers=[...] explicitly")
    n_offload = len(targets) if offload is True else int(offload)
    if n_offload > len(targets):
        raise ConfigError(f"offload={offload}: the model has {len(targets)} decoder layers to checkpoint; offload at "
                          f"most that many (or True for all)")
    if not recompute and n_offload < len(targets):
        raise ConfigError("checkpoint_layers(recompute=False) offloads every layer's activations: offload=True, not "
                          f"{offload}")
    for i, layer in enumerate(targets):
        off = i < n_offload
        state = layer.__dict__.get(_STATE)
        if state is not None:  # already wrapped: keep the original forward, change the settings
            layer.__dict__[_STATE] = (state[0], off, recompute, state[3])
            continue
        previous = layer.__dict__.get("forward")  # an instance-level forward someone else installed, or None
        layer.__dict__[_STATE] = (layer.forward, off, recompute, previous)
        layer.forward = types.MethodType(_memory_forward, layer)
    return model


def uncheckpoint_layers(model: nn.Module) -> nn.Module:
    """Undo `checkpoint_layers` on every wrapped module of `model` (in place; returns the model)."""
    for module in model.modules():
        state = module.__dict__.pop(_STATE, None)
        if state is None:
            continue
        if state[3] is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = state[3]
    return model


@contextlib.contextmanager
def checkpointed(model: nn.Module, *, offload: bool | int = False, recompute: bool = True) -> Iterator[nn.Module]:
    """`with checkpointed(model): loss.backward()`-style scope for `checkpoint_layers`; restored on exit."""
    checkpoint_layers(model, offload=offload, recompute=recompute)
    try:
        yield model
    finally:
        uncheckpoint_layers(model)


class SavedTensorMeter:
    """Counts the bytes autograd keeps for backward inside the `with` block, each storage once.

    Tensors that share storage (views of one tensor, one input saved by several nodes) count once, which is what the
    accelerator actually holds. Parameters are excluded (they exist anyway). `by_shape` maps (shape, dtype) to bytes.
    """

    def __init__(self, exclude: list[torch.Tensor] | None = None) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude or ()}
        self._seen: dict[int, int] = {}
        self.by_shape: dict[tuple, int] = {}
        self.saves = 0  # pack calls, shared or not
        self._hooks = torch.autograd.graph.saved_tensors_hooks(transparent(lambda t: self._pack(t)), lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.saves += 1
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._exclude and key not in self._seen and not isinstance(t, nn.Parameter):
            self._seen[key] = storage.nbytes()
            shape = (tuple(t.shape), str(t.dtype).replace("torch.", ""))
            self.by_shape[shape] = self.by_shape.get(shape, 0) + storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def storages(self) -> int:
        return len(self._seen)

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
