"""Recompute a LoRA layer's input in backward from what autograd already keeps, instead of saving one more copy.

A frozen linear saves nothing of its input; LoRA needs it for dA. Where that input is a product of tensors that
autograd saved anyway — SwiGLU's act(gate) * up, RMSNorm's weight * (h * rsqrt(var)) — backward multiplies them
again (elementwise, bit-identical to the forward) and the layer keeps no copy. Anything else is saved as usual.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

# Modes: "off" (every LoRA input saved, as PyTorch would), "products" (the default: only an input that is a product of
# two tensors autograd saved anyway, as SwiGLU's act(gate) * up feeding down_proj: one multiply in backward), "all"
# (also RMSNorm outputs, rebuilt by every projection that reads them). On an H200 (Llama-3.2-1B shape, bf16, 8x1024,
# all-linear r=16; bench/README.md): off 1.13x the frozen base, +3.09 GiB; products 1.14x, +1.09 GiB; all 1.22x,
# +0.09 GiB.
MODES = ("off", "products", "all")
_ENV = {"0": "off", "off": "off", "1": "all", "all": "all", "products": "products", "": "products"}
_raw = os.environ.get("ADAPTERKIT_LORA_RECOMPUTE", "products").strip().lower()
if _raw not in _ENV:
    warnings.warn(f"ADAPTERKIT_LORA_RECOMPUTE={_raw!r} is none of 0, products, 1 (all): using products",
                  RuntimeWarning, stacklevel=2)
_mode = _ENV.get(_raw, "products")
_MAX_DEPTH = 3  # weight * to(h * r): three nodes deep at most
_HALF = (torch.bfloat16, torch.float16)


def set_input_recompute(enabled: bool | str) -> None:
    """Rebuild LoRA inputs in backward instead of saving them: "products" (the default: only products of saved
    tensors, the MLP's down_proj input), True / "all" (also norm outputs), False / "off" (every input saved).
    `ADAPTERKIT_LORA_RECOMPUTE=0|products|1` sets it for a whole process."""
    global _mode
    mode = {True: "all", False: "off"}.get(enabled, enabled) if isinstance(enabled, bool) else enabled
    if mode not in MODES:
        raise ValueError(f"input recompute mode must be one of {MODES} (or a bool), got {enabled!r}")
    _mode = mode


def input_recompute_enabled() -> bool:
    return _mode != "off"


def input_recompute_mode() -> str:
    return _mode


def _operand(node, index: int, out: torch.Tensor | None, depth: int):
    """A recipe for operand `index` of a MulBackward0 node: its saved value, or a recipe for its producer."""
    # mul saves `other` iff `self` needs grad and `self` iff `other` does (d(a*b)/da = b, d(a*b)/db = a).
    if node.next_functions[1 - index][0] is not None:
        name = "_saved_self" if index == 0 else "_saved_other"
        return lambda: getattr(node, name)
    return _recipe(node.next_functions[index][0], out, depth + 1)


def _recipe(node, out: torch.Tensor | None, depth: int) -> Callable[[], torch.Tensor] | None:
    """A function recomputing the output of `node` from saved tensors, or None when that is not certain to be exact.

    out: the tensor whose operand `node` produces, known only for the top-level product."""
    if node is None or depth > _MAX_DEPTH:
        return None
    kind = type(node).__name__
    if kind == "MulBackward0":
        a = _operand(node, 0, out if depth == 0 else None, depth)
        b = _operand(node, 1, out if depth == 0 else None, depth)
        if a is None or b is None:
            return None
        return lambda: a() * b()
    if kind == "ToCopyBackward0" and out is not None and out.dtype in _HALF:
        # A cast straight into a half-precision product: the product's dtype is the cast's target (a float operand
        # of any other type would have promoted the product to float32). Earlier casts are not inferred.
        inner = _recipe(node.next_functions[0][0], None, depth + 1)
        dtype, device = out.dtype, out.device
        return (lambda: inner().to(device=device, dtype=dtype)) if inner is not None else None
    return None


def input_recipe(x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """How to rebuild `x` exactly in backward from tensors autograd keeps anyway, or None (then save x).

    Called from a custom Function's forward; reads only graph structure there (nothing is unpacked until backward,
    when the producing node has not run its own backward yet: it consumes the gradient of x).
    """
    if _mode == "off" or torch.compiler.is_compiling():  # first: a traced tensor's grad_fn breaks the graph
        return None
    node = x.grad_fn
    if node is None or type(node).__name__ != "MulBackward0":
        return None
    if not _hooks_allow():
        return None
    if _mode == "products" and any(f is None for f, _ in node.next_functions[:2]):
        return None  # an operand without grad (a norm's weight): rebuilding would mean a chain of passes, not one
    return _recipe(node, x, 0)


def transparent(pack_hook: Callable) -> Callable:
    """Mark a saved-tensor pack hook that only observes (returns the tensor unchanged): recipes stay on under it."""
    pack_hook._adapterkit_transparent = True
    return pack_hook


def _hooks_allow() -> bool:
    """Recipes unpack other nodes' saved tensors, once per consumer; saved-tensor hooks may forbid that (checkpoint
    unpacks each once) or make it costly (offload copies back each time), and then the input is saved instead."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # another torch: assume hooks could be active
        return False
    return hooks is None or getattr(hooks[0], "_adapterkit_transparent", False)
