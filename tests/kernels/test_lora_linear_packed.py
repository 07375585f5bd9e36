"""The fused LoRA node over a packed 4-bit base (bitsandbytes Linear4bit): same values and gradients as the layer's
own forward plus the adapter, and no float copy of the weight kept for backward.

Real bitsandbytes on CPU. The loop path (bitsandbytes' Linear4bit forward, then the adapter added) is the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.kernels import lora_linear
from adapterkit.kernels.lora_linear import dropout_mask
from adapterkit.quantized import Bnb4bitView

bnb = pytest.importorskip("bitsandbytes")


class Block(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def packed_block(compute: torch.dtype, bias: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    dense = nn.Linear(64, 96, bias=bias)
    layer = bnb.nn.Linear4bit(64, 96, bias=bias, compute_dtype=compute, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.to(compute), requires_grad=False, quant_type="nf4")
    if bias:
        layer.bias = nn.Parameter(dense.bias.data.to(compute), requires_grad=False)
    return Block(layer.to("cpu"))


def attached(compute: torch.dtype, bias: bool, dropout: float) -> nn.Module:
    model = packed_block(compute, bias)
    torch.manual_seed(1)
    cfg = ak.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False, lora_dropout=dropout)
    ak.attach(model, cfg)
    return model.train()


def step(model: nn.Module, x: torch.Tensor, loop: bool, seed: int = 5):
    """Output and gradients (x, A, B) of one forward/backward, through the fused node or the loop path."""
    wrapper = model.proj
    if loop:
        wrapper.__dict__["_fused"] = None  # what every other multi-adapter / 8-bit layer runs
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    out.float().square().sum().backward()
    a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    grads = (x.grad, a.grad.clone(), b.grad.clone())
    a.grad = b.grad = None
    wrapper._refresh()
    return out.detach(), grads


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_packed_node_matches_the_layer_plus_adapter(compute, bias):
    model = attached(compute, bias, 0.0)
    assert model.proj._fused == "packed"
    x = torch.randn(3, 7, 64).to(compute)
    got, got_grads = step(model, x, loop=False)
    want, want_grads = step(model, x, loop=True)
    tol = 1e-5 if compute == torch.float32 else 2e-2
    assert got.dtype == want.dtype == compute
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    for g, w in zip(got_grads, want_grads):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * float(w.abs().max()))


def test_packed_node_with_dropout_matches_its_reference_mask():
    """With dropout the fused node's mask comes from its seed: compare against the plain composition with that
    very mask, over the dequantized weight."""
    model = attached(torch.float32, True, 0.25)
    wrapper = model.proj
    x = torch.randn(2, 5, 64, requires_grad=True)
    a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    scaling = wrapper.records["default"].scaling
    weight_fn = Bnb4bitView.dequantizer(wrapper.base_layer)
    out = lora_linear(x, weight_fn, wrapper.base_layer.bias, a, b, scaling, 0.25, True, seed=11)
    mask = dropout_mask(x, 0.25, 11)
    w = weight_fn()
    ref = x @ w.t() + wrapper.base_layer.bias + scaling * ((x * mask / 0.75) @ a.t()) @ b.t()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gx, ga = torch.autograd.grad(out.square().sum(), (x, a))
    rx, ra = torch.autograd.grad(ref.square().sum(), (x, a))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-4)


def test_packed_node_keeps_no_float_weight_for_backward():
    model = attached(torch.float32, False, 0.0)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    assert (96, 64) not in saved and (64, 96) not in saved, saved  # the dequantized weight is made again in backward
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_inference_and_other_dtypes_take_the_layer_path():
    """Without gradients bitsandbytes chooses its own kernels; an input in another dtype than the compute dtype is
    cast by the layer itself: both run the loop path, with the same values as the fused node would give."""
    model = attached(torch.float32, True, 0.0).eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        out = model(x)
    with torch.enable_grad():
        fused = model(x)
    torch.testing.assert_close(out, fused.detach(), rtol=1e-5, atol=1e-5)
    half = model(x.to(torch.bfloat16))  # the layer casts to its compute dtype and back
    assert half.dtype == torch.bfloat16
