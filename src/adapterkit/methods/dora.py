"""DoRA (Liu et al., 2024; PEFT's `LoraConfig(use_dora=True)`): LoRA whose merged weight is renormalised per row.

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖        the norm detached (the paper's §4.3), m trained, init ‖W + s·B·A‖

Per layer type, as PEFT defines it (M below is the matrix whose rows are normalised, stored as `lora_magnitude_vector`):
- nn.Linear: M = W (out, in); m (out,). Conv1D stores W as (in, out): M = Wᵀ, m (out,).
- nn.Embedding: M = Wᵀ (dim, num_embeddings), so m (dim,) scales each embedding *dimension*, normalised over the vocab.

Forward, with y = the base output without bias and l = s·B(A(x)):
- linear, no dropout:   out = (y + l) ⊙ m/‖·‖ + bias
- linear, dropout on:   out = base(x) + (m/‖·‖ − 1) ⊙ (W·drop(x)) + m/‖·‖ ⊙ s·B(A(drop(x)))   (PEFT's formula)
- embedding:            out = (base(ids) + l) ⊙ m/‖·‖

The row norm never forms M + s·B·A (kernels/dora.py `dora_weight_norm`): a step costs one (rows × cols × r) product
and an r×r Gram matrix; ‖M_i‖² of the frozen base is computed once and cached. On a GPU, the first layer to find
its norm stale (an optimizer step changed its factors) refreshes every stale DoRA layer of the process on that device
in one launch (kernels/dora_group.py), so a training step issues one or two norm launches, not two per layer. On a
float nn.Linear / Conv1D with one DoRA adapter active, the forward is one autograd node (kernels/dora.py
`dora_linear`) that keeps x, x·Aᵀ and the layer's output (which the next op usually keeps anyway) rather than an
(N, out) pre-scale copy.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.dora import cached_weight_sq_norm, dora_weight_norm
from ..kernels.dora_group import groupable, grouped_norms

# Every live DoRA magnitude: a stale norm refreshes the stale ones among them that share its device in one launch.
_live: weakref.WeakSet = weakref.WeakSet()



class Magnitude(nn.Module):
    """`lora_magnitude_vector.<name>.weight` of one DoRA adapter, and the DoRA forward and merge of its layer."""

    def __init__(self, layer: nn.Module, name: str, record, init: bool, factory: dict) -> None:
        super().__init__()
        self.__dict__.update(name=name, record=record, training=layer.training, _cache=None,
                             _layer=weakref.ref(layer))
        rows = layer.embedding_dim if _is_embedding(layer) else layer.out_features
        weight = torch.empty(rows, **factory)
        if init:
            with torch.no_grad():
                weight.copy_(self.norm(layer))  # m = ‖W + s·B·A‖: DoRA starts as the LoRA it wraps
        self.register_parameter("weight", nn.Parameter(weight))
        _live.add(self)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_layer", None)  # a weak reference does not pickle; the layer is found again on the next miss
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__["_layer"] = _no_layer

    def _factors(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as (r, cols) and (rows, r) of M's row space (see the module docstring)."""
        if _is_embedding(layer):
            return layer.factors(self.name)  # A (r, num), B (dim, r)
        mods = layer._modules  # plain dict reads: this runs per layer and step
        return (mods["lora_A"]._modules[self.name]._parameters["weight"],  # A (r, in)
                mods["lora_B"]._modules[self.name]._parameters["weight"])  # B (out, r)

    def _matrix(self, layer: nn.Module) -> torch.Tensor:
        """M in the base's stored dtype (dequantized if packed): the matrix whose rows DoRA normalises."""
        base = layer.base_layer
        weight = base.weight if not layer.view.quantized(base) else layer.view.float_weight(base)
        transposed = _is_embedding(layer) or layer.view.fan_in_fan_out
        return weight.detach().T if transposed else weight.detach()

    def _state(self, layer: nn.Module) -> tuple:
        """(A, B, base weight, its stamp, the factors' stamps): what the cached norm is valid for."""
        a, b = self._factors(layer)
        base = layer._modules["base_layer"]
        weight = base._parameters.get("weight")
        if weight is None:
            weight = base.weight
        return a, b, weight, (weight._version, weight.data_ptr()), (a._version, b._version, a.data_ptr(), b.data_ptr())

    def _fresh(self, state: tuple) -> bool:
        cached = self._cache
        return (cached is not None and cached[0] is state[0] and cached[1] is state[1] and cached[2] is state[2]
                and cached[3] == state[3] and cached[4] == state[4])

    def norm(self, layer: nn.Module) -> torch.Tensor:
        """‖M + s·B·A‖ per row, float32, detached; cached while A, B and the base weight are unchanged.

        Training changes A and B every step, so this runs per layer and step: the check is a few dict and attribute
        reads, and ‖M‖² of a frozen float base is kept beside the norm (one global-cache lookup when the base weight
        changes). On a GPU a miss refreshes every stale layer at once (`_refresh_stale`).
        """
        state = self._state(layer)
        cached = self._cache
        if self._fresh(state):
            return cached[5]
        if self._layer() is not layer:  # unpickled or copied: join the live set with the layer that holds it now
            self.__dict__["_layer"] = weakref.ref(layer)
            _live.add(self)
        a, b, weight = state[:3]
        sq = cached[6] if cached is not None and cached[2] is weight and cached[3] == state[3] else None
        base = layer.base_layer
        transposed = _is_embedding(layer) or layer.view.fan_in_fan_out  # M = stored weightᵀ
        if layer.view.quantized(base):
            stored = layer.view.float_weight(base)  # dequantized each time the factors change
            norm = dora_weight_norm(stored, a, b, self.record.scaling, transposed)
        elif groupable(self._matrix(layer), a, b):
            return self._refresh_stale(layer, state)
        else:
            if sq is None:
                sq = cached_weight_sq_norm(weight, transposed)
            norm = dora_weight_norm(weight, a, b, self.record.scaling, transposed, sq)
        self.__dict__["_cache"] = (*state, norm, sq)
        return norm

    def _refresh_stale(self, layer: nn.Module, state: tuple) -> torch.Tensor:
        """This layer's norm, computed in one launch with those of every other stale, used DoRA layer on its device."""
        device = state[2].device
        todo = [(self, layer, state)]
        for other in list(_live):
            if other is self or other._cache is None or not other.training:
                continue
            other_layer = other._layer()
            if (other_layer is None
                    or other_layer._modules["lora_magnitude_vector"]._modules.get(other.name) is not other
                    or other_layer.view.quantized(other_layer._modules["base_layer"])):
                continue
            other_state = other._state(other_layer)
            if not other._fresh(other_state) and other_state[2].device == device:
                todo.append((other, other_layer, other_state))
        # (M, A, B) as they are: a float base (no dequantizing), read under no_grad by the kernel or its reference
        items = [(st[2].T if _is_embedding(lay) or lay.view.fan_in_fan_out else st[2], st[0], st[1])
                 for _, lay, st in todo]
        norms = grouped_norms(items, [mag.record.scaling for mag, _, _ in todo])
        for (mag, _, st), norm in zip(todo, norms):
            mag.__dict__["_cache"] = (*st, norm, mag._cache[6] if mag._cache is not None else None)
        return norms[0]

    def apply(self, layer: nn.Module, h: torch.Tensor, out: torch.Tensor, dropped: bool) -> torch.Tensor:
        """The layer's output with this DoRA adapter applied. h: the adapter's input (dropped out if `dropped`)."""
        scale = (self.weight / self.norm(layer).to(self.weight.dtype)).to(out.dtype)  # (rows,)
        s = self.record.scaling
        if _is_embedding(layer):
            a, b = layer.factors(self.name)
            lora = (layer.lookup(h, a) @ b.T) * s  # (..., dim)
            return (out + lora.to(out.dtype)) * scale
        lora = (layer.lora_B[self.name](layer.lora_A[self.name](h)) * s).to(out.dtype)  # (..., out)
        base = layer.base_layer
        bias = getattr(base, "bias", None)
        if not dropped:
            y = out if bias is None else out - bias
            result = (y + lora) * scale
            return result if bias is None else result + bias
        weight = self._matrix(layer)  # (out, in) in the stored dtype
        base_h = F.linear(h.to(weight.dtype), weight).to(out.dtype)
        return out + (scale - 1) * base_h + scale * lora

    def merged_weight(self, layer: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        """float32 m/‖·‖ ⊙ (weight + s·B·A) in the base's stored layout; `weight`: the running merge (default base)."""
        a, b = (t.detach().float() for t in self._factors(layer))
        factor = self.weight.detach().float() / self.norm(layer)  # (rows,)
        delta = (b @ a) * self.record.scaling  # (rows, cols) of M
        if weight is None:
            weight = layer.view.float_weight(layer.base_layer)
        if _is_embedding(layer) or layer.view.fan_in_fan_out:
            return (weight + delta.T) * factor[None, :]  # stored (cols, rows): factor scales columns
        return (weight + delta) * factor[:, None]


def _no_layer() -> None:
    return None


def _is_embedding(layer: nn.Module) -> bool:
    return layer.view.kind == "embedding"
