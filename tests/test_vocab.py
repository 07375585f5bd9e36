"""Vocabulary changes: adding tokens, saving only what changed, and loading an adapter trained on a resized vocabulary
onto the original base (PEFT: RuntimeError size mismatch / IndexError) with identical logits, ties restored."""

from __future__ import annotations

import json

import pytest
import torch

import adapterkit as ak
from adapterkit import vocab
from helpers import VOCAB, build, input_ids, logits, perturb

TOL = 1e-5
NEW = 12


def tokenizer():
    """A word-level tokenizer of exactly VOCAB entries, built locally (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    inner = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")


def _tied(arch):
    return build(arch, tie=True) if arch == "llama" else build(arch)


def _ids_with_new_tokens() -> torch.Tensor:
    ids = input_ids(length=9)
    ids[:, ::3] = torch.arange(VOCAB, VOCAB + NEW)[: ids[:, ::3].numel()].view(ids.shape[0], -1)
    return ids


def test_add_tokens_grows_model_and_tokenizer_keeping_the_tie():
    model, tok = build("qwen2"), tokenizer()
    mean = model.model.embed_tokens.weight.detach().mean(0)
    ids = vocab.add_tokens(model, tok, [f"<t{i}>" for i in range(NEW)])
    assert ids == list(range(VOCAB, VOCAB + NEW)) and len(tok) == VOCAB + NEW
    assert model.model.embed_tokens.weight.shape[0] == VOCAB + NEW
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.model.embed_tokens.weight[VOCAB:], mean.expand(NEW, -1))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_trainable_tokens_on_resized_vocab_load_onto_the_original_base(arch, tmp_path):
    from safetensors import safe_open

    model, tok = _tied(arch), tokenizer()
    new_ids = vocab.add_tokens(model, tok, [f"<t{i}>" for i in range(NEW)])
    target = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    ak.attach(model, ak.LoraConfig(r=4, target_modules=target, trainable_token_indices=new_ids, init_lora_weights=False))
    perturb([model.get_input_embeddings().trainable_tokens_delta["default"]], scale=0.5)
    ids = _ids_with_new_tokens()
    ref = logits(model, ids)
    ak.save(model, tmp_path, tokenizer=tok)
    assert (tmp_path / "tokenizer.json").is_file()
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        sizes = json.loads(fh.metadata()["adapterkit.vocab"])
        non_lora = [k for k in fh.keys() if "lora_" not in k]
    assert sizes["input"] == [VOCAB + NEW, 32] and sizes["tied"] is True
    assert len(non_lora) == 1 and non_lora[0].endswith("token_adapter.trainable_tokens_delta")

    fresh = _tied(arch)  # never resized
    report = ak.load(fresh, tmp_path)
    assert report.ok
    assert fresh.get_input_embeddings().weight.shape[0] == VOCAB + NEW
    assert vocab.find_ties(fresh), "tie restored after the resize"
    assert (logits(fresh, ids) - ref).abs().max() <= TOL


def test_modules_to_save_after_resize_loads_onto_the_original_base(tmp_path):
    """PEFT: `PeftModel.from_pretrained` on the unresized base raises a size-mismatch RuntimeError."""
    model = build("qwen2")
    model.resize_token_embeddings(VOCAB + NEW)
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]))
    perturb([model.lm_head.modules_to_save["default"].weight], scale=0.3)
    ids = _ids_with_new_tokens()
    ref = logits(model, ids)
    ak.save(model, tmp_path)

    fresh = build("qwen2")
    report = ak.load(fresh, tmp_path)
    assert report.ok
    assert any("resized from 128 to 140" in n for n in report.notes)
    assert fresh.model.embed_tokens.weight.shape[0] == VOCAB + NEW and vocab.find_ties(fresh)
    assert fresh.lm_head.modules_to_save["default"].weight is fresh.model.embed_tokens.modules_to_save["default"].weight
    assert (logits(fresh, ids) - ref).abs().max() <= TOL


def test_resize_forbidden_is_one_clear_error_and_the_model_is_unchanged(tmp_path):
    from helpers import assert_unchanged, snapshot

    model = build("qwen2")
    model.resize_token_embeddings(VOCAB + NEW)
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[VOCAB, VOCAB + 1]))
    ak.save(model, tmp_path)
    fresh = build("qwen2")
    before = snapshot(fresh)
    with pytest.raises(ak.AdapterLoadError, match=r"140 rows.*has 128.*resize=True.*resize_token_embeddings\(140\)"):
        ak.load(fresh, tmp_path, resize=False)
    assert_unchanged(fresh, before)


def test_failed_load_after_resize_shrinks_back(tmp_path, monkeypatch):
    import importlib

    load_module = importlib.import_module("adapterkit.checkpoint.load")

    model = build("qwen2")
    model.resize_token_embeddings(VOCAB + NEW)
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[VOCAB]))
    ak.save(model, tmp_path)
    fresh = build("qwen2")
    weight = fresh.model.embed_tokens.weight.detach().clone()

    def failing_plan(*args, **kwargs):
        raise ak.AdapterLoadError("simulated failure after the resize")

    monkeypatch.setattr(load_module, "_plan", failing_plan)
    with pytest.raises(ak.AdapterLoadError, match="simulated"):
        ak.load(fresh, tmp_path)
    assert torch.equal(fresh.model.embed_tokens.weight, weight) and vocab.find_ties(fresh)


def test_resize_refused_when_the_embedding_carries_another_adapter(tmp_path):
    model = build("qwen2")
    model.resize_token_embeddings(VOCAB + NEW)
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[VOCAB]))
    ak.save(model, tmp_path)
    fresh = build("qwen2")
    ak.attach(fresh, ak.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1]), name="other")
    with pytest.raises(ak.AdapterLoadError, match="140 rows.*carries adapter"):
        ak.load(fresh, tmp_path)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_lora_on_tied_head_saves_no_base_tensor(arch, tmp_path):
    """PEFT saves the whole embedding matrix here (save_embedding_layers='auto')."""
    from safetensors import safe_open

    model = _tied(arch)
    head = "lm_head"
    ak.attach(model, ak.LoraConfig(r=4, target_modules=(["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]) + [head]))
    ak.save(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)


# -- the real model: file sizes (PEFT 0.21: 120.1 MB and 231 MB) ------------------------------------------------------
def _smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert vocab.find_ties(model), "SmolLM2 ties embed_tokens and lm_head"
    return model


def _megabytes(folder) -> float:
    return (folder / "adapter_model.safetensors").stat().st_size / 1e6


@pytest.mark.slow
def test_smollm2_lora_on_tied_head_file_is_small(smollm2_dir, tmp_path):
    model = _smollm2(smollm2_dir)
    ak.attach(model, ak.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "lm_head"]))
    ak.save(model, tmp_path)
    assert _megabytes(tmp_path) <= 7.0


@pytest.mark.slow
def test_smollm2_new_tokens_file_is_small_and_loads_on_the_original(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    model, tok = _smollm2(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    new_ids = vocab.add_tokens(model, tok, [f"<extra_{i}>" for i in range(100)])
    assert len(new_ids) == 100 and model.get_input_embeddings().weight.shape[0] == rows + 100
    ak.attach(model, ak.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], trainable_token_indices=new_ids))
    perturb([model.get_input_embeddings().trainable_tokens_delta["default"]], scale=0.05)
    ids = torch.tensor([[1, 2, 3, new_ids[0], 4, new_ids[-1]]])
    ref = logits(model, ids)
    ak.save(model, tmp_path, tokenizer=tok)
    assert _megabytes(tmp_path) <= 4.0
    fresh = _smollm2(smollm2_dir)
    assert ak.load(fresh, tmp_path).ok
    assert (logits(fresh, ids) - ref).abs().max() <= TOL
