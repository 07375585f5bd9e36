"""LoRA+ (Hayou et al., 2024): optimizer parameter groups where B learns `loraplus_lr_ratio` times faster than A.

The groups are PEFT's (`create_loraplus_optimizer`), so the same model trains the same way with either library:

    group       members (trainable parameters only)                                lr               weight decay
    lora_A      everything not below                                              lr               loraplus_weight_decay
    embedding   parameters of LoRA embedding layers (lora_embedding_A and _B)     loraplus_lr_embedding  same
    lora_B      parameters under a `lora_B` container, and any 1-D parameter      lr * ratio       loraplus_weight_decay
    lora_B_no_decay  the lora_B members that are biases or live in a LayerNorm    lr * ratio       0

    opt = ak.create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .methods.lora import LoraEmbedding

DEFAULT_LR_EMBEDDING = 1e-6  # PEFT's default for LoRA on embedding layers


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that get no weight decay under HF Trainer's rule: inside an nn.LayerNorm, or named "bias"."""
    out: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            out.update(f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters())
    for name, _ in model.named_parameters():
        if "bias" in name:
            out.add(name)
    return out


def _holder(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The layer that owns parameter `name` through a per-adapter container (`<layer>.<container>.<adapter>[...]`)."""
    parts = name.split(".")
    return modules.get(".".join(parts[:-2])) if len(parts) > 2 else None


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = DEFAULT_LR_EMBEDDING,
) -> list[dict[str, Any]]:
    """Parameter groups for any torch optimizer (each with "params", "lr", "weight_decay" and a "name").

    Empty groups are left out. The trainable parameters of `model` are split as in the table of this module.
    """
    for key, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio),
                       ("loraplus_lr_embedding", loraplus_lr_embedding)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}.")
    if isinstance(loraplus_weight_decay, bool) or not isinstance(loraplus_weight_decay, (int, float)) \
            or not loraplus_weight_decay >= 0:
        raise ConfigError(f"loraplus_weight_decay must be a non-negative number, got {loraplus_weight_decay!r}.")
    modules = dict(model.named_modules())
    no_decay = _no_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "embedding": [], "lora_B": [], "lora_B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if isinstance(_holder(modules, name), LoraEmbedding):
            groups["embedding"].append(param)
        elif "lora_B" in name.split(".") or param.ndim == 1:
            groups["lora_B_no_decay" if name in no_decay else "lora_B"].append(param)
        else:
            groups["lora_A"].append(param)
    if not any(groups.values()):
        raise ConfigError(f"{type(model).__name__} has no trainable parameters; attach an adapter first.")
    settings = {
        "lora_A": (lr, loraplus_weight_decay),
        "embedding": (loraplus_lr_embedding, loraplus_weight_decay),
        "lora_B": (lr * loraplus_lr_ratio, loraplus_weight_decay),
        "lora_B_no_decay": (lr * loraplus_lr_ratio, 0.0),
    }
    return [{"params": params, "lr": settings[key][0], "weight_decay": settings[key][1], "name": key}
            for key, params in groups.items() if params]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = DEFAULT_LR_EMBEDDING,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over `loraplus_param_groups(...)`; other keyword arguments go to the optimizer (betas, eps)."""
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_weight_decay, loraplus_lr_embedding)
    return optimizer_cls(groups, lr=lr, **kwargs)
