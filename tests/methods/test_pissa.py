"""PiSSA and OLoRA (`init_lora_weights="pissa" | "pissa_niter_N" | "olora"`): PEFT's init, the residual base, the
conversion to a plain rank-2r LoRA for the original base, the fingerprint telling the two bases apart, PEFT both ways."""

from __future__ import annotations

import json

import pytest
import torch

import adapterkit as ak
from helpers import assert_unchanged, logits, perturb, snapshot, tiny_gpt2, tiny_llama, train_with

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "o_proj"]
TOL = dict(atol=1e-5, rtol=0)


def _ours(init, model=None, **kw):
    model = model or tiny_llama()
    return ak.attach(model, ak.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS, **kw))


def _theirs(init, model=None, **kw):
    model = model or tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS, **kw)
    return peft.get_peft_model(model, cfg)


def _adapter_state(model) -> dict[str, torch.Tensor]:
    """lora_A / lora_B and base weights by PEFT's names, without PEFT's prefix."""
    return {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()
            if "lora_" in k or "base_layer" in k}


@pytest.mark.parametrize("init, kw", [("pissa", {}), ("olora", {}), ("pissa", {"use_rslora": True})])
def test_init_is_peft_s(init, kw):
    original = logits(tiny_llama())
    ours = _ours(init, **kw)
    theirs = _theirs(init, **kw)
    a, b = _adapter_state(ours), _adapter_state(theirs)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.base_layer.weight"],
                           tiny_llama().model.layers[0].self_attn.q_proj.weight)  # the base is now the residual
    torch.testing.assert_close(logits(ours), logits(theirs), **TOL)
    torch.testing.assert_close(logits(ours), original, atol=1e-4, rtol=0)  # same function at the start


def test_pissa_niter_takes_the_top_subspace():
    # Randomised SVD: PEFT's random draws cannot be replayed, but the top-r product s * B0 A0 is the same.
    def spiky():  # o_proj with 4 dominant directions: a clear gap, so the randomised SVD finds them
        model = tiny_llama()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for block in model.model.layers:
                w = block.self_attn.o_proj.weight
                w.add_(torch.randn(32, 4, generator=gen) @ torch.randn(4, 32, generator=gen))
        return model

    plain = logits(spiky())
    ours, theirs = _ours("pissa_niter_6", spiky()), _theirs("pissa_niter_6", spiky())
    layer, ref = ours.model.layers[1].self_attn.o_proj, theirs.base_model.model.model.layers[1].self_attn.o_proj
    ours_w, theirs_w = layer.base_layer.weight, ref.base_layer.weight
    torch.testing.assert_close(ours_w, theirs_w, atol=2e-3, rtol=0)
    torch.testing.assert_close(logits(ours), plain, atol=1e-4, rtol=0)


def test_pissa_on_conv1d_matches_peft():
    ours = ak.attach(tiny_gpt2(), ak.LoraConfig(r=4, init_lora_weights="pissa", target_modules=["c_attn"]))
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, init_lora_weights="pissa",
                                                               target_modules=["c_attn"], fan_in_fan_out=True))
    torch.testing.assert_close(logits(ours), logits(theirs), **TOL)
    torch.testing.assert_close(logits(ours), logits(tiny_gpt2()), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PiSSA model trained a few steps, saved both ways."""
    model = _ours("pissa")
    losses = train_with(model, lr=5e-3, length=12)
    root = tmp_path_factory.mktemp("pissa")
    ak.save(model, root / "residual")
    ak.save(model, root / "plain", as_plain_lora=True)
    return model, losses, root


def test_training_lowers_the_loss(trained):
    _, losses, _ = trained
    assert losses[-1] < losses[0] - 0.05


def test_converted_adapter_applies_to_the_original_base(trained):
    model, _, root = trained
    saved = json.loads((root / "plain" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    fresh = tiny_llama()
    report = ak.load(fresh, root / "plain")
    assert report.base_check.startswith("same base")
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-4, rtol=0)


def test_residual_adapter_refuses_the_original_base(trained):
    _, _, root = trained
    fresh = tiny_llama()
    before = snapshot(fresh)
    with pytest.raises(ak.AdapterLoadError, match=r"trained with PiSSA .*as_plain_lora=True"):
        ak.load(fresh, root / "residual")
    assert_unchanged(fresh, before)


def test_residual_adapter_loads_onto_the_residual_base(trained):
    model, _, root = trained
    residual = ak.unload(_ours("pissa"))  # the same deterministic residual, as a plain model
    report = ak.load(residual, root / "residual")
    assert report.base_check.startswith("same base")
    assert any("residual base" in n for n in report.notes)
    torch.testing.assert_close(logits(residual), logits(model), **TOL)


def test_peft_reads_both_of_our_files(trained):
    model, _, root = trained
    # PEFT recomputes the residual when it loads a PiSSA adapter onto the original base.
    residual = peft.PeftModel.from_pretrained(tiny_llama(), root / "residual")
    torch.testing.assert_close(logits(residual), logits(model), **TOL)
    plain = peft.PeftModel.from_pretrained(tiny_llama(), root / "plain")
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_we_read_peft_files_both_ways(tmp_path, init):
    theirs = _theirs(init)
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter as a plain one
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = init
    perturb([p for n, p in theirs.named_parameters() if "lora_" in n], scale=0.05)  # "training"
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "residual")
    theirs.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))

    fresh = tiny_llama()
    report = ak.load(fresh, tmp_path / "residual")
    assert any("recomputed" in n for n in report.notes)
    torch.testing.assert_close(logits(fresh), expected, **TOL)
    fresh = tiny_llama()
    ak.load(fresh, tmp_path / "plain")
    torch.testing.assert_close(logits(fresh), expected, atol=1e-4, rtol=0)


def test_olora_conversion_round_trip(tmp_path):
    model = _ours("olora")
    perturb([p for n, p in model.named_parameters() if "lora_" in n], scale=0.05)
    ak.save(model, tmp_path, as_plain_lora=True)
    fresh = tiny_llama()
    ak.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_0", "pissa_niter_x", "PiSSA", "olora2"])
def test_bad_init_names_are_refused(init):
    with pytest.raises(ak.ConfigError, match="init_lora_weights=.*'pissa_niter_<N>'"):
        ak.LoraConfig(init_lora_weights=init)


def test_pissa_on_an_embedding_is_refused():
    with pytest.raises(ak.ConfigError, match="applies to linear layers only.*embed_tokens"):
        ak.attach(tiny_llama(), ak.LoraConfig(r=2, init_lora_weights="pissa", target_modules=["embed_tokens"]))


def test_rank_above_the_weight_is_refused():
    with pytest.raises(ak.ConfigError, match=r"PiSSA needs r <= min\(out, in\) = 16"):
        ak.attach(tiny_llama(), ak.LoraConfig(r=20, init_lora_weights="pissa", target_modules=["k_proj"]))


def test_olora_on_conv1d_is_refused():
    with pytest.raises(ak.ConfigError, match="OLoRA initialisation is not supported on Conv1D"):
        ak.attach(tiny_gpt2(), ak.LoraConfig(r=2, init_lora_weights="olora", target_modules=["c_attn"]))
