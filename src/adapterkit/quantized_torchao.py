"""torchao-quantized base layers: the view for an nn.Linear whose weight torchao's `quantize_` replaced by an int8
tensor subclass, and the refusal, before any change to the model, of every other torchao weight.

torchao is never imported here unless such a weight is merged (requantized): a layer is recognised by its weight's
class and module name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base_layers import BaseView
from .errors import TargetError

TORCHAO_SUPPORTED = {"Int8Tensor": "Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig"}


def _torchao_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight).__module__.startswith("torchao")


class TorchaoView(BaseView):
    """An nn.Linear whose weight torchao's `quantize_` replaced by a quantized tensor subclass.

    Supported: `Int8Tensor` without static activation scales (Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig);
    merging requantizes with the same granularity. Any other torchao weight is refused when it is matched, before the
    model changes.
    """

    kind = "torchao"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        if not (isinstance(module, nn.Linear) and _torchao_weight(module)):
            return False
        weight = module.weight
        name = type(weight).__name__
        static = any(getattr(weight, a, None) is not None for a in ("act_quant_scale", "act_pre_scale"))
        if name not in TORCHAO_SUPPORTED or static:
            raise TargetError(
                f"a torchao-quantized {type(module).__name__} with a {name}{' (static activation scales)' if static else ''} "
                f"weight cannot carry an adapter; adapterkit supports torchao weights from "
                f"{'; '.join(TORCHAO_SUPPORTED.values())}. Quantize with one of those, or with bitsandbytes "
                "(adapterkit.quantize_model), or exclude this layer from target_modules."
            )
        return True

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        out_features, in_features = module.weight.shape
        return in_features, out_features

    @staticmethod
    def float_weight(module: nn.Module) -> torch.Tensor:
        return module.weight.detach().dequantize().float()

    @staticmethod
    def install_weight(module: nn.Module, weight: torch.Tensor) -> None:
        from torchao.quantization.granularity import PerGroup, PerRow, PerTensor

        old = module.weight
        rows, cols = old.block_size
        granularity = PerTensor() if rows > 1 else PerRow() if cols == old.shape[1] else PerGroup(cols)
        new = type(old).from_hp(
            weight.to(device=old.device, dtype=old.dtype),
            granularity,
            act_quant_kwargs=getattr(old, "act_quant_kwargs", None),
            reduce_range=getattr(old, "reduce_range", False),
        )
        module.weight = nn.Parameter(new, requires_grad=False)

    @staticmethod
    def in_place_ok(module: nn.Module) -> bool:
        return False

    @staticmethod
    def saved_float_weight(module: nn.Module, saved: Any) -> torch.Tensor:
        return saved.detach().dequantize().float()

    @staticmethod
    def quantized(module: nn.Module) -> bool:
        return True
