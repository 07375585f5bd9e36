"""(IA)³: files interchangeable with PEFT 0.21 both ways (Llama, GPT-2 Conv1D, tied Qwen2, a conv net), PEFT's
per-model defaults, multiplicative merge with exact unmerge (bias included), named adapters, refusals, training."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.methods.ia3 import IA3Conv2d, IA3Linear
from helpers import assert_state_equal, assert_unchanged, build, snapshot
from interop import (TOL, adapter_params, conv_net, file_shapes, output, ours_to_peft, peft_to_ours, train_steps,
                     two_adapters_both_ways)

peft = pytest.importorskip("peft")

MARK = ("ia3_l",)
CASES = {
    "llama": {},  # PEFT's defaults: k_proj, v_proj, down_proj (feed-forward)
    "gpt2": {},  # c_attn, mlp.c_proj (Conv1D, feed-forward)
    "qwen2": {"target_modules": "all-linear"},
    "llama_regex": {"target_modules": r".*\.(k_proj|up_proj|down_proj)", "feedforward_modules": r".*\.(up|down)_proj"},
}
CONV = {"target_modules": ["stem", "mix", "conv", "head"], "feedforward_modules": ["mix", "head"]}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_interop_both_directions(arch, tmp_path):
    kwargs = CASES[arch]
    arch = arch.split("_")[0]
    ours, _, peft_shapes = peft_to_ours(lambda: build(arch), peft.IA3Config(**kwargs), MARK, tmp_path)
    model, _ = ours_to_peft(lambda: build(arch), ak.IA3Config(**kwargs), MARK, tmp_path)
    assert file_shapes(tmp_path / "ak") == peft_shapes  # same names and shapes as PEFT writes
    saved = json.loads((tmp_path / "ak" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and "layers_to_transform" not in saved
    peft.IA3Config.from_pretrained(tmp_path / "ak")  # PEFT's own checks accept our JSON


def test_defaults_follow_peft_per_model_type():
    llama = ak.attach(build("llama"), ak.IA3Config())
    cfg = ak.adapters(llama)["default"]
    assert cfg.target_modules == ["k_proj", "v_proj", "down_proj"] and cfg.feedforward_modules == ["down_proj"]
    layer = llama.model.layers[0]
    assert layer.mlp.down_proj.ia3_l["default"].shape == (1, 64)  # feed-forward: scales the input
    assert layer.self_attn.k_proj.ia3_l["default"].shape == (16, 1)  # others: the output
    gpt2 = ak.attach(build("gpt2"), ak.IA3Config())
    cfg = ak.adapters(gpt2)["default"]
    assert cfg.fan_in_fan_out and cfg.feedforward_modules == ["mlp.c_proj"]
    assert not hasattr(gpt2.transformer.h[0].attn.c_proj, "ia3_l")  # "mlp.c_proj" is not "attn.c_proj"
    # Targets without the default feed-forward name: the saved list is narrowed so PEFT's subset check passes.
    only_q = ak.attach(build("llama"), ak.IA3Config(target_modules=["q_proj"]))
    assert ak.adapters(only_q)["default"].feedforward_modules == []


def test_conv_net_interop_and_grouped_merge(tmp_path):
    ours, _, peft_shapes = peft_to_ours(conv_net, peft.IA3Config(**CONV), MARK, tmp_path)
    assert isinstance(ours.mix, IA3Conv2d) and isinstance(ours.head, IA3Linear)
    assert ours.mix.ia3_l["default"].shape == (1, 8, 1, 1)
    model, expected = ours_to_peft(conv_net, ak.IA3Config(**CONV), MARK, tmp_path)
    assert file_shapes(tmp_path / "ak") == peft_shapes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ak.merge(model)  # grouped conv, feed-forward: each group's own input channels scaled
    assert (output(model) - expected).abs().max() <= TOL
    ak.unmerge(model)
    assert_state_equal(model.state_dict(), before)


def test_layer_formulas_by_hand():
    base = nn.Linear(3, 2)
    out_layer, in_layer = IA3Linear(base), IA3Linear(nn.Linear(3, 2))
    in_layer.base_layer.load_state_dict(base.state_dict())
    out_layer.add_adapter("default", ak.IA3Config(target_modules=["x"]), "x")
    in_layer.add_adapter("default", ak.IA3Config(target_modules=["x"], feedforward_modules=["x"]), "x")
    for layer in (out_layer, in_layer):
        layer.set_active(("default",))
    with torch.no_grad():
        out_layer.ia3_l["default"].copy_(torch.tensor([[2.0], [3.0]]))
        in_layer.ia3_l["default"].copy_(torch.tensor([[2.0, 0.0, -1.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(out_layer(x), base(x) * torch.tensor([2.0, 3.0]))
    assert torch.allclose(in_layer(x), base(torch.tensor([[2.0, 0.0, -3.0]])))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merge_unmerge_exact_and_unload(arch):
    model = ak.attach(build(arch), ak.IA3Config(target_modules="all-linear"))
    perturb_all(model)
    expected = output(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight_objects = [p for n, p in model.named_parameters() if "base_layer" in n]
    ak.merge(model)
    assert (output(model) - expected).abs().max() <= 1e-4
    ak.unmerge(model)
    assert_state_equal(model.state_dict(), before)  # weights *and* biases (GPT-2 scales them) bit-exact
    assert all(a is b for a, b in zip(weight_objects, [p for n, p in model.named_parameters() if "base_layer" in n]))
    ak.unload(model, merge=True)
    assert not any("ia3_l" in n for n, _ in model.named_parameters())
    assert (output(model) - expected).abs().max() <= 1e-4


def test_two_named_adapters_save_and_load(tmp_path):
    model = ak.attach(build("llama"), ak.IA3Config())
    ak.attach(model, ak.IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]), "other")
    perturb_all(model)
    two_adapters_both_ways(model, build, tmp_path)


def test_nan_refused_on_merge_and_save(tmp_path):
    model = ak.attach(build("llama"), ak.IA3Config())
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.ia3_l["default"][3, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ak.MergeError, match="non-finite"):
        ak.merge(model)
    assert_unchanged(model, before)
    with pytest.raises(ak.AdapterSaveError, match="non-finite"):
        ak.save(model, tmp_path / "out")


def test_bad_configs_refused():
    with pytest.raises(ak.ConfigError, match="feedforward_modules must be a subset of target_modules"):
        ak.IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ak.ConfigError, match="layers_to_transform / layers_pattern are not"):
        ak.IA3Config(target_modules=["q_proj"], layers_to_transform=[0])
    with pytest.raises(ak.ConfigError, match="init_ia3_weights must be true or false"):
        ak.IA3Config(init_ia3_weights="yes")
    with pytest.raises(ak.ConfigError, match="feedforward_modules 'down_proj\\(' is not a valid regular"):
        ak.IA3Config(feedforward_modules="down_proj(")
    model = conv_net()
    before = snapshot(model)
    with pytest.raises(ak.ConfigError, match="feedforward_modules is not set and there is no default"):
        ak.attach(model, ak.IA3Config(target_modules=["stem"]))
    assert_unchanged(model, before)
    with pytest.raises(ak.TargetError, match="IA3 applies to bnb4bit, bnb8bit, conv1d, conv2d, linear layers"):
        ak.attach(build("llama"), ak.IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))


def test_training_reduces_loss():
    model = ak.attach(build("llama"), ak.IA3Config(target_modules="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("ia3_l" in n for n in trainable)
    first, last = train_steps(model)
    assert last < first - 0.05, (first, last)


def perturb_all(model, scale=0.3):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter_params(model, MARK):
            p.add_(torch.randn(p.shape, generator=gen) * scale)
