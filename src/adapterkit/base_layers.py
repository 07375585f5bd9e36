"""The base-layer view: what an adapter needs to know about the layer it wraps, whatever that layer stores.

A wrapper never reads `base_layer.weight` directly for sizes, dtype or merging: it asks the layer's view. A view is a
stateless class chosen once per layer by `view_of` from `VIEWS` (first match wins; the most specific kinds come first,
so a quantized `Linear4bit`, which passes `isinstance(nn.Linear)`, is never mistaken for a float linear layer).

    view = view_of(module)            # None when no adapter can sit on this layer type
    view.kind                         # "linear" | "conv1d" | "embedding" | "conv2d" | ... (the method table's keys)
    view.features(module)             # (in_features, out_features) of the layer's function
    view.compute_dtype(module)        # the dtype the layer computes in (adapters take it by default)
    view.float_weight(module)         # float32 copy in the layer's own weight layout (dequantized if packed)
    view.install_weight(module, w)    # put a float32 weight (same layout) back: a new tensor, quantized if need be
    view.in_place_ok(module)          # may a merge update the stored weight in place (plain float32 storage)?
    view.saved_weight(module) / view.restore_weight(module, saved)   # keep and put back the exact stored weight
    view.saved_float_weight(module, saved)   # float32 values of a saved weight (dequantized if packed)
    view.quantized(module)            # packed storage: merges requantize, fingerprints dequantize
    view.prepare(module)              # called once by `attach` before an adapter wraps the layer (default: nothing)
    view.dequantizer(module)          # packed storage a fused kernel can read: a callable giving the (out, in)
                                      # weight in the compute dtype, made afresh each call; None otherwise

New base-layer kinds register with `register_view(view, before=...)` (bitsandbytes and torchao: quantized.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style `Conv1D` (a linear layer storing its weight as (in, out)), detected without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class BaseView:
    """The float, unquantized case; subclasses override what their storage changes."""

    kind: ClassVar[str] = ""
    fan_in_fan_out: ClassVar[bool] = False  # the stored weight is (in, out) (HF Conv1D)

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    @classmethod
    def layout(cls, module: nn.Module) -> dict:
        """in_features, out_features and fan_in_fan_out, set on every wrapper of this kind of layer."""
        in_features, out_features = cls.features(module)
        return {"in_features": in_features, "out_features": out_features, "fan_in_fan_out": cls.fan_in_fan_out}

    @staticmethod
    def compute_dtype(module: nn.Module) -> torch.dtype:
        return module.weight.dtype

    @staticmethod
    def device(module: nn.Module) -> torch.device:
        return module.weight.device

    @staticmethod
    def float_weight(module: nn.Module) -> torch.Tensor:
        return module.weight.detach().float()

    @staticmethod
    def stored_dtype(module: nn.Module) -> torch.dtype:
        return module.weight.dtype

    @staticmethod
    def install_weight(module: nn.Module, weight: torch.Tensor) -> None:
        old = module.weight
        module.weight = nn.Parameter(weight.to(old.dtype), requires_grad=False)

    @staticmethod
    def in_place_ok(module: nn.Module) -> bool:
        return module.weight.dtype == torch.float32

    @staticmethod
    def saved_weight(module: nn.Module) -> Any:
        return module.weight

    @staticmethod
    def restore_weight(module: nn.Module, saved: Any) -> None:
        module.weight = saved

    @staticmethod
    def saved_float_weight(module: nn.Module, saved: Any) -> torch.Tensor:
        return saved.detach().float()

    @staticmethod
    def prepare(module: nn.Module) -> None:
        return None

    @staticmethod
    def quantized(module: nn.Module) -> bool:
        return False

    @staticmethod
    def dequantizer(module: nn.Module):
        return None


class LinearView(BaseView):
    kind = "linear"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        out_features, in_features = module.weight.shape
        return in_features, out_features


class Conv1DView(BaseView):
    kind = "conv1d"
    fan_in_fan_out = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return is_conv1d(module)

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        in_features, out_features = module.weight.shape
        return in_features, out_features


class EmbeddingView(BaseView):
    kind = "embedding"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        num_embeddings, dim = module.weight.shape
        return num_embeddings, dim


class Conv2dView(BaseView):
    kind = "conv2d"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        return module.in_channels, module.out_channels


# First match wins: register more specific kinds (quantized linears) before the float ones they subclass.
VIEWS: list[type[BaseView]] = [Conv1DView, LinearView, EmbeddingView, Conv2dView]


def register_view(view: type[BaseView], before: type[BaseView] | None = LinearView) -> None:
    """Add a base-layer kind; `before`: the view it must be tried ahead of (a subclass's view before its parent's)."""
    if view in VIEWS:
        return
    VIEWS.insert(VIEWS.index(before) if before in VIEWS else len(VIEWS), view)


def view_of(module: nn.Module) -> type[BaseView] | None:
    for view in VIEWS:
        if view.matches(module):
            return view
    return None


def is_linear(module: nn.Module) -> bool:
    """A linear layer in PEFT's "all-linear" sense: nn.Linear (float or quantized) or transformers' Conv1D."""
    view = view_of(module)
    return view is not None and view.kind not in ("embedding", "conv2d")
