"""Trainable tokens (PEFT's `trainable_token_indices`): only the chosen rows train and are saved, a tied output head
follows the embedding, and files are interchangeable with PEFT 0.21 in both directions."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit import vocab
from adapterkit.methods.trainable_tokens import TiedTokensHead, TrainableTokens
from helpers import VOCAB, build, input_ids, logits, perturb

TOL = 1e-5
ROWS = [3, 17, 100]


def _tt(model) -> TrainableTokens:
    emb = model.get_input_embeddings()
    assert isinstance(emb, TrainableTokens)
    return emb


def _attached(arch="qwen2", indices=ROWS, **kw):
    model = build(arch, tie=True) if arch == "llama" else build(arch)
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices, **kw))
    perturb([_tt(model).trainable_tokens_delta["default"]], scale=0.5)
    return model


def test_only_the_chosen_rows_train_and_the_tied_head_follows():
    model = build("qwen2")
    base_emb = model.model.embed_tokens.weight.detach().clone()
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=ROWS))
    assert isinstance(model.lm_head, TiedTokensHead)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable == ["model.embed_tokens.trainable_tokens_delta.default"]
    with ak.disabled(model):
        base = logits(model)
    assert (logits(model) - base).abs().max() <= 1e-6, "starts as a no-op (the head's rows are a separate matmul)"

    values = _tt(model).trainable_tokens_delta["default"]
    perturb([values], scale=0.5)
    ids = torch.tensor([[3, 4, 17, 5]])
    out = model.model.embed_tokens(ids)
    assert torch.equal(out[0, 0], values[0]) and torch.equal(out[0, 2], values[1])
    assert torch.equal(out[0, 1], base_emb[4]) and torch.equal(out[0, 3], base_emb[5])
    h = torch.randn(2, 32)
    head = model.lm_head(h)
    torch.testing.assert_close(head[:, ROWS], h @ values.T)
    torch.testing.assert_close(head[:, 4], h @ base_emb[4])

    model(input_ids=input_ids()).logits.sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    assert model.model.embed_tokens.base_layer.weight.grad is None


def test_merge_unmerge_unload_keep_the_tie(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _attached()
    ref = logits(model)
    original = model.model.embed_tokens.base_layer.weight
    ak.merge(model)
    assert (logits(model) - ref).abs().max() <= TOL
    assert model.model.embed_tokens.base_layer.weight is model.lm_head.base_layer.weight, "merged pair stays tied"
    ak.unmerge(model)
    assert model.model.embed_tokens.base_layer.weight is original and model.lm_head.base_layer.weight is original
    ak.unload(model, merge=True)
    assert vocab.find_ties(model) == [["model.embed_tokens.weight", "lm_head.weight"]]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(reloaded) - ref).abs().max() <= TOL


def test_delete_restores_the_plain_model():
    model = _attached()
    ak.delete(model, "default")
    assert type(model.model.embed_tokens).__name__ == "Embedding" and type(model.lm_head).__name__ == "Linear"
    assert vocab.find_ties(model)


def test_only_the_rows_are_saved(tmp_path):
    from safetensors import safe_open

    model = _attached()
    ak.save(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys() if "lora_" not in k}
    assert shapes == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": [len(ROWS), 32]}


def test_dict_form_and_tied_head_named_with_the_same_rows(tmp_path):
    model = _attached(indices={"embed_tokens": ROWS, "lm_head": ROWS})
    assert isinstance(model.lm_head, TiedTokensHead)
    with pytest.raises(ak.TargetError, match="lm_head"):
        _attached(indices={"embed_tokens": ROWS, "lm_head": [1, 2]})


def test_index_beyond_the_vocabulary_says_how_to_fix():
    with pytest.raises(ak.TargetError, match=r"has 128 rows.*add_tokens"):
        _attached(indices=[5, VOCAB + 3])


def test_untied_llama_head_is_left_alone():
    model = _attached("llama")
    model_untied = build("llama")
    ak.attach(model_untied, ak.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=ROWS))
    assert type(model_untied.lm_head).__name__ == "Linear"
    assert isinstance(model.lm_head, TiedTokensHead)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "llama"])
def test_adapterkit_file_loads_in_peft(arch, tmp_path):
    from peft import PeftModel

    model = _attached(arch) if arch != "gpt2" else None
    if arch == "gpt2":
        model = build("gpt2")
        ak.attach(model, ak.LoraConfig(r=4, target_modules=["c_attn"], trainable_token_indices=ROWS))
        perturb([_tt(model).trainable_tokens_delta["default"]], scale=0.5)
    ref = logits(model)
    ak.save(model, tmp_path)
    fresh = build(arch, tie=True) if arch == "llama" else build(arch)
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    assert (logits(peft_model) - ref).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_peft_file_loads_in_adapterkit(arch, tmp_path):
    import peft

    base = build(arch, tie=True) if arch == "llama" else build(arch)
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=ROWS, init_lora_weights=False)
    )
    perturb([p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n], scale=0.5)
    peft_model.eval()
    ref = logits(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    fresh = build(arch, tie=True) if arch == "llama" else build(arch)
    report = ak.load(fresh, tmp_path)
    assert report.ok and not report.missing
    assert (logits(fresh) - ref).abs().max() <= TOL


@pytest.mark.parametrize("bad", [[], [1, 1], [-1], ["a"], {"embed_tokens": []}, 5])
def test_config_refuses_malformed_indices(bad):
    with pytest.raises(ak.ConfigError, match="trainable_token_indices"):
        ak.LoraConfig(trainable_token_indices=bad)


def test_config_round_trips_both_forms():
    for value in (ROWS, {"embed_tokens": ROWS}):
        cfg = ak.LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)
        assert ak.LoraConfig.from_dict(cfg.to_dict()).trainable_token_indices == value


def test_two_adapters_on_one_embedding_switch_and_delete(tmp_path):
    model = _attached()
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[5, 6]), name="other")
    perturb([_tt(model).trainable_tokens_delta["other"]], scale=0.5, seed=7)
    first = logits(model)
    ak.set_active(model, "other")
    second = logits(model)
    assert (first - second).abs().max() > 1e-3
    ak.save(model, tmp_path)
    fresh = build("qwen2")
    ak.load(fresh, tmp_path, name="other")
    assert (logits(fresh) - second).abs().max() <= TOL
    ak.delete(model, "other")
    ak.set_active(model, "default")
    assert (logits(model) - first).abs().max() <= TOL
    assert type(model.lm_head).__name__ == "TiedTokensHead" and model.lm_head.adapter_names == ["default"]


def test_lora_on_a_head_tied_to_trained_rows_is_refused_before_any_change():
    from helpers import assert_unchanged, snapshot

    model = build("qwen2")
    before = snapshot(model)
    with pytest.raises(ak.TargetError, match="lm_head.*shares its weight"):
        ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], trainable_token_indices=ROWS))
    assert_unchanged(model, before)
