"""What every adapter wrapper shares: the base layer, its named adapters, which are active, and merge bookkeeping.

A wrapper replaces one module of the user's model in place. Its `forward` must be straight-line: the active adapter's
tensors are cached in a tuple when activation changes, never looked up by name per call.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MergeError


class AdapterWrapper(nn.Module):
    """Base class of layer wrappers. Subclasses own their parameter containers and `delta_weight`."""

    # Names of the nn.ModuleDict / nn.ParameterDict attributes that hold per-adapter tensors.
    adapter_containers: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._set_plain(
            training=base_layer.training,  # a new wrapper follows the mode of the layer it replaces
            active_names=(),
            merged_names=(),
            # The base weight Parameter as it was before merging: unmerge puts this very object back, so the base is
            # restored bit-exactly and any weight tying (shared Parameter) is restored with it. While merged it is a
            # registered parameter of the wrapper, so `.to(device)` moves it with the rest of the model.
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
        container.__dict__["training"] = self.training  # a plain flag: what Module.__setattr__ would do, minus checks
        return container

    # -- adapters ---------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self._modules[self.adapter_containers[0]].keys())  # containers are registered submodules

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_names:
            raise MergeError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge it first.")
        getattr(self, "scaling", {}).pop(name, None)  # LoRA layers keep a per-adapter scale
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.set_active(tuple(n for n in self.active_names if n != name))

    def set_active(self, names: tuple[str, ...]) -> None:
        present = self.adapter_names
        self._set_plain(active_names=tuple(n for n in names if n in present))
        self._refresh()

    def _refresh(self) -> None:
        """Rebuild the hot-path cache after activation or merge state changed."""
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = []
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name in container:
                entry = container[name]
                params.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
        return params

    # -- merge ------------------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """The update to add to `base_layer.weight`, in the base weight's layout, computed in float32."""
        raise NotImplementedError

    def merged_weight(self, names: tuple[str, ...]) -> torch.Tensor:
        """A new tensor: the base weight with adapters `names` folded in, in the weight's dtype (summed in float32)."""
        weight = self.base_layer.weight
        merged = weight.detach().float()
        for name in names:
            merged = self.add_delta(merged, name)  # out of place: `weight` itself is kept for unmerge
        return merged.to(weight.dtype)

    def merge(self, names: tuple[str, ...], keep_original: bool = True, shared: bool = True) -> None:
        """Fold the adapters into the base weight.

        keep_original: keep the original Parameter so `unmerge` is exact. shared: the weight is also used by another
        module (tied). Either way the merge builds a new Parameter, leaving the original and its other users
        untouched; only a float32 weight that is neither kept nor shared is updated in place (no second copy).
        """
        names = tuple(n for n in names if n not in self.merged_names)
        if not names:
            return
        weight = self.base_layer.weight
        if keep_original or shared or weight.dtype != torch.float32:
            if self._unmerged_weight is None and keep_original:
                self._unmerged_weight = weight
            self.base_layer.weight = nn.Parameter(self.merged_weight(names), requires_grad=False)
        else:
            with torch.no_grad():
                for name in names:
                    self.add_delta_(weight, name)
        self.merged_names = self.merged_names + names
        self._refresh()

    def add_delta_(self, weight: torch.Tensor, name: str) -> None:
        """In place: `weight += delta_weight(name)` (float32 weight)."""
        weight.add_(self.delta_weight(name))

    def add_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """`weight + delta_weight(name)` as a new float32 tensor; subclasses may fuse the two (no delta temporary)."""
        return weight + self.delta_weight(name)

    def unmerge(self) -> None:
        if not self.merged_names:
            return
        if self._unmerged_weight is None:
            raise MergeError(
                f"{type(self.base_layer).__name__} was merged without keeping its original weight "
                "(unload(merge=True)); it cannot be unmerged."
            )
        self.base_layer.weight = self._unmerged_weight
        self._unmerged_weight = None
        self.merged_names = ()
        self._refresh()

    def max_delta_bound(self, name: str) -> float:
        """An upper bound on |delta| entries, cheap (no d x d product); inf when a factor is not finite."""
        raise NotImplementedError

    # -- conveniences so code that pokes at the wrapped layer keeps working ---------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={list(self.active_names)}, merged={list(self.merged_names)}"
