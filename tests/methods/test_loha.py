"""LoHa: the update's math on hand-set factors, both forwards, PEFT interop both ways (tiny Llama, tied Qwen2, GPT-2's
tied head, a conv net), merge/unmerge exactness, named adapters, dropout, refusals and a training step."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.errors import ConfigError, TargetError
from adapterkit.methods.loha import LoHaLayer
from helpers import build, logits
from lycoris_cases import (bf16_unmerges_bit_exactly, CONV_TARGETS, ConvNet, merge_unmerge_unload, nan_refused,
                           round_trip, structured_gradients_match_dense, training_reduces_loss, two_named_adapters)

peft = pytest.importorskip("peft")

ATTN = ["q_proj", "v_proj", "down_proj"]
CASES = {
    # r=2 on 32/64-wide layers: the rank-r² forward; r=8: the formed-ΔW forward
    "llama_structured": ("llama", {"r": 2, "alpha": 3, "target_modules": ATTN}),
    "llama_dense": ("llama", {"r": 8, "alpha": 4, "target_modules": ATTN}),
    "llama_patterns": ("llama", {"r": 4, "alpha": 4, "target_modules": "all-linear", "rank_pattern": {"q_proj": 2},
                                 "alpha_pattern": {"down_proj": 7.0}}),
    "qwen2_tied_head": ("qwen2", {"r": 2, "alpha": 2, "target_modules": ["q_proj", "lm_head"]}),
    "gpt2_tied_head": ("gpt2", {"r": 3, "alpha": 6, "target_modules": ["lm_head"]}),
    "conv": ("conv", {"r": 2, "alpha": 3, "target_modules": CONV_TARGETS}),
    "conv_effective": ("conv", {"r": 2, "alpha": 3, "target_modules": CONV_TARGETS, "use_effective_conv2d": True}),
}


def _kwargs(case: str) -> tuple[str, dict]:
    arch, kwargs = CASES[case]
    return arch, {**kwargs, "init_weights": False}


def _layer(base: nn.Module, **cfg) -> LoHaLayer:
    layer = LoHaLayer(base)
    layer.add_adapter("default", ak.LoHaConfig(**{"init_weights": False, **cfg}), "layer")
    layer.set_active(("default",))
    return layer.eval()


def test_golden_delta() -> None:
    # By hand: W1a W1b = [1, 3]ᵀ [1, 2] = [[1, 2], [3, 6]], W2a W2b = [2, 1]ᵀ [1, 0] = [[2, 0], [1, 0]],
    # s = alpha / r = 3 / 1, so ΔW = 3 · [[1·2, 2·0], [3·1, 6·0]] = [[6, 0], [9, 0]].
    layer = _layer(nn.Linear(2, 2, bias=False), r=1, alpha=3)
    t = layer.file_tensors("default")
    with torch.no_grad():
        t["hada_w1_a"].copy_(torch.tensor([[1.0], [3.0]]))
        t["hada_w1_b"].copy_(torch.tensor([[1.0, 2.0]]))
        t["hada_w2_a"].copy_(torch.tensor([[2.0], [1.0]]))
        t["hada_w2_b"].copy_(torch.tensor([[1.0, 0.0]]))
        layer.base_layer.weight.zero_()
    expected = torch.tensor([[6.0, 0.0], [9.0, 0.0]])
    assert torch.equal(layer.delta_weight("default"), expected)
    assert torch.equal(layer(torch.tensor([[1.0, 1.0]])), torch.tensor([[6.0, 9.0]]))


@pytest.mark.parametrize("r", [2, 6])
def test_both_forwards_match_the_formed_update(r: int) -> None:
    torch.manual_seed(0)
    layer = _layer(nn.Linear(24, 40), r=r, alpha=5)
    assert layer.records["default"].structured == (r * r * 64 <= 24 * 40)
    x = torch.randn(3, 5, 24)
    expected = F.linear(x, layer.base_layer.weight + layer.delta_weight("default"), layer.base_layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("effective", [False, True])
def test_conv_matches_conv_with_merged_kernel(effective: bool) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    layer = _layer(base, r=3, alpha=2, use_effective_conv2d=effective)
    names = set(layer.file_tensors("default"))
    assert ("hada_t1" in names) == effective
    if effective:
        assert layer.hada_t1["default"].shape == (3, 3, 3, 2) and layer.hada_w1_a["default"].shape == (3, 6)
    else:
        assert layer.hada_w1_b["default"].shape == (3, 2 * 3 * 2)  # (r, in/groups · kh · kw)
    x = torch.randn(2, 4, 7, 7)
    expected = F.conv2d(x, base.weight + layer.delta_weight("default"), base.bias, base.stride, base.padding,
                        base.dilation, base.groups)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_effective_conv_is_off_for_1x1_kernels() -> None:
    layer = _layer(nn.Conv2d(4, 6, 1), r=2, use_effective_conv2d=True)
    assert "hada_t1" not in layer.file_tensors("default")


def test_default_init_starts_at_zero() -> None:
    torch.manual_seed(0)
    model = build("llama")
    before = logits(model)
    ak.attach(model, ak.LoHaConfig(r=4, target_modules=ATTN))
    assert torch.equal(logits(model), before)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.hada_w2_b["default"]) == 0
    w1a = layer.hada_w1_a["default"]  # (out, r): kaiming-uniform(a=sqrt 5) over fan_in = r
    assert w1a.abs().max() <= 1 / 4**0.5 and w1a.std() > 0.1


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_with_peft(case: str, tmp_path) -> None:
    arch, kwargs = _kwargs(case)
    round_trip(ak.LoHaConfig, peft.LoHaConfig, "hada_", arch, kwargs, tmp_path)


@pytest.mark.parametrize("case", ["llama_structured", "llama_dense", "qwen2_tied_head", "conv_effective"])
def test_merge_unmerge_unload(case: str) -> None:
    arch, kwargs = _kwargs(case)
    merge_unmerge_unload(ak.LoHaConfig, arch, kwargs)


def test_two_named_adapters(tmp_path) -> None:
    _, kw1 = _kwargs("llama_structured")
    _, kw2 = _kwargs("llama_patterns")
    two_named_adapters(ak.LoHaConfig, peft.LoHaConfig, "llama", kw1, kw2, tmp_path)


def test_nan_refused_on_merge_and_save(tmp_path) -> None:
    nan_refused(ak.LoHaConfig, "llama", _kwargs("llama_dense")[1], tmp_path)


def test_rank_dropout_masks_whole_output_rows_and_rescales() -> None:
    torch.manual_seed(0)
    layer = _layer(nn.Linear(8, 64, bias=False), r=2, rank_dropout=0.5)
    layer.base_layer.weight.data.zero_()  # the output is the adapter's alone
    x = torch.randn(4, 8)
    full = F.linear(x, layer.delta_weight("default"))  # (4, 64)
    assert torch.equal(layer(x), layer(x))  # eval: no dropout
    layer.train()
    out = layer(x)
    kept = (out != 0).all(0)  # (64,): each row kept or dropped for every input
    assert ((out == 0).all(0) | kept).all() and 0 < int(kept.sum()) < 64
    torch.testing.assert_close(out[:, kept], full[:, kept] * 64 / int(kept.sum()), atol=1e-5, rtol=0)


def test_module_dropout_skips_the_whole_adapter_while_training() -> None:
    torch.manual_seed(0)
    layer = _layer(nn.Linear(8, 8), r=2, module_dropout=0.5)
    x = torch.randn(3, 8)
    with_adapter, without = layer(x), layer.base_layer(x)
    layer.train()
    seen = set()
    for _ in range(40):
        out = layer(x)
        seen.add("on" if torch.allclose(out, with_adapter) else "off" if torch.equal(out, without) else "?")
    assert seen == {"on", "off"}


@pytest.mark.parametrize("bad, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": "8"}, "alpha must be a finite number"),
    ({"rank_dropout": 1.0}, r"rank_dropout must be in \[0, 1\)"),
    ({"module_dropout": -0.1}, r"module_dropout must be in \[0, 1\)"),
    ({"init_weights": "gaussian"}, "init_weights='gaussian' is not supported"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    ({"use_effective_conv2d": "yes"}, "use_effective_conv2d must be true or false"),
])
def test_bad_config_refused(bad: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ak.LoHaConfig(target_modules=["q_proj"], **bad)


def test_layers_peft_does_not_adapt_are_refused() -> None:
    model = build("gpt2")
    with pytest.raises(TargetError, match=r"'transformer.h.0.attn.c_attn', a Conv1D; LOHA applies to conv2d, linear"):
        ak.attach(model, ak.LoHaConfig(target_modules=["c_attn"]))
    assert not any(isinstance(m, LoHaLayer) for m in model.modules())
    net = ConvNet()
    net.stem.padding_mode = "circular"
    with pytest.raises(TargetError, match="padding_mode='circular' is not supported"):
        ak.attach(net, ak.LoHaConfig(target_modules=["stem"]))
    assert type(net.stem) is nn.Conv2d


def test_config_json_matches_peft(tmp_path) -> None:
    _, kwargs = _kwargs("llama_patterns")
    model = ak.attach(build("llama"), ak.LoHaConfig(**kwargs, rank_dropout=0.1, module_dropout=0.2))
    ak.save(model, tmp_path / "ak")
    ours = json.loads((tmp_path / "ak" / "adapter_config.json").read_text())
    cfg = peft.LoHaConfig.from_pretrained(tmp_path / "ak")
    assert (cfg.peft_type, cfg.r, cfg.alpha, cfg.rank_dropout, cfg.module_dropout) == ("LOHA", 4, 4, 0.1, 0.2)
    assert cfg.rank_pattern == {"q_proj": 2} and cfg.alpha_pattern == {"down_proj": 7.0}
    peft.get_peft_model(build("llama"), peft.LoHaConfig(**kwargs)).save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(theirs) - {"exclude_modules", "auto_mapping", "peft_version"} <= set(ours)


def test_training_step_reduces_loss() -> None:
    first, last = training_reduces_loss(ak.LoHaConfig, {"r": 4, "alpha": 8, "target_modules": "all-linear"})
    assert last < first - 0.3  # 4.87 -> 4.33 in 10 steps


def test_bfloat16_base_keeps_its_dtype_and_unmerges_bit_exactly() -> None:
    bf16_unmerges_bit_exactly(ak.LoHaConfig, ATTN)


def test_structured_forward_has_the_dense_gradients() -> None:
    torch.manual_seed(0)
    structured_gradients_match_dense(_layer(nn.Linear(24, 40), r=2, alpha=5), 24, 40)

