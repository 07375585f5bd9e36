"""Trainable tokens: chosen rows of an embedding table are replaced by trained values; every other row stays frozen.

PEFT's `trainable_token_indices`. The trained rows are stored as full values, not deltas (PEFT's semantics), under
`<embedding path>.token_adapter.trainable_tokens_delta`, shape (len(indices), dim). An output head whose weight is the
same tensor as the embedding (tied) follows the embedding's rows through `TiedTokensHead` and saves nothing itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterWrapper

FILE_SUFFIX = "token_adapter.trainable_tokens_delta"


class TrainableTokens(AdapterWrapper):
    """Wraps an nn.Embedding; rows `token_indices[name]` read from `trainable_tokens_delta[name]` instead."""

    adapter_containers = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.trainable_tokens_delta = self._container(nn.ParameterDict)
        self.token_indices: dict[str, list[int]] = {}
        # Hot path: ((slot_of_token (num_embeddings,) long, -1 = not trained), values (k, dim)) per active adapter.
        self._active_tokens: tuple[tuple[torch.Tensor, nn.Parameter], ...] = ()

    def add_adapter(self, name: str, indices: list[int], *, dtype: torch.dtype | None = None, init: bool = True) -> None:
        weight = self.base_layer.weight
        rows = torch.tensor(indices, dtype=torch.long, device=weight.device)
        if init:
            values = weight.detach()[rows].clone()  # (k, dim): starts equal to the base rows, a no-op
        else:
            values = torch.randn(len(indices), self.embedding_dim, device=weight.device, dtype=weight.dtype)
        self.trainable_tokens_delta[name] = nn.Parameter(values.to(dtype or weight.dtype))
        self.token_indices[name] = list(indices)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.token_indices.pop(name, None)

    def rows(self, name: str) -> torch.Tensor:
        return torch.tensor(self.token_indices[name], dtype=torch.long, device=self.trainable_tokens_delta[name].device)

    def _refresh(self) -> None:
        active = []
        for n in self.active_names:
            if n in self.merged_names:
                continue
            values = self.trainable_tokens_delta[n]
            slots = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=values.device)
            slots[self.rows(n)] = torch.arange(len(self.token_indices[n]), device=values.device)
            active.append((slots, values))
        self._active_tokens = tuple(active)

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(ids, *args, **kwargs)  # (..., dim)
        if self._active_tokens and self._active_tokens[0][0].device != out.device:
            self._refresh()  # the model was moved: rebuild the index tables on the new device
        scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma) scale in their forward
        for slots, values in self._active_tokens:
            slot = slots[ids]  # (...,)
            picked = values[slot.clamp(min=0)]  # (..., dim)
            if scale is not None:
                picked = picked * scale.to(picked.dtype)
            out = torch.where((slot >= 0).unsqueeze(-1), picked.to(out.dtype), out)
        return out

    def merged_weight(self, names: tuple[str, ...]) -> torch.Tensor:
        weight = self.base_layer.weight.detach().clone()
        for n in names:
            weight.index_copy_(0, self.rows(n).to(weight.device), self.trainable_tokens_delta[n].detach().to(weight))
        return weight

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.merged_weight((name,)).float() - self.base_layer.weight.detach().float()

    def max_delta_bound(self, name: str) -> float:
        return 0.0 if torch.isfinite(self.trainable_tokens_delta[name]).all() else float("inf")

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {FILE_SUFFIX: self.trainable_tokens_delta[name]}


class TiedTokensHead(AdapterWrapper):
    """An output head tied to a `TrainableTokens` embedding: its output rows (logits) for the trained tokens use the
    same trained values. Owns no parameters; merging installs the embedding's merged Parameter so the tie survives."""

    adapter_containers = ()

    def __init__(self, base_layer: nn.Module, leader: TrainableTokens) -> None:
        super().__init__(base_layer)
        self._leader = [leader]  # a list, so the embedding is not registered (and saved) twice as a submodule
        self._names: list[str] = []
        self._active_tokens: tuple[tuple[torch.Tensor, nn.Parameter], ...] = ()

    @property
    def leader(self) -> TrainableTokens:
        return self._leader[0]

    @property
    def adapter_names(self) -> list[str]:
        return list(self._names)

    def add_adapter(self, name: str) -> None:
        self._names.append(name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return []  # the embedding wrapper owns (and sets requires_grad on) the shared values

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)  # refuses a merged adapter
        self._names.remove(name)

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active_names = tuple(n for n in names if n in self.adapter_names)
        self._refresh()

    def _refresh(self) -> None:
        leader = self.leader
        self._active_tokens = tuple(
            (leader.rows(n), leader.trainable_tokens_delta[n])
            for n in self.active_names
            if n not in self.merged_names and n in leader.trainable_tokens_delta
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., vocab)
        if self._active_tokens and self._active_tokens[0][0].device != out.device:
            self._refresh()  # the model was moved: rebuild the row index on the new device
        bias = getattr(self.base_layer, "bias", None)
        for rows, values in self._active_tokens:
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
        self.merged_names = self.merged_names + names
        self._refresh()

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.leader.delta_weight(name)

    def max_delta_bound(self, name: str) -> float:
        return self.leader.max_delta_bound(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {}
