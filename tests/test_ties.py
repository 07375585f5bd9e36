"""Tied input/output embeddings through every path: unmerged, merged, unloaded + save_pretrained + from_pretrained,
and adapter saved then loaded must all give the in-memory unmerged logits (PEFT: 0.5 off, or the delta applied twice).

Ties are checked by tensor identity (`vocab.find_ties`), never by module names.
"""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit import vocab
from helpers import build, input_ids, logits, perturb

TOL = 1e-5
ARCHS = {"gpt2": ("transformer.wte", "lm_head"), "llama": ("model.embed_tokens", "lm_head"), "qwen2": ("model.embed_tokens", "lm_head")}


def _tied(arch: str):
    model = build(arch, tie=True) if arch == "llama" else build(arch)
    assert vocab.find_ties(model), "the test model must have tied embeddings"
    return model


def _config(arch: str, mode: str) -> ak.LoraConfig:
    emb, head = ARCHS[arch]
    emb_name = emb.rsplit(".", 1)[-1]
    attn = ["c_attn"] if arch == "gpt2" else ["q_proj"]
    cases = {
        "lora_head": dict(target_modules=attn + [head]),
        "lora_emb": dict(target_modules=attn + [emb_name]),
        "lora_both": dict(target_modules=attn + [emb_name, head]),
        "mts_head": dict(target_modules=attn, modules_to_save=[head]),
        "mts_emb": dict(target_modules=attn, modules_to_save=[emb_name]),
        "mts_both": dict(target_modules=attn, modules_to_save=[emb_name, head]),
    }
    return ak.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **cases[mode])


def _trained(arch: str, mode: str):
    model = _tied(arch)
    ak.attach(model, _config(arch, mode))
    # modules_to_save copies start equal to the base: move them, as training would
    perturb([p for n, p in model.named_parameters() if "modules_to_save" in n], scale=0.3)
    return model


MODES = ["lora_head", "lora_emb", "lora_both", "mts_head", "mts_emb", "mts_both"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tied_model_every_path_gives_the_unmerged_logits(arch, mode, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _trained(arch, mode)
    ids = input_ids()
    ref = logits(model)
    with ak.disabled(model):
        base = logits(model)
    assert (ref - base).abs().max() > 1e-3, "the adapter must change the outputs for the test to mean anything"

    ak.save(model, tmp_path / "adapter")
    ak.merge(model)
    assert (logits(model) - ref).abs().max() <= TOL, "merged"
    ak.unmerge(model)
    assert (logits(model) - ref).abs().max() <= TOL, "unmerged again"
    assert vocab.find_ties(model), "unmerge restores the tie"

    fresh = _tied(arch)
    ak.load(fresh, tmp_path / "adapter")
    assert (logits(fresh, ids) - ref).abs().max() <= TOL, "saved then loaded adapter"

    ak.unload(model, merge=True)
    assert (logits(model) - ref).abs().max() <= TOL, "merged and unloaded"
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(reloaded) - ref).abs().max() <= TOL, "merged, save_pretrained, from_pretrained"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lora_on_tied_head_leaves_the_shared_embedding_alone_when_merged(arch):
    """PEFT merges the head's delta into the shared tensor, so the embedding changes too (logits 0.5 off)."""
    model = _trained(arch, "lora_head")
    emb_path, _ = ARCHS[arch]
    before = model.get_submodule(emb_path).weight.detach().clone()
    ak.merge(model)
    assert torch.equal(model.get_submodule(emb_path).weight, before)
    assert model.config.tie_word_embeddings is False  # save_pretrained / from_pretrained must not re-tie
    ak.unmerge(model)
    assert model.config.tie_word_embeddings is True


def test_find_ties_by_identity_not_names():
    gpt2 = build("gpt2")
    assert vocab.find_ties(gpt2) == [["transformer.wte.weight", "lm_head.weight"]]
    assert vocab.find_ties(build("llama")) == []
    # an unusual tie that no name rule would guess
    model = build("llama")
    model.model.layers[1].self_attn.o_proj.weight = model.model.layers[0].self_attn.o_proj.weight
    assert vocab.find_ties(model) == [["model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"]]


def test_tied_modules_to_save_copies_stay_tied_and_are_saved_once(tmp_path):
    from safetensors import safe_open

    model = _trained("qwen2", "mts_both")
    emb = model.model.embed_tokens.modules_to_save["default"]
    head = model.lm_head.modules_to_save["default"]
    assert emb.weight is head.weight, "copies of tied originals share one tensor"
    ak.save(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        keys = [k for k in fh.keys() if not k.endswith(("lora_A.weight", "lora_B.weight"))]
        aliases = fh.metadata()["adapterkit.aliases"]
        marker = fh.get_tensor("base_model.model.lm_head.weight")
    assert keys == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    assert marker.numel() == 0, "the alias key holds an empty marker, not a second copy"
    assert "base_model.model.lm_head.weight" in aliases
    fresh = _tied("qwen2")
    report = ak.load(fresh, tmp_path)
    assert report.ok
    assert fresh.model.embed_tokens.modules_to_save["default"].weight is fresh.lm_head.modules_to_save["default"].weight


def test_peft_compatible_save_writes_every_key_for_peft(tmp_path):
    """The default file (shared tensor once) makes PEFT 0.21 fail on the alias marker; peft_compatible=True loads."""
    from peft import PeftModel

    model = _trained("qwen2", "mts_both")
    ref = logits(model)
    ak.save(model, tmp_path / "once")
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(_tied("qwen2"), str(tmp_path / "once"))
    ak.save(model, tmp_path / "peft", peft_compatible=True)
    peft_model = PeftModel.from_pretrained(_tied("qwen2"), str(tmp_path / "peft")).eval()
    assert (logits(peft_model) - ref).abs().max() <= TOL
    fresh = _tied("qwen2")
    assert ak.load(fresh, tmp_path / "peft").ok
    assert (logits(fresh) - ref).abs().max() <= TOL
