"""`modules_to_save`: a whole module trained as a full copy per adapter, the original kept frozen beside it.

Internal parameter names match PEFT (`<path>.modules_to_save.<name>.weight`); in the file the copy is saved under
the module's own key (`base_model.model.<path>.weight`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..base_layers import BaseView
from .base import AdapterWrapper, AttachContext


class TrainableCopy(AdapterWrapper):
    """Holds `base_layer` (the original, frozen) and `modules_to_save[name]` (trainable copies); forwards to one."""

    method = "modules_to_save"
    containers = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module, view=None) -> None:
        super().__init__(base_layer, view=_AnyModule)
        self.modules_to_save = self._container(nn.ModuleDict)
        # Hot path: the module forward runs. Kept out of `_modules` (set through __dict__), so it is not a second
        # registered child: no duplicate state-dict keys, no phantom tie between `_current` paths.
        self.__dict__["_current"] = base_layer

    def add_adapter(self, name: str, cfg=None, path: str = "", ctx: AttachContext | None = None) -> None:
        # One deepcopy memo across all copies made for one adapter keeps tensors that the originals share (tied
        # embedding and head) shared between the copies too.
        memo = ctx.shared.setdefault("modules_to_save_memo", {}) if ctx is not None else {}
        new = copy.deepcopy(self.base_layer, memo)
        if ctx is not None and ctx.dtype is not None:
            new.to(ctx.dtype)
        for p in new.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = new
        self.records[name] = None  # a copy has no scalars of its own

    def _refresh(self) -> None:
        # A merged copy stays in use whatever is active, just as merged LoRA weights do.
        chosen = list(self.merged_names) or [n for n in self.active_names if n in self.modules_to_save]
        self.__dict__["_current"] = self.modules_to_save[chosen[-1]] if chosen else self.base_layer

    def forward(self, *args, **kwargs):
        return self._current(*args, **kwargs)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict(keep_vars=True))

    # A copy replaces the module when merging: there is no delta, and unmerge is a pointer swap back.
    def merge(self, names: tuple[str, ...], keep_original: bool = True, shared: bool = True) -> None:
        names = tuple(n for n in names if n in self.modules_to_save)
        if names:
            self._set_plain(merged_names=names[-1:])
            self._refresh()

    def unmerge(self) -> None:
        self._set_plain(merged_names=())
        self._refresh()

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError("a modules_to_save copy replaces its module; it has no delta")

    def max_delta_bound(self, name: str) -> float:
        return 0.0 if all(torch.isfinite(p).all() for p in self.modules_to_save[name].parameters()) else float("inf")

    @property
    def weight(self) -> torch.Tensor:
        return self._current.weight


class _AnyModule(BaseView):
    """The base-layer view of a module copied whole: any module type."""

    kind = "module"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return True

    @classmethod
    def layout(cls, module: nn.Module) -> dict:
        return {}  # a whole module has no in / out features

    @staticmethod
    def compute_dtype(module: nn.Module) -> torch.dtype:
        return next(module.parameters()).dtype
