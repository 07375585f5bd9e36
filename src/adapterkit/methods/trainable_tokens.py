"""Trainable tokens: chosen rows of an embedding table are replaced by trained values; every other row stays frozen.

PEFT's `trainable_token_indices`. The trained rows are stored as full values, not deltas (PEFT's semantics), under
`<embedding path>.token_adapter.trainable_tokens_delta`, shape (len(indices), dim). An output head whose weight is the
same tensor as the embedding (tied) follows the embedding's rows through `TiedTokensHead` and saves nothing itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetError
from .base import AdapterWrapper, AttachContext

FILE_SUFFIX = "token_adapter.trainable_tokens_delta"


class TrainableTokens(AdapterWrapper):
    """Wraps an nn.Embedding; rows `token_indices[name]` read from `trainable_tokens_delta[name]` instead."""

    method = "trainable_tokens"
    containers = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Embedding, view=None) -> None:
        super().__init__(base_layer, view)
        self.num_embeddings, self.embedding_dim = self.view.features(base_layer)
        self.trainable_tokens_delta = self._container(nn.ParameterDict)
        # Hot path: ((slot_of_token (num_embeddings,) long, -1 = not trained), adapter name) per active adapter.
        self._set_plain(_active_tokens=())

    def add_adapter(self, name: str, cfg, path: str, ctx: AttachContext | None = None) -> None:
        indices = indices_for(cfg.trainable_token_indices, path)
        weight = self.base_layer.weight
        rows = torch.tensor(indices, dtype=torch.long, device=weight.device)
        if ctx is None or ctx.init:
            values = weight.detach()[rows].clone()  # (k, dim): starts equal to the base rows, a no-op
        else:
            values = torch.empty(len(indices), self.embedding_dim, device=weight.device, dtype=weight.dtype)
        dtype = ctx.dtype if ctx is not None and ctx.dtype is not None else weight.dtype
        self.trainable_tokens_delta[name] = nn.Parameter(values.to(dtype))
        self.records[name] = list(indices)  # the record: which rows this adapter trains
        if ctx is not None:
            ctx.shared.setdefault("token_leaders", {})[id(weight)] = self

    def values(self, name: str) -> nn.Parameter:
        return self._modules["trainable_tokens_delta"]._parameters[name]

    def rows(self, name: str) -> torch.Tensor:
        return torch.tensor(self.records[name], dtype=torch.long, device=self.values(name).device)

    def _refresh(self) -> None:
        active = []
        for n in self._live():
            values = self.values(n)
            slots = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=values.device)
            slots[self.rows(n)] = torch.arange(len(self.records[n]), device=values.device)
            active.append((slots, n))
        self._set_plain(_active_tokens=tuple(active))

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(ids, *args, **kwargs)  # (..., dim)
        if self._active_tokens and self._active_tokens[0][0].device != out.device:
            self._refresh()  # the model was moved: rebuild the index tables on the new device
        scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma) scale in their forward
        for slots, name in self._active_tokens:
            values = self.values(name)
            slot = slots[ids]  # (...,)
            picked = values[slot.clamp(min=0)]  # (..., dim)
            if scale is not None:
                picked = picked * scale.to(picked.dtype)
            out = torch.where((slot >= 0).unsqueeze(-1), picked.to(out.dtype), out)
        return out

    def merged_weight(self, names: tuple[str, ...]) -> torch.Tensor:
        weight = self.base_layer.weight.detach().clone()
        for n in names:
            weight.index_copy_(0, self.rows(n).to(weight.device), self.values(n).detach().to(weight))
        return weight

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.merged_weight((name,)).float() - self.base_layer.weight.detach().float()

    def max_delta_bound(self, name: str) -> float:
        return 0.0 if torch.isfinite(self.values(name)).all() else float("inf")

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {FILE_SUFFIX: self.values(name)}


class TiedTokensHead(AdapterWrapper):
    """An output head tied to a `TrainableTokens` embedding: its output rows (logits) for the trained tokens use the
    same trained values. Owns no parameters; merging installs the embedding's merged Parameter so the tie survives."""

    method = "trainable_tokens"
    containers = ()

    def __init__(self, base_layer: nn.Module, view=None) -> None:
        super().__init__(base_layer, view)
        # A list, so the embedding is not registered (and saved) twice as a submodule; set by add_adapter.
        self._set_plain(_leader=[], _active_tokens=())

    @property
    def leader(self) -> TrainableTokens:
        return self._leader[0]

    def add_adapter(self, name: str, cfg=None, path: str = "", ctx: AttachContext | None = None) -> None:
        leaders = ctx.shared.get("token_leaders", {}) if ctx is not None else {}
        leader = leaders.get(id(self.base_layer.weight))
        if leader is None:
            raise TargetError(f"{path!r} follows a tied embedding's trained rows, but no such embedding was found.")
        self._leader[:] = [leader]
        self.records[name] = None  # owns nothing: the embedding wrapper holds (and trains) the shared rows

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return []  # the embedding wrapper owns (and sets requires_grad on) the shared values

    def _refresh(self) -> None:
        leader = self.leader if self._leader else None
        self._set_plain(_active_tokens=tuple(
            (leader.rows(n), n) for n in self._live() if leader is not None and n in leader.records
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., vocab)
        if self._active_tokens and self._active_tokens[0][0].device != out.device:
            self._refresh()  # the model was moved: rebuild the row index on the new device
        bias = getattr(self.base_layer, "bias", None)
        for rows, name in self._active_tokens:
            values = self.leader.values(name)
            picked = F.linear(x.to(values.dtype), values, None if bias is None else bias[rows])  # (..., k)
            out = out.index_copy(-1, rows, picked.to(out.dtype))
        return out

    def merge(self, names: tuple[str, ...], keep_original: bool = True, shared: bool = True) -> None:
        names = tuple(n for n in names if n not in self.merged_names)
        if not names:
            return
        if self._unmerged_weight is None and keep_original:
            self._unmerged_weight = self.base_layer.weight
        # The embedding merged first (it is attached first): share its new Parameter, keeping the tie.
        self.base_layer.weight = self.leader.base_layer.weight
        self._set_plain(merged_names=self.merged_names + names)
        self._refresh()

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.leader.delta_weight(name)

    def max_delta_bound(self, name: str) -> float:
        return self.leader.max_delta_bound(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {}


def indices_for(spec, path: str) -> list[int]:
    """The token rows `trainable_token_indices` names for the embedding at `path` (a list means the input embedding,
    already resolved to its path by targeting; a dict maps exact paths or ".name" suffixes to lists)."""
    if not isinstance(spec, dict):
        return list(spec)
    for key, indices in spec.items():
        if path == key or path.endswith(f".{key}"):
            return list(indices)
    raise TargetError(f"trainable_token_indices names no rows for {path!r}.")
