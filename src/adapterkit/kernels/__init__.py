"""Custom autograd functions and Triton kernels for adapter layers, each with a plain-PyTorch reference.

`lora_linear` is the fused LoRA linear the LoRA layer calls; `reference.lora_linear_reference` is its oracle.
"""

from .lora_linear import dropout_mask, get_backend, lora_linear, set_backend
from .recompute import input_recompute_enabled, input_recompute_mode, set_input_recompute
from .reference import lora_linear_reference

__all__ = ["dropout_mask", "get_backend", "lora_linear", "lora_linear_reference", "set_backend",
           "input_recompute_enabled", "input_recompute_mode", "set_input_recompute"]
