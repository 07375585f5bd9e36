"""OFT: files interchangeable with PEFT 0.21 both ways (Llama, GPT-2's tied `wte`, tied Qwen2, a 1x1 conv net), the
rotation's math, exact/Neumann Cayley, block sharing, merge/unmerge, named adapters, refusals, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.methods.oft import OFTLinear, Rotation, _nearest_divisor
from helpers import assert_state_equal, assert_unchanged, build, snapshot
from interop import (TOL, adapter_params, conv_net, file_shapes, output, ours_to_peft, peft_to_ours, train_steps,
                     two_adapters_both_ways)

peft = pytest.importorskip("peft")

MARK = ("oft_R", "oft_embedding_R")
CASES = {
    "llama": {"target_modules": ["q_proj", "down_proj", "embed_tokens"], "oft_block_size": 8},
    "llama_exact_r": {"target_modules": ["q_proj", "up_proj"], "oft_block_size": 0, "r": 4,
                      "use_cayley_neumann": False},
    "llama_shared": {"target_modules": ["o_proj"], "block_share": True, "num_cayley_neumann_terms": 3,
                     "oft_block_size": 8},
    "gpt2": {"target_modules": ["wte"], "oft_block_size": 8},  # Conv1D is not an OFT layer; the tied embedding is
    "qwen2": {"target_modules": ["embed_tokens", "q_proj"], "oft_block_size": 16},
    "conv": {"target_modules": ["stem", "head"], "oft_block_size": 2},
}


def _builder(case):
    arch = case.split("_")[0]
    return conv_net if arch == "conv" else (lambda: build(arch))


@pytest.mark.parametrize("case", sorted(CASES))
def test_interop_both_directions(case, tmp_path):
    kwargs = CASES[case]
    _, _, peft_shapes = peft_to_ours(_builder(case), peft.OFTConfig(**kwargs), MARK, tmp_path, scale=0.1)
    model, _ = ours_to_peft(_builder(case), ak.OFTConfig(**kwargs), MARK, tmp_path, scale=0.1)
    ours = file_shapes(tmp_path / "ak")
    # PEFT also writes the whole base embedding (`...embed_tokens.base_layer.weight`); we write only the adapter.
    assert ours == {k: v for k, v in peft_shapes.items() if ".base_layer." not in k}


def test_layout_and_block_adjustment():
    with pytest.warns(UserWarning, match="oft_block_size 12 does not divide 32; using 8"):
        model = ak.attach(build("llama"), ak.OFTConfig(target_modules=["q_proj", "down_proj"], oft_block_size=12))
    q = model.model.layers[0].self_attn.q_proj
    down = model.model.layers[0].mlp.down_proj  # in_features 64: divisors 8 and 16 are as near; ties go down
    assert q.oft_R["default"].weight.shape == (4, 28)  # 4 blocks of 8: 8*7/2 upper entries each
    assert down.oft_R["default"].weight.shape == (8, 28)
    from peft.tuners.oft.layer import OFTLayer

    for n in (30, 32, 64, 96, 100):
        for value in range(1, 110):
            assert _nearest_divisor(n, value) == OFTLayer.adjust_oft_parameters(None, n, value), (n, value)


def test_rotation_math():
    cfg = ak.OFTConfig(target_modules=["x"], oft_block_size=4, use_cayley_neumann=False)
    rot = Rotation(2, 4, cfg, False, {"device": torch.device("cpu"), "dtype": torch.float64}, False)
    blocks = rot.matrices().detach()
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(blocks @ blocks.transpose(-1, -2), eye.expand(2, 4, 4), atol=1e-12)  # exact Cayley
    q = torch.zeros(4, 4, dtype=torch.float64)
    q[rot.rows, rot.cols] = rot.weight.detach()[0]
    q = q - q.T
    assert torch.allclose(blocks[0], (eye - q) @ torch.linalg.inv(eye + q), atol=1e-12)
    rot.__dict__["neumann"] = True  # five terms: I + 2Q + 2Q² + 2Q³ + Q⁴
    expected = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    assert torch.allclose(rot.matrices().detach()[0], expected, atol=1e-12)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.allclose(rot.rotate(x), x @ torch.block_diag(*rot.matrices().detach()), atol=1e-12)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_merge_unmerge_exact_and_unload(arch):
    model = ak.attach(build(arch), ak.OFTConfig(target_modules=["embed_tokens", "q_proj", "v_proj"],
                                                oft_block_size=8, init_weights=False))
    expected = output(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ak.merge(model)
    assert (output(model) - expected).abs().max() <= 1e-4
    ak.unmerge(model)
    assert_state_equal(model.state_dict(), before)
    if arch == "qwen2":
        assert model.lm_head.weight is model.model.embed_tokens.base_layer.weight  # tie restored
    ak.unload(model, merge=True)
    assert (output(model) - expected).abs().max() <= 1e-4


def test_two_active_adapters_merge_in_forward_order():
    model = ak.attach(build("llama"), ak.OFTConfig(target_modules=["q_proj"], oft_block_size=8, init_weights=False))
    ak.attach(model, ak.OFTConfig(target_modules=["q_proj", "k_proj"], oft_block_size=4, init_weights=False), "b")
    ak.attach(model, ak.OFTConfig(target_modules=["embed_tokens"], oft_block_size=8, init_weights=False), "c")
    ak.attach(model, ak.OFTConfig(target_modules=["embed_tokens"], oft_block_size=4, init_weights=False), "d")
    ak.set_active(model, ["default", "b", "c", "d"])
    expected = output(model)
    ak.merge(model)  # a new weight per layer
    assert (output(model) - expected).abs().max() <= 1e-4
    ak.unmerge(model)
    ak.unload(model, merge=True)  # float32, untied: folded in place
    assert (output(model) - expected).abs().max() <= 1e-4


def test_two_named_adapters_save_and_load(tmp_path):
    model = ak.attach(build("llama"), ak.OFTConfig(target_modules=["q_proj"], oft_block_size=8, init_weights=False))
    ak.attach(model, ak.OFTConfig(target_modules=["v_proj", "embed_tokens"], r=2, oft_block_size=0,
                                  init_weights=False), "other")
    two_adapters_both_ways(model, build, tmp_path)


def test_nan_refused_on_merge_and_save(tmp_path):
    model = ak.attach(build("llama"), ak.OFTConfig(target_modules=["q_proj"], oft_block_size=8))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.oft_R["default"].weight[1, 4] = float("nan")
    before = snapshot(model)
    with pytest.raises(ak.MergeError, match="non-finite"):
        ak.merge(model)
    assert_unchanged(model, before)
    with pytest.raises(ak.AdapterSaveError, match="non-finite"):
        ak.save(model, tmp_path / "out")


def test_bad_configs_refused():
    with pytest.raises(ak.ConfigError, match="set exactly one of r \\(4\\) and oft_block_size \\(32\\)"):
        ak.OFTConfig(r=4)
    with pytest.raises(ak.ConfigError, match="set exactly one of r \\(0\\) and oft_block_size \\(0\\)"):
        ak.OFTConfig(oft_block_size=0)
    with pytest.raises(ak.ConfigError, match="coft=True .* does not support"):
        ak.OFTConfig(coft=True)
    with pytest.raises(ak.ConfigError, match="bias='oft_only' is not supported"):
        ak.OFTConfig(bias="oft_only")
    with pytest.raises(ak.ConfigError, match="num_cayley_neumann_terms must be in"):
        ak.OFTConfig(num_cayley_neumann_terms=0)
    with pytest.raises(ak.ConfigError, match="coft=True"):
        ak.OFTConfig.from_dict({"peft_type": "OFT", "coft": True, "oft_block_size": 8, "r": 0})
    gpt2 = build("gpt2")
    before = snapshot(gpt2)
    with pytest.raises(ak.TargetError, match="OFT applies to conv2d, embedding, linear layers"):
        ak.attach(gpt2, ak.OFTConfig(target_modules=["c_attn"]))
    assert_unchanged(gpt2, before)
    net = conv_net()
    before = snapshot(net)
    with pytest.raises(ak.TargetError, match="'conv': OFT on a Conv2d with kernel \\(3, 3\\)"):
        ak.attach(net, ak.OFTConfig(target_modules=["stem", "conv"], oft_block_size=2))
    assert_unchanged(net, before)  # refused before the 1x1 stem was wrapped
    with pytest.raises(ak.TargetError, match="groups=2"):
        ak.attach(net, ak.OFTConfig(target_modules=["mix"], oft_block_size=2))


def test_training_reduces_loss():
    model = ak.attach(build("llama"), ak.OFTConfig(target_modules="all-linear", oft_block_size=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("oft_R" in n for n in trainable)
    first, last = train_steps(model, lr=0.02)
    assert last < first - 0.05, (first, last)
    assert isinstance(model.model.layers[0].mlp.up_proj, OFTLinear)
    assert all(p.abs().sum() > 0 for p in adapter_params(model, MARK))


def test_single_layer_forward_is_rotated_input():
    base = nn.Linear(4, 3)
    layer = OFTLinear(base)
    layer.add_adapter("default", ak.OFTConfig(target_modules=["x"], oft_block_size=2, init_weights=False), "x")
    layer.set_active(("default",))
    x = torch.randn(5, 4)
    rot = torch.block_diag(*layer.oft_R["default"].matrices().detach())
    assert torch.allclose(layer(x), base(x @ rot), atol=1e-6)
    assert torch.allclose(layer.delta_weight("default") + base.weight, base.weight @ rot.T, atol=1e-6)
