"""LoRA layers: the forward and delta math on hand-set tensors, init rules, dtype, and merge/unmerge exactness."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterkit import LoraConfig
from adapterkit.methods import lora
from adapterkit.methods.base import AttachContext


def _linear_wrapper(in_f=4, out_f=3, r=1, alpha=2.0, dtype=torch.float32, **cfg):
    base = nn.Linear(in_f, out_f, bias=False, dtype=dtype)
    wrapper = lora.wrap(base)
    wrapper.add_adapter("default", LoraConfig(r=r, lora_alpha=alpha, **cfg), "layer")
    wrapper.set_active(("default",))
    return wrapper


def test_linear_golden_values() -> None:
    # By hand: W = 0, A = [1 0 0 0], B = [1 2 3]^T, scaling = alpha / r = 2 / 1;
    # for x = [1 1 1 1]: A x = 1, so out = 2 * B * 1 = [2 4 6]; for x = [0 1 1 1]: A x = 0, out = 0.
    w = _linear_wrapper()
    with torch.no_grad():
        w.base_layer.weight.zero_()
        w.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        w.lora_B["default"].weight.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
    out = w(torch.tensor([[1.0, 1, 1, 1], [0.0, 1, 1, 1]]))
    assert torch.equal(out, torch.tensor([[2.0, 4, 6], [0.0, 0, 0]]))
    assert torch.equal(w.delta_weight("default"), torch.tensor([[2.0, 0, 0, 0], [4.0, 0, 0, 0], [6.0, 0, 0, 0]]))


def test_linear_matches_explicit_formula() -> None:
    torch.manual_seed(0)
    w = _linear_wrapper(16, 8, r=4, alpha=8.0, init_lora_weights=False)
    x = torch.randn(2, 5, 16)
    a, b = w.lora_A["default"].weight, w.lora_B["default"].weight
    expected = x @ w.base_layer.weight.T + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(w(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w(x), F.linear(x, w.base_layer.weight + w.delta_weight("default")), atol=1e-5, rtol=0)


def test_conv1d_delta_is_transposed() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(8, 16)  # nf=8 outputs, nx=16 inputs; weight (16, 8)
    wrapper = lora.wrap(base)
    assert wrapper.fan_in_fan_out and (wrapper.in_features, wrapper.out_features) == (16, 8)
    wrapper.add_adapter("default", LoraConfig(r=4, lora_alpha=4, init_lora_weights=False), "c_attn")
    wrapper.set_active(("default",))
    x = torch.randn(3, 16)
    assert wrapper.delta_weight("default").shape == (16, 8)
    torch.testing.assert_close(wrapper(x), x @ (base.weight + wrapper.delta_weight("default")) + base.bias,
                               atol=1e-5, rtol=0)


def test_embedding_matches_lookup_of_merged_table() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(10, 6)
    wrapper = lora.wrap(base)
    wrapper.add_adapter("default", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False), "embed_tokens")
    wrapper.set_active(("default",))
    assert wrapper.lora_embedding_A["default"].shape == (2, 10)  # PEFT's layout: A (r, num), B (dim, r)
    assert wrapper.lora_embedding_B["default"].shape == (6, 2)
    ids = torch.tensor([[0, 3, 9, 3]])
    torch.testing.assert_close(wrapper(ids), F.embedding(ids, base.weight + wrapper.delta_weight("default")),
                               atol=1e-6, rtol=0)


def test_default_init_is_a_no_op_and_a_is_kaiming() -> None:
    torch.manual_seed(0)
    w = _linear_wrapper(256, 8, r=8)
    assert torch.count_nonzero(w.lora_B["default"].weight) == 0
    a = w.lora_A["default"].weight
    # kaiming_uniform(a=sqrt(5)) on fan_in 256 is U(-1/sqrt(256), 1/sqrt(256)) = U(-1/16, 1/16).
    assert a.abs().max() <= 1 / 16 and a.abs().max() > 0.9 / 16
    x = torch.randn(4, 256)
    assert torch.equal(w(x), w.base_layer(x))
    g = _linear_wrapper(256, 8, r=8, init_lora_weights="gaussian").lora_A["default"].weight
    assert abs(g.std().item() - 1 / 8) < 0.02  # PEFT's gaussian init: std 1/r
    emb = lora.wrap(nn.Embedding(10, 4))
    emb.add_adapter("default", LoraConfig(r=2), "embed_tokens")
    assert torch.count_nonzero(emb.lora_embedding_A["default"]) == 0  # PEFT: A zero, B normal for embeddings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_dtype_follows_base_and_can_be_overridden(dtype) -> None:
    w = _linear_wrapper(dtype=dtype)
    assert w.lora_A["default"].weight.dtype == dtype
    w.add_adapter("other", LoraConfig(r=2), "layer", AttachContext(dtype=torch.float32))
    assert w.lora_B["other"].weight.dtype == torch.float32
    w.set_active(("other",))
    assert w(torch.randn(2, 4, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_unmerge_is_bit_exact(dtype) -> None:
    torch.manual_seed(0)
    w = _linear_wrapper(16, 16, r=4, alpha=8.0, dtype=dtype, init_lora_weights=False)
    original = w.base_layer.weight.detach().clone()
    x = torch.randn(3, 16, dtype=dtype)
    before = w(x)
    w.merge(("default",))
    assert not torch.equal(w.base_layer.weight, original)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(w(x), before, atol=tol, rtol=tol)
    w.unmerge()
    assert torch.equal(w.base_layer.weight, original)
    assert torch.equal(w(x), before)


def test_max_delta_bound_is_an_upper_bound() -> None:
    torch.manual_seed(0)
    w = _linear_wrapper(32, 16, r=4, alpha=8.0, init_lora_weights=False)
    assert w.delta_weight("default").abs().max() <= w.max_delta_bound("default") * (1 + 1e-6)
    with torch.no_grad():
        w.lora_B["default"].weight[0, 0] = float("nan")
    assert not math.isfinite(w.max_delta_bound("default"))


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear-fused", "conv1d-loop"])
def test_dropout_applies_only_while_training(conv1d) -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(8, 16) if conv1d else nn.Linear(16, 8)
    w = lora.wrap(base)
    w.add_adapter("default", LoraConfig(r=4, lora_alpha=4, lora_dropout=0.5, init_lora_weights=False), "layer")
    w.set_active(("default",))
    x = torch.randn(64, 16)
    delta = w.delta_weight("default")
    plain = x @ (base.weight + delta) + base.bias if conv1d else F.linear(x, base.weight + delta, base.bias)
    w.eval()
    torch.testing.assert_close(w(x), plain, atol=1e-5, rtol=0)
    w.train()
    out1, out2 = w(x), w(x)
    assert not torch.allclose(out1, plain, atol=1e-3) and not torch.allclose(out1, out2, atol=1e-3)
    # Dropout touches only the adapter branch: base output + s * B A (mask * x / (1 - p)) for some 0/1 mask.
    base_out = base(x)
    torch.manual_seed(1)
    out = w(x)
    torch.manual_seed(1)
    a, b = w.lora_A["default"].weight, w.lora_B["default"].weight
    dropped = F.dropout(x, 0.5, True)
    torch.testing.assert_close(out, base_out + (dropped @ a.T @ b.T) * w.records["default"].scaling, atol=1e-5, rtol=0)


def test_new_layers_follow_the_base_layers_mode() -> None:
    for training in (False, True):
        base = nn.Linear(8, 8).train(training)
        w = lora.wrap(base)
        w.add_adapter("default", LoraConfig(r=2), "layer")
        assert {m.training for m in w.modules()} == {training}
        w.train(not training)
        assert {m.training for m in w.modules()} == {not training}
