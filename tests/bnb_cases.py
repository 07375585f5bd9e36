"""Quantized tiny models for the method tests on bitsandbytes bases: builders, the dequantized float twin, PEFT-side
preparation, the packed state an unmerge must restore, and adapter values copied between models by name.

Hidden size 64, so every projection has a multiple of 32 rows (bitsandbytes' CPU kernels need it). Llama has no
biases; OPT has them on every linear layer (an output-scaling merge scales them too).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.quantized import quantized_view
from helpers import build, input_ids

HIDDEN = 64
KINDS = ["nf4", "fp4", "int8"]
# Max |Δlogit| between a quantized model and its dequantized float twin carrying the same adapter: 4-bit layers
# dequantize exactly and compute in float32; int8 layers also quantize their inputs per row.
TOLERANCE = {"nf4": 2e-3, "fp4": 2e-3, "int8": 2e-2}


def quantized(arch: str, kind: str, seed: int = 0, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    return ak.quantize_model(build(arch, hidden=HIDDEN, seed=seed), kind, compute_dtype=compute_dtype).eval()


def float_twin(arch: str, model: nn.Module, seed: int = 0) -> nn.Module:
    """A float copy of the quantized `model` whose linear weights are its dequantized ones."""
    twin = build(arch, hidden=HIDDEN, seed=seed)
    for name, module in model.named_modules():
        view = quantized_view(module)
        if view is not None:
            twin.get_submodule(name).weight.data.copy_(view.float_weight(module))
    return twin


def without_cpu_repack(model: nn.Module) -> nn.Module:
    """What attach does to the 4-bit layers it adapts, for a model PEFT adapts: both then run the same 4-bit path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits.float()


def packed_state(model: nn.Module) -> dict[str, tuple]:
    """Every quantized layer's parameter object, stored data, absmax or row scales, and bias, by path."""
    out = {}
    for name, module in model.named_modules():
        if quantized_view(module) is None:
            continue
        w = module.weight
        scales = w.quant_state.absmax if hasattr(w, "quant_state") else (w.SCB if w.SCB is not None else module.state.SCB)
        bias = None if module.bias is None else module.bias.detach().clone()
        out[name] = (w, w.data.clone(), scales.clone(), bias)
    return out


def assert_packed_equal(before: dict[str, tuple], after: dict[str, tuple]) -> None:
    assert before.keys() == after.keys()
    for path, (param, data, scales, bias) in before.items():
        got = after[path]
        assert got[0] is param, path
        assert torch.equal(got[1], data) and torch.equal(got[2], scales), path
        assert (bias is None and got[3] is None) or (got[3].dtype == bias.dtype and torch.equal(got[3], bias)), path


@torch.no_grad()
def set_values(model: nn.Module, markers: tuple[str, ...], seed: int = 2, spread: float = 0.5) -> None:
    """Trainable adapter tensors named by `markers` set to 1 + spread * N(0, 1) (IA3 vectors far from identity; the
    same for any tensor), in sorted name order."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted((n, p) for n, p in model.named_parameters() if any(m in n for m in markers)):
        p.copy_(1 + spread * torch.randn(p.shape, generator=gen).to(p.dtype))


@torch.no_grad()
def copy_values(source: nn.Module, target: nn.Module, markers: tuple[str, ...]) -> int:
    """Copy adapter tensors from `source` to `target` by name (PEFT's `base_model.model.` prefix ignored)."""
    values = {n.removeprefix("base_model.model."): p for n, p in source.named_parameters() if any(m in n for m in markers)}
    count = 0
    for name, p in target.named_parameters():
        key = name.removeprefix("base_model.model.")
        if key in values:
            p.copy_(values[key])
            count += 1
    return count


def assert_unquantized_layers_refused(config) -> None:
    """bitsandbytes layers that hold float weights (a 4-bit layer never moved to a device, an 8-bit one with
    has_fp16_weights=True) are refused by `attach(config)`, config targeting "proj", and stay as they were."""
    import bitsandbytes as bnb

    class Net(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.proj = layer

    four = Net(bnb.nn.Linear4bit(64, 64, quant_type="nf4"))  # never moved to a device: still float
    with pytest.raises(ak.TargetError, match="not quantized yet"):
        ak.attach(four, config)
    eight = Net(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True).to("cpu"))
    with pytest.raises(ak.TargetError, match="has_fp16_weights=False"):
        ak.attach(eight, config)
    assert type(four.proj) is bnb.nn.Linear4bit and type(eight.proj) is bnb.nn.Linear8bitLt
    assert not ak.adapters(four) and not ak.adapters(eight)


def assert_reloads_exactly(model: nn.Module, fresh: nn.Module, path) -> None:
    """`model`'s adapter saved to `path` loads onto `fresh` (a new quantized copy of its base) as the same base, and
    `fresh` then gives `model`'s logits exactly."""
    want = logits(model)
    ak.save(model, path)
    report = ak.load(fresh, path)
    assert report.ok and report.base_check == "same base"
    assert torch.equal(logits(fresh), want)
