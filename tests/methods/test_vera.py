"""VeRA: files interchangeable with PEFT 0.21 both ways (Llama, GPT-2 Conv1D, tied Qwen2), projections saved once
or rebuilt from the seed exactly as PEFT draws them, shared by every layer, merge/unmerge, named adapters, refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.methods.vera import VERA_A_KEY, VERA_B_KEY, VeraLinear
from helpers import assert_state_equal, assert_unchanged, build, snapshot
from interop import TOL, adapter_params, file_shapes, output, ours_to_peft, peft_to_ours, train_steps, two_outputs

peft = pytest.importorskip("peft")

MARK = ("vera_lambda",)
TARGETS = {"llama": ["q_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "qwen2": "all-linear"}


def _kwargs(arch, **extra):
    return {"r": 8, "target_modules": TARGETS[arch], "projection_prng_key": 5, **extra}


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_interop_both_directions(arch, save_projection, tmp_path):
    kwargs = _kwargs(arch, save_projection=save_projection)
    _, _, peft_shapes = peft_to_ours(lambda: build(arch), peft.VeraConfig(**kwargs), MARK, tmp_path)
    model, _ = ours_to_peft(lambda: build(arch), ak.VeraConfig(**kwargs), MARK, tmp_path)
    assert file_shapes(tmp_path / "ak") == peft_shapes
    assert (VERA_A_KEY in peft_shapes) is save_projection
    if save_projection:  # drawn from the seed with PEFT's calls: the very same values
        ours, theirs = load_file(tmp_path / "ak" / "adapter_model.safetensors"), load_file(
            tmp_path / "peft" / "adapter_model.safetensors")
        assert torch.equal(ours[VERA_A_KEY], theirs[VERA_A_KEY]) and torch.equal(ours[VERA_B_KEY], theirs[VERA_B_KEY])


def test_projections_shared_by_all_layers_and_held_once():
    model = ak.attach(build("llama"), ak.VeraConfig(**_kwargs("llama")))
    wrappers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert len(wrappers) == 6
    projections = {id(w._shared["default"]) for w in wrappers}
    assert len(projections) == 1
    owned = [k for k in model.state_dict() if k.endswith("vera_A")]
    assert len(owned) == 1  # one place in the module tree holds them
    a = wrappers[0]._shared["default"].vera_A
    assert a.shape == (8, 64)  # the largest in_features among targets (down_proj: 64)
    assert not any("vera_A" in n or "vera_B" in n for n, _ in model.named_parameters())  # frozen buffers
    expected = output(model)
    model.double()  # moves the owner's buffers; every layer still sees them
    assert all(w._shared["default"].vera_A.dtype == torch.float64 for w in wrappers)
    assert (output(model) - expected).abs().max() <= 1e-5
    ak.delete(model, "default")
    assert not any("vera" in k for k in model.state_dict())


def test_init_is_a_no_op_with_d_initial():
    model = ak.attach(build("llama"), ak.VeraConfig(**_kwargs("llama", d_initial=0.25)))
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.vera_lambda_b["default"]) == 0
    assert torch.all(layer.vera_lambda_d["default"] == 0.25)
    assert (output(model) - output(build("llama"))).abs().max() == 0


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_merge_unmerge_exact_and_unload(arch):
    model = ak.attach(build(arch), ak.VeraConfig(**_kwargs(arch, init_weights=False)))
    expected = output(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ak.merge(model)
    assert (output(model) - expected).abs().max() <= 1e-4
    ak.unmerge(model)
    assert_state_equal(model.state_dict(), before)
    ak.unload(model, merge=True)
    assert not any("vera" in k for k in model.state_dict())
    assert (output(model) - expected).abs().max() <= 1e-4


def test_two_named_adapters_each_with_own_projections(tmp_path):
    model = ak.attach(build("llama"), ak.VeraConfig(**_kwargs("llama", init_weights=False)))
    ak.attach(model, ak.VeraConfig(r=4, target_modules=["v_proj"], projection_prng_key=5, init_weights=False),
              "other")
    outs = two_outputs(model)
    ak.save(model, tmp_path)
    assert file_shapes(tmp_path / "other")[VERA_A_KEY] == (4, 32)
    reloaded = build("llama")
    ak.load(reloaded, tmp_path)
    ak.load(reloaded, tmp_path, name="other")
    for name in ("default", "other"):
        ak.set_active(reloaded, name)
        assert (output(reloaded) - outs[name]).abs().max() <= TOL
        # PEFT reads each of the two files
        loaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path if name == "default" else tmp_path / name)
        assert (output(loaded.eval()) - outs[name]).abs().max() <= TOL


def test_nan_refused_on_merge_and_save(tmp_path):
    model = ak.attach(build("llama"), ak.VeraConfig(**_kwargs("llama", init_weights=False)))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.vera_lambda_d["default"][2] = float("nan")
    before = snapshot(model)
    with pytest.raises(ak.MergeError, match="non-finite"):
        ak.merge(model)
    assert_unchanged(model, before)
    with pytest.raises(ak.AdapterSaveError, match="non-finite"):
        ak.save(model, tmp_path / "out")


def test_missing_projections_in_file_refused(tmp_path):
    model = ak.attach(build("llama"), ak.VeraConfig(**_kwargs("llama")))
    ak.save(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors[VERA_A_KEY]
    from safetensors.torch import save_file

    save_file(tensors, path)
    fresh = build("llama")
    before = snapshot(fresh)
    with pytest.raises(ak.AdapterLoadError, match="has no value for 1 adapter parameter.*base_model.vera_A"):
        ak.load(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_bad_configs_refused():
    with pytest.raises(ak.ConfigError, match="r must be a positive integer"):
        ak.VeraConfig(r=0)
    with pytest.raises(ak.ConfigError, match="vera_dropout must be in"):
        ak.VeraConfig(vera_dropout=1.0)
    with pytest.raises(ak.ConfigError, match="bias='all' is not supported"):
        ak.VeraConfig(bias="all")
    with pytest.raises(ak.ConfigError, match="projection_prng_key must fit a 64-bit seed"):
        ak.VeraConfig(projection_prng_key=2**70)
    with pytest.raises(ak.ConfigError, match="save_projection must be true or false"):
        ak.VeraConfig(save_projection="no")
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ak.TargetError, match="VERA applies to conv1d, linear layers"):
        ak.attach(model, ak.VeraConfig(target_modules=["embed_tokens"]))
    assert_unchanged(model, before)


def test_training_reduces_loss():
    model = ak.attach(build("llama"), ak.VeraConfig(r=16, target_modules="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("vera_lambda" in n for n in trainable)
    first, last = train_steps(model, lr=0.1)
    assert last < first - 0.05, (first, last)
    assert adapter_params(model, ("vera_lambda_b",))[0].abs().sum() > 0
