"""The wrapper contract every adapter layer follows, and what all of them share (activation, merge bookkeeping).

A wrapper replaces one module of the user's model in place and holds it as `base_layer`. It reads the base layer only
through its base-layer view (`base_layers.py`), so the same wrapper works on float and quantized storage.

What a method's layer class implements (see methods/lora.py for the full example):

    method: ClassVar[str]                      # the peft_type it belongs to; two methods never share a layer
    containers: ClassVar[tuple[str, ...]]      # ModuleDict / ParameterDict attributes holding per-adapter tensors,
                                               # named as PEFT names them (so state_dict keys read like PEFT's)
    add_adapter(name, cfg, path, ctx=None)     # build adapter `name` from its config for the module at `path`
    file_tensors(name) -> {suffix: tensor}     # what the adapter file holds for this module, by PEFT's key suffix
    adapter_level_tensors(name) -> {key: tensor}   # optional: tensors of the whole adapter (VeRA's shared
                                               # projections), by full file key; only the layer owning them
    refuses(base_layer) -> str | None          # optional classmethod: why a module of the right kind cannot be
                                               # wrapped (asked while targets are found, before the model changes)
    _refresh()                                 # rebuild the hot-path cache from `records`, active and merged names
    forward(...)                               # straight-line over the cache: no lookups by name, no config reads
    delta_weight(name) -> float32 tensor       # the update in the base weight's layout (merge, fingerprint, checks)
    max_delta_bound(name) -> float             # a cheap upper bound on |delta| entries (inf if not finite)

Per-adapter scalars live in one record per adapter (`records[name]`, a small dataclass of the method's own), never in
one dict per attribute. Tensors are registered in the containers and read from them when the cache is rebuilt or at
call time, never cached as Parameter objects across calls that can replace them (`load_state_dict(assign=True)`,
FSDP2): a cache holds modules, whose parameters are looked up when used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..base_layers import BaseView, view_of
from ..errors import MergeError, TargetError


@dataclass
class AttachContext:
    """What one `attach` call passes to every layer it builds.

    shared: scratch space for what several layers of one adapter share and one place owns (a deepcopy memo that keeps
        tied copies tied, tensors shared across layers, the embedding a tied head follows), keyed by the method.
    """

    dtype: torch.dtype | None = None  # adapter tensors' dtype; None: the base layer's compute dtype
    init: bool = True  # False: leave tensors uninitialised (a strict load fills every one)
    shared: dict[str, Any] = field(default_factory=dict)


class AdapterWrapper(nn.Module):
    """Base class of layer wrappers: the base layer, one record per adapter, activation and merge bookkeeping."""

    method: ClassVar[str] = ""
    containers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module, view: type[BaseView] | None = None) -> None:
        super().__init__()
        view = view or view_of(base_layer)
        if view is None:
            raise TargetError(f"no base-layer view for {type(base_layer).__name__}; it cannot carry an adapter.")
        self.base_layer = base_layer
        self._set_plain(
            **view.layout(base_layer),  # in_features, out_features, fan_in_fan_out
            training=base_layer.training,  # a new wrapper follows the mode of the layer it replaces
            view=view,
            records={},  # adapter name -> the method's record (scalars, sizes)
            active_names=(),
            merged_names=(),
            # The stored base weight as it was before merging: unmerge puts this very object back, so the base is
            # restored bit-exactly and any tie (a shared Parameter) with it. While merged it is a registered parameter
            # of the wrapper, so `.to(device)` moves it with the rest of the model.
            _unmerged_weight=None,
        )

    def _set_plain(self, **values: object) -> None:
        """Set attributes that are neither parameters nor modules straight into `__dict__`.

        nn.Module.__setattr__ checks every assignment against parameters, buffers and submodules; a wrapper is
        built once per adapted layer (hundreds per model), and those checks were a large part of `attach`.
        """
        self.__dict__.update(values)

    def _container(self, kind: type[nn.Module]) -> nn.Module:
        """An empty nn.ModuleDict / nn.ParameterDict in this wrapper's train/eval mode."""
        container = kind()
        container.__dict__["training"] = self.training
        return container

    # -- the contract ---------------------------------------------------------------------------------------------
    @classmethod
    def refuses(cls, base_layer: nn.Module) -> str | None:
        """Why this layer class cannot wrap `base_layer` (a message for TargetError), or None. Asked while targets
        are found, before the model changes; most layers accept every module of their kind."""
        return None

    def add_adapter(self, name: str, cfg: Any, path: str, ctx: AttachContext | None = None) -> None:
        raise NotImplementedError

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def adapter_level_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors adapter `name` holds for no single layer (shared across layers), by full file key: returned by
        the one layer that owns them, so they are saved and loaded once. Most methods have none."""
        return {}

    def _refresh(self) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def max_delta_bound(self, name: str) -> float:
        raise NotImplementedError

    # -- adapters -------------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.records)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_names:
            raise MergeError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge it first.")
        self.records.pop(name, None)
        for attr in self.containers:
            container = self._modules[attr]
            if name in container:
                del container[name]
        self.set_active(tuple(n for n in self.active_names if n != name))

    def set_active(self, names: tuple[str, ...]) -> None:
        self._set_plain(active_names=tuple(n for n in names if n in self.records))
        self._refresh()

    def _live(self) -> tuple[str, ...]:
        """Active adapters that are not merged: the ones the forward applies."""
        return tuple(n for n in self.active_names if n not in self.merged_names)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for attr in self.containers:
            container = self._modules[attr]
            if name in container:
                entry = container[name]
                params.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
        return params

    def _factory(self, ctx: AttachContext | None) -> dict:
        """device/dtype for new adapter tensors: the base layer's device and compute dtype unless ctx.dtype says."""
        base = self._modules["base_layer"]
        dtype = ctx.dtype if ctx is not None and ctx.dtype is not None else self.view.compute_dtype(base)
        return {"device": self.view.device(base), "dtype": dtype}

    # -- merge ----------------------------------------------------------------------------------------------------
    def add_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """`weight + delta_weight(name)` as a new float32 tensor; subclasses may fuse the two (no delta temporary)."""
        return weight + self.delta_weight(name)

    def add_delta_(self, weight: torch.Tensor, name: str) -> None:
        """In place: `weight += delta_weight(name)` (float32 weight)."""
        weight.add_(self.delta_weight(name))

    def merged_weight(self, names: tuple[str, ...]) -> torch.Tensor:
        """A new float32 tensor: the base weight (dequantized if packed) with adapters `names` folded in."""
        merged = self.view.float_weight(self.base_layer)
        for name in names:
            merged = self.add_delta(merged, name)
        return merged

    def merge(self, names: tuple[str, ...], keep_original: bool = True, shared: bool = True) -> None:
        """Fold the adapters into the base weight.

        keep_original: keep the stored weight so `unmerge` is exact. shared: the weight is also used by another module
        (tied). Either way the merge installs a new weight, leaving the original and its other users untouched; only a
        plain float32 weight that is neither kept nor shared is updated in place (no second copy).
        """
        names = tuple(n for n in names if n not in self.merged_names)
        if not names:
            return
        base, view = self.base_layer, self.view
        if keep_original or shared or not view.in_place_ok(base):
            if self._unmerged_weight is None and keep_original:
                self._unmerged_weight = view.saved_weight(base)
            view.install_weight(base, self.merged_weight(names))
        else:
            with torch.no_grad():
                for name in names:
                    self.add_delta_(base.weight, name)
        self._set_plain(merged_names=self.merged_names + names)
        self._refresh()

    def unmerge(self) -> None:
        if not self.merged_names:
            return
        if self._unmerged_weight is None:
            raise MergeError(
                f"{type(self.base_layer).__name__} was merged without keeping its original weight "
                "(unload(merge=True)); it cannot be unmerged."
            )
        self.view.restore_weight(self.base_layer, self._unmerged_weight)
        self._unmerged_weight = None
        self._set_plain(merged_names=())
        self._refresh()

    # -- conveniences so code that pokes at the wrapped layer keeps working ---------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={list(self.active_names)}, merged={list(self.merged_names)}"
