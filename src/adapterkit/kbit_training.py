"""Preparing a quantized (k-bit) model for adapter training: frozen base, normalization layers run in float32,
input gradients for gradient checkpointing; nothing else upcast."""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _norm_in_float32(module: nn.Module, args: tuple) -> tuple:
    module.__dict__["_adapterkit_norm_dtype"] = args[0].dtype
    return (args[0].float(),) + tuple(args[1:])


def _norm_back(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(module.__dict__["_adapterkit_norm_dtype"])


def prepare_for_kbit_training(
    model: nn.Module,
    *,
    gradient_checkpointing: bool = False,
    checkpointing_kwargs: dict | None = None,
    norms_in_float32: bool = True,
) -> nn.Module:
    """Get a quantized model ready for adapter training, in place; returns the same model.

    - Freezes every base parameter (adapters attached later are the only trainable tensors).
    - norms_in_float32: normalization layers whose weights are float16 / bfloat16 get float32 weights and run in
      float32 on a float32 copy of their input, their output cast back to the input's dtype. The residual stream, the
      embedding, the head and every other weight keep their dtype (PEFT's helper upcasts all of them to float32).
    - gradient_checkpointing=True turns it on (non-reentrant unless checkpointing_kwargs says otherwise). Whenever
      checkpointing is on, the embedding output is made to require grad, so reentrant checkpointing of frozen blocks
      still carries gradients to the adapters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if norms_in_float32:
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            if not _is_norm(module) or not params or all(p.dtype == torch.float32 for p in params):
                continue
            if module.__dict__.get("_adapterkit_norm_dtype", False) is not False:
                continue  # prepared before
            for p in params:
                p.data = p.data.float()
            module.__dict__["_adapterkit_norm_dtype"] = None
            module.register_forward_pre_hook(_norm_in_float32)
            module.register_forward_hook(_norm_back)
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ConfigError(f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers model).")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs or {"use_reentrant": False})
    if getattr(model, "is_gradient_checkpointing", False) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model
