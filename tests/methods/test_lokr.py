"""LoKr: PEFT's size split, which tensors each layer gets, the Kronecker update on hand-set factors, both forwards,
PEFT interop both ways (tiny Llama, tied Qwen2, GPT-2's tied head, a conv net), merge/unmerge exactness, named
adapters, dropout, refusals and a training step."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.errors import ConfigError, TargetError
from adapterkit.methods.lokr import LoKrLayer, factorization
from helpers import build, logits
from lycoris_cases import (bf16_unmerges_bit_exactly, CONV_TARGETS, merge_unmerge_unload, nan_refused, round_trip,
                           structured_gradients_match_dense, training_reduces_loss, two_named_adapters)

peft = pytest.importorskip("peft")

ATTN = ["q_proj", "v_proj", "down_proj"]
CASES = {
    "llama": ("llama", {"r": 2, "alpha": 3, "target_modules": ATTN}),  # r small: W2 = W2a W2b
    "llama_full": ("llama", {"r": 8, "alpha": 4, "target_modules": ATTN}),  # W1, W2 in full
    "llama_decompose_both": ("llama", {"r": 1, "alpha": 2, "target_modules": ATTN, "decompose_both": True,
                                       "decompose_factor": 8}),
    "llama_patterns": ("llama", {"r": 4, "alpha": 4, "target_modules": "all-linear", "rank_pattern": {"q_proj": 1},
                                 "alpha_pattern": {"down_proj": 7.0}, "decompose_factor": 4}),
    "qwen2_tied_head": ("qwen2", {"r": 2, "alpha": 2, "target_modules": ["q_proj", "lm_head"]}),
    "gpt2_tied_head": ("gpt2", {"r": 3, "alpha": 6, "target_modules": ["lm_head"]}),
    "conv": ("conv", {"r": 1, "alpha": 3, "target_modules": CONV_TARGETS}),
    "conv_full": ("conv", {"r": 8, "alpha": 3, "target_modules": CONV_TARGETS}),
    "conv_effective": ("conv", {"r": 1, "alpha": 3, "target_modules": CONV_TARGETS, "use_effective_conv2d": True,
                                "decompose_both": True}),
}


def _kwargs(case: str) -> tuple[str, dict]:
    arch, kwargs = CASES[case]
    return arch, {**kwargs, "init_weights": False}


def _layer(base: nn.Module, **cfg) -> LoKrLayer:
    layer = LoKrLayer(base)
    layer.add_adapter("default", ak.LoKrConfig(**{"init_weights": False, **cfg}), "layer")
    layer.set_active(("default",))
    return layer.eval()


def test_factorization_matches_peft() -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for size in [1, 2, 7, 12, 32, 64, 96, 127, 128, 360, 576, 1536, 2048, 4096, 49152]:
        for factor in [-1, 1, 3, 4, 5, 8, 16, 100]:
            assert factorization(size, factor) == peft_factorization(size, factor), (size, factor)


@pytest.mark.parametrize("cfg, names", [
    ({"r": 8}, {"lokr_w1", "lokr_w2"}),  # r >= max(b, d) / 2: W2 in full
    ({"r": 2}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ({"r": 2, "decompose_both": True, "decompose_factor": 16}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}),
    ({"r": 1, "decompose_both": True, "decompose_factor": 8}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
])
def test_which_tensors_a_linear_layer_gets(cfg: dict, names: set) -> None:
    # 64 -> 32: out = 4·8 (or 8·4 / 16·2 with a factor), in = 8·8
    layer = _layer(nn.Linear(64, 32), **cfg)
    assert set(layer.file_tensors("default")) == names
    reference = peft.get_peft_model(nn.Sequential(nn.Linear(64, 32)), peft.LoKrConfig(target_modules=["0"], **cfg))
    theirs = {k.split(".")[-2]: tuple(v.shape) for k, v in reference.state_dict().items() if "lokr_" in k}
    assert {k: tuple(v.shape) for k, v in layer.file_tensors("default").items()} == theirs


def test_golden_kronecker_delta() -> None:
    # 4 -> 2 with decompose_factor=2: in = 2·2, out = 2·1, so W1 (2, 2) and W2 (1, 2). By hand, with
    # W1 = [[1, 2], [0, 1]], W2 = [[1, 3]] and s = alpha / r = 2 / 4:
    # W1 ⊗ W2 = [[1, 3, 2, 6], [0, 0, 1, 3]], ΔW = [[0.5, 1.5, 1, 3], [0, 0, 0.5, 1.5]]; ΔW·1 = [6, 2].
    layer = _layer(nn.Linear(4, 2, bias=False), r=4, alpha=2, decompose_factor=2)
    t = layer.file_tensors("default")
    assert {k: tuple(v.shape) for k, v in t.items()} == {"lokr_w1": (2, 2), "lokr_w2": (1, 2)}
    with torch.no_grad():
        t["lokr_w1"].copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
        t["lokr_w2"].copy_(torch.tensor([[1.0, 3.0]]))
        layer.base_layer.weight.zero_()
    assert torch.equal(layer.delta_weight("default"), torch.tensor([[0.5, 1.5, 1.0, 3.0], [0.0, 0.0, 0.5, 1.5]]))
    assert torch.equal(layer(torch.ones(1, 4)), torch.tensor([[6.0, 2.0]]))


@pytest.mark.parametrize("cfg", [{"r": 2}, {"r": 8}, {"r": 2, "decompose_factor": 1}])
def test_both_forwards_match_the_formed_update(cfg: dict) -> None:
    torch.manual_seed(0)
    layer = _layer(nn.Linear(24, 40), alpha=5, **cfg)
    x = torch.randn(3, 5, 24)
    expected = F.linear(x, layer.base_layer.weight + layer.delta_weight("default"), layer.base_layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    # decompose_factor=1 splits 24 as 1·24: the structured forward would cost more than the dense one
    assert layer.records["default"].structured == (cfg.get("decompose_factor") != 1)


@pytest.mark.parametrize("cfg", [{"r": 8}, {"r": 1}, {"r": 1, "use_effective_conv2d": True}])
def test_conv_matches_conv_with_merged_kernel(cfg: dict) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(8, 12, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    layer = _layer(base, alpha=2, **cfg)
    assert ("lokr_t2" in layer.file_tensors("default")) == bool(cfg.get("use_effective_conv2d"))
    x = torch.randn(2, 8, 7, 7)
    expected = F.conv2d(x, base.weight + layer.delta_weight("default"), base.bias, base.stride, base.padding,
                        base.dilation, base.groups)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init, zero", [(True, "lokr_w1"), ("lycoris", "lokr_w2_b")])
def test_inits_start_at_zero(init, zero: str) -> None:
    torch.manual_seed(0)
    model = build("llama")
    before = logits(model)
    ak.attach(model, ak.LoKrConfig(r=2, target_modules=ATTN, init_weights=init))
    assert torch.equal(logits(model), before)
    layer = model.model.layers[0].self_attn.q_proj
    tensors = layer.file_tensors("default")
    assert torch.count_nonzero(tensors[zero]) == 0
    assert all(torch.count_nonzero(t) == t.numel() for k, t in tensors.items() if k != zero)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_with_peft(case: str, tmp_path) -> None:
    arch, kwargs = _kwargs(case)
    round_trip(ak.LoKrConfig, peft.LoKrConfig, "lokr_", arch, kwargs, tmp_path)


@pytest.mark.parametrize("case", ["llama", "llama_full", "qwen2_tied_head", "conv_effective"])
def test_merge_unmerge_unload(case: str) -> None:
    arch, kwargs = _kwargs(case)
    merge_unmerge_unload(ak.LoKrConfig, arch, kwargs)


def test_two_named_adapters(tmp_path) -> None:
    _, kw1 = _kwargs("llama")
    _, kw2 = _kwargs("llama_patterns")
    two_named_adapters(ak.LoKrConfig, peft.LoKrConfig, "llama", kw1, kw2, tmp_path)


def test_nan_refused_on_merge_and_save(tmp_path) -> None:
    nan_refused(ak.LoKrConfig, "llama", _kwargs("llama_full")[1], tmp_path)


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_masks_whole_output_rows(scale: bool) -> None:
    torch.manual_seed(0)
    layer = _layer(nn.Linear(8, 64, bias=False), r=2, rank_dropout=0.5, rank_dropout_scale=scale)
    layer.base_layer.weight.data.zero_()
    x = torch.randn(4, 8)
    full = F.linear(x, layer.delta_weight("default"))  # (4, 64)
    assert torch.equal(layer(x), layer(x))  # eval: no dropout
    layer.train()
    out = layer(x)
    kept = (out != 0).all(0)
    assert ((out == 0).all(0) | kept).all() and 0 < int(kept.sum()) < 64
    factor = 64 / int(kept.sum()) if scale else 1.0  # PEFT rescales LoKr's kept rows only with rank_dropout_scale
    torch.testing.assert_close(out[:, kept], full[:, kept] * factor, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad, message", [
    ({"r": -1}, "r must be a positive integer"),
    ({"decompose_both": 1}, "decompose_both must be true or false"),
    ({"decompose_factor": 2.5}, "decompose_factor must be an integer"),
    ({"rank_dropout_scale": "no"}, "rank_dropout_scale must be true or false"),
    ({"init_weights": "gaussian"}, "init_weights='gaussian' is not supported"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
])
def test_bad_config_refused(bad: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ak.LoKrConfig(target_modules=["q_proj"], **bad)


def test_file_config_of_another_method_refused() -> None:
    with pytest.raises(ConfigError, match="LoKrConfig reads peft_type 'LOKR', the file says 'LOHA'"):
        ak.LoKrConfig.from_dict({"peft_type": "LOHA", "r": 4})


def test_gpt2_conv1d_refused_like_peft() -> None:
    model = build("gpt2")
    with pytest.raises(TargetError, match=r"a Conv1D; LOKR applies to conv2d, linear layers"):
        ak.attach(model, ak.LoKrConfig(target_modules=["c_attn"]))
    assert not any(isinstance(m, LoKrLayer) for m in model.modules())


def test_config_json_matches_peft(tmp_path) -> None:
    _, kwargs = _kwargs("llama_patterns")
    model = ak.attach(build("llama"), ak.LoKrConfig(**kwargs, rank_dropout=0.1, rank_dropout_scale=True))
    ak.save(model, tmp_path / "ak")
    ours = json.loads((tmp_path / "ak" / "adapter_config.json").read_text())
    cfg = peft.LoKrConfig.from_pretrained(tmp_path / "ak")
    assert (cfg.peft_type, cfg.r, cfg.decompose_factor, cfg.rank_dropout, cfg.rank_dropout_scale) == \
        ("LOKR", 4, 4, 0.1, True)
    assert cfg.rank_pattern == {"q_proj": 1} and cfg.alpha_pattern == {"down_proj": 7.0}
    peft.get_peft_model(build("llama"), peft.LoKrConfig(**kwargs)).save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(theirs) - {"exclude_modules", "auto_mapping", "peft_version"} <= set(ours)


def test_training_step_reduces_loss() -> None:
    first, last = training_reduces_loss(ak.LoKrConfig, {"r": 4, "alpha": 8, "target_modules": "all-linear"})
    assert last < first - 0.3  # 4.87 -> 4.40 in 10 steps


def test_bfloat16_base_keeps_its_dtype_and_unmerges_bit_exactly() -> None:
    bf16_unmerges_bit_exactly(ak.LoKrConfig, ATTN)


def test_structured_forward_has_the_dense_gradients() -> None:
    torch.manual_seed(0)
    structured_gradients_match_dense(_layer(nn.Linear(24, 40), r=2, alpha=5), 24, 40)

