"""Prompt tuning (`ak.PromptTuningConfig`): PEFT's `prompt_embeddings` file both ways with the same logits and greedy
generations, TEXT init from the model's tokenizer, training with labels and attention mask, disable / delete, bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from helpers import assert_unchanged, input_ids, logits, snapshot, tiny_llama, tiny_qwen2

peft = pytest.importorskip("peft")

TOL = dict(atol=1e-5, rtol=0)


def _check_cached_scores(model, ids, steps):
    """generate's per-step scores (KV cache: the prompt prepended once) equal one uncached forward of the result."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(input_ids=out.sequences, use_cache=False).logits  # (B, n + T + steps, V)
    for i, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, full[:, full.shape[1] - steps - 1 + i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_our_file_in_peft_same_logits_and_generations(tmp_path, build):
    ours = ak.attach(build(), ak.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    ids = input_ids(2, 7)
    mine = logits(ours, ids)
    assert mine.shape == (2, 4 + 7, 128)  # the virtual positions are part of the output, as in PEFT
    ak.save(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["num_virtual_tokens"], saved["token_dim"]) == ("PROMPT_TUNING", 4, 32)
    assert "target_modules" not in saved
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, mine, **TOL)
    mask = torch.ones_like(ids)
    ours_gen = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    # PEFT 0.21 with transformers 5 re-prepends the prompt at every cached step (it looks for `past_key_values`,
    # generate passes `cache`), so its cached generations are wrong; its uncached ones are the reference.
    theirs_gen = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 use_cache=False)
    assert torch.equal(ours_gen, theirs_gen)
    _check_cached_scores(ours, ids, 6)


def test_peft_file_loads_with_same_logits(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    ids = input_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama()
    report = ak.load(ours, tmp_path)
    assert [o.key for o in report.outcomes] == ["prompt_embeddings"] and not report.missing
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, expected, **TOL)
    with ak.disabled(ours):
        torch.testing.assert_close(logits(ours, ids), logits(tiny_llama(), ids), **TOL)


def _model_dir(tmp_path):
    spec = importlib.util.spec_from_file_location("_cli_fixtures", Path(__file__).parents[1] / "cli" / "conftest.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    return fixtures.build_model_dir(tmp_path / "model")


def test_text_init_uses_the_model_tokenizer_like_peft(tmp_path):
    from transformers import AutoModelForCausalLM

    path = _model_dir(tmp_path)
    kw = dict(num_virtual_tokens=10, prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify:",
              tokenizer_name_or_path=str(path), task_type="CAUSAL_LM")
    ours = ak.attach(AutoModelForCausalLM.from_pretrained(path), ak.PromptTuningConfig(**kw))
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(path), peft.PromptTuningConfig(**kw))
    mine = ours.model.embed_tokens.prompt_embeddings["default"]
    ref = theirs.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(mine, ref, atol=0, rtol=0)  # "Classify:" is 9 byte tokens, repeated to fill 10
    assert torch.equal(mine[9], mine[0])


def test_training_with_labels_and_mask_lowers_the_loss():
    model = ak.attach(tiny_llama(), ak.PromptTuningConfig(num_virtual_tokens=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.embed_tokens.prompt_embeddings.default"]
    ids = input_ids(4, 10)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(ak.trainable_parameters(model), lr=0.3)
    model.train()
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05


def test_delete_removes_the_hook():
    model = tiny_llama()
    before = snapshot(model)
    ak.attach(model, ak.PromptTuningConfig(num_virtual_tokens=2))
    ak.delete(model, "default")
    assert_unchanged(model, before)
    assert logits(model).shape[1] == 7 and not model._forward_pre_hooks


@pytest.mark.parametrize("kwargs, word", [
    ({}, "num_virtual_tokens must be an integer"),
    ({"num_virtual_tokens": 2, "prompt_tuning_init": "SAMPLE_VOCAB"}, "choose 'RANDOM' or 'TEXT'"),
    ({"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT"}, "needs prompt_tuning_init_text"),
    ({"num_virtual_tokens": 2, "target_modules": ["q_proj"]}, "leave target_modules"),
])
def test_bad_configs_are_refused(kwargs, word):
    with pytest.raises(ak.ConfigError, match=word):
        ak.PromptTuningConfig(**kwargs)


def test_text_init_without_a_local_tokenizer_is_refused():
    model = tiny_llama()
    before = snapshot(model)
    cfg = ak.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                                tokenizer_name_or_path="some-hub/id")
    with pytest.raises(ak.ConfigError, match="needs a local tokenizer directory"):
        ak.attach(model, cfg)
    assert_unchanged(model, before)


def test_merge_is_refused():
    model = ak.attach(tiny_llama(), ak.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ak.ConfigError, match="cannot be merged"):
        ak.merge(model)


def test_inspect_describes_the_prompt(tmp_path, capsys):
    from adapterkit.cli.main import main

    ak.save(ak.attach(tiny_llama(), ak.PromptTuningConfig(num_virtual_tokens=3)), tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0
    assert "PROMPT_TUNING (3 virtual tokens of 32, init RANDOM)" in capsys.readouterr().out
