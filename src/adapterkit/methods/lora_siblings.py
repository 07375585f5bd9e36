"""Sibling LoRA layers: projections of one module that the model calls one after another on the same input.

A Llama-style attention calls q_proj(x), k_proj(x), v_proj(x); its MLP gate_proj(x), up_proj(x). When every sibling
is an adapted linear on the fused path, the first sibling's call (the leader's) computes all of their outputs as one
autograd node (`kernels/lora_group.py`: x read once per direction, one input gradient) and keeps the others' outputs
for their own calls, which hand them back. Training only: under no_grad each layer takes its own decode path.

A follower takes the kept output only when nothing could have changed it: the same tensor x, not modified in place
since (its version), the same A and B at the same versions, gradients still enabled. Each kept output is handed out
once; anything else (another input, another call order, a model that never calls a sibling) runs that layer's own
forward, which is always correct. The leader's call replaces whatever was kept before, so at most one call's
outputs are held per group.

Groups are made by `link_siblings` (attach calls it) from the names in SIBLINGS, per parent module, and each layer
holds its group in `_siblings`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..kernels.dequant4 import joint_dequantizer
from ..kernels.lora_group import grouped_lora_linear
from ..kernels.lora_linear import fused_node_applies, get_backend

# Sibling names, in the order the model calls them (the first present is the leader).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
            ("w1", "w3"))
# ADAPTERKIT_LORA_SIBLINGS=0: no groups (every layer its own node), read at each attach.
_ENV = "ADAPTERKIT_LORA_SIBLINGS"


class SiblingGroup:
    """The adapted siblings of one parent module; `group(layer, x)` is that layer's output or None (then the
    layer runs its own forward)."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...]) -> None:
        self.parent, self.names = parent, names
        self.layers = tuple(parent._modules[name] for name in names)
        self.kept: tuple | None = None  # (x, x's version, {layer index: (output, A, A's version, B, B's version)})
        self.joint = None  # a 4-bit base's one dequantizer for every sibling (dequant4.JointDequant4), or None

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if layer is self.layers[0]:
            return self._lead(x)
        kept = self.kept
        if kept is None:
            return None
        kept_x, version, outputs = kept
        entry = outputs.pop(self.layers.index(layer), None)  # handed out once, taken or not
        if not outputs:
            self.kept = None
        if entry is None or kept_x is not x or x._version != version or not torch.is_grad_enabled():
            return None
        out, a, a_version, b, b_version = entry
        lora_a, lora_b = layer._active_lora[0][:2] if len(layer._active_lora) == 1 else (None, None)
        if (lora_a is None or lora_a.weight is not a or lora_b.weight is not b or a._version != a_version
                or b._version != b_version):
            return None
        return out

    def _lead(self, x: torch.Tensor) -> torch.Tensor | None:
        self.kept = None
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or get_backend() == "triton":
            return None  # (compiled: each layer's own node traces; forced Triton: the layers' own kernels)
        specs = []
        for name, layer in zip(self.names, self.layers):
            spec = _spec(layer, x)
            if spec is None or self.parent._modules.get(name) is not layer:  # not fused, or no longer in the model
                return None
            specs.append(spec)
        outs = grouped_lora_linear(x, specs, self._joint([spec[0] for spec in specs]))
        self.kept = (x, x._version, {i: (outs[i], specs[i][2], specs[i][2]._version, specs[i][3],
                                         specs[i][3]._version) for i in range(1, len(specs))})
        return outs[0]

    def _joint(self, weights: list):
        """One dequantize launch for the siblings' 4-bit weights where they can share one (kept while every
        sibling's dequantizer stays the same object), else None."""
        joint = self.joint
        if joint is not None and len(joint.members) == len(weights) and all(
                a is b for a, b in zip(joint.members, weights)):
            return joint
        self.joint = joint = joint_dequantizer(weights)
        return joint


def _spec(layer: nn.Module, x: torch.Tensor) -> tuple | None:
    """(W or its dequantizer, bias, A, B, scaling) for the grouped node, or None where `layer` would not take the
    fused node itself with these operands (LoraLinear.forward, `fused_node_applies`), or has dropout (not fused
    here)."""
    fused = layer._fused
    if fused not in ("lora", "packed") or layer._routed is not None or not layer.training:
        return None
    lora_a, lora_b, _, p, scaling = layer._active_lora[0]
    base = layer.base_layer
    if fused == "lora":
        weight = base.weight
    elif x.dtype == layer.view.compute_dtype(base):
        weight = layer.view.dequantizer(base)
    else:
        return None
    bias = base.bias
    if p or (bias is not None and bias.dtype is not x.dtype) or not fused_node_applies(x, weight, bias, lora_a.weight,
                                                                                         lora_b.weight):
        return None
    return weight, bias, lora_a.weight, lora_b.weight, float(scaling)


def link_siblings(model: nn.Module, layer_type: type, names: tuple[tuple[str, ...], ...] | None = None) -> int:
    """Give every set of two or more `layer_type` siblings in `model` (by `names`, default SIBLINGS, or none where
    ADAPTERKIT_LORA_SIBLINGS=0) one SiblingGroup, and every other such layer none; returns the number of groups. Safe
    to call again after layers were added or replaced; `names=()` leaves every layer on its own node."""
    if names is None:
        names = () if os.environ.get(_ENV, "1").strip().lower() in ("0", "off", "false") else SIBLINGS
    for module in model.modules():
        if isinstance(module, layer_type):
            module._set_plain(_siblings=None)
    groups = 0
    for parent in model.modules():
        children = parent._modules
        for group_names in names:
            present = tuple(name for name in group_names if isinstance(children.get(name), layer_type))
            if len(present) < 2:
                continue
            group = SiblingGroup(parent, present)
            for layer in group.layers:
                layer._set_plain(_siblings=group)
            groups += 1
    return groups
