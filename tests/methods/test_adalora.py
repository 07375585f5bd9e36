"""AdaLoRA (`ak.AdaLoraConfig`, `ak.RankAllocator`): SVD-form layers, the budget schedule pruning ranks in step with
PEFT's, the orthogonality term, rank_pattern files both ways with PEFT, HF Trainer and `adapterkit train`."""

from __future__ import annotations

import json

import pytest
import torch

import adapterkit as ak
from adapterkit.state import adapter_state
from helpers import assert_unchanged, input_ids, logits, snapshot, tiny_gpt2, tiny_llama, train_with

peft = pytest.importorskip("peft")

KW = dict(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=12, lora_alpha=8, target_modules=["q_proj", "v_proj"],
          task_type="CAUSAL_LM")  # PEFT adds the orthogonality term only in its task-specific model
TOL = dict(atol=1e-5, rtol=0)


def _pair(build=tiny_llama, **kw):
    """Our model and PEFT's with the same (random, non-zero) adapter values."""
    kw = {**KW, **kw}
    ours = ak.attach(build(), ak.AdaLoraConfig(init_lora_weights=False, **kw))
    theirs = peft.get_peft_model(build(), peft.AdaLoraConfig(**kw))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(mine[name.removeprefix("base_model.model.")])
    return ours, theirs


@pytest.mark.parametrize("build, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_layers_compute_what_peft_s_do(build, targets):
    ours, theirs = _pair(build, target_modules=targets)
    assert not torch.allclose(logits(ours), logits(build()), atol=1e-3)
    torch.testing.assert_close(logits(ours), logits(theirs), **TOL)
    before = logits(ours)
    ak.merge(ours)
    torch.testing.assert_close(logits(ours), before, **TOL)
    ak.unmerge(ours)


def test_allocation_and_training_follow_peft_step_by_step(tmp_path):
    ours, theirs = _pair()
    allocator = ak.RankAllocator(ours)
    our_losses = train_with(ours, allocator.step)
    their_losses = train_with(theirs, theirs.base_model.update_and_allocate)
    # Same loss (with the orthogonality term), same pruning, same final model.
    assert our_losses == pytest.approx(their_losses, abs=1e-4)
    pattern = ak.adapters(ours)["default"].rank_pattern
    assert pattern == {k.replace(".default", ""): v
                       for k, v in theirs.peft_config["default"].rank_pattern.items()}
    ranks = allocator.ranks()
    assert sum(ranks.values()) == KW["target_r"] * 4 and max(ranks.values()) < KW["init_r"]  # shrunk to the budget
    torch.testing.assert_close(logits(ours), logits(theirs), **TOL)

    ak.save(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"] == pattern
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded), logits(ours), **TOL)

    theirs.save_pretrained(tmp_path / "theirs")
    fresh = tiny_llama()
    report = ak.load(fresh, tmp_path / "theirs")
    assert not report.missing and not report.unexpected
    torch.testing.assert_close(logits(fresh), logits(theirs), **TOL)
    kept = {p: w.lora_A["default"].shape[0] for p, w in adapter_state(fresh).wrappers.items()}
    assert kept == ranks


def test_loss_falls_and_ranks_shrink_with_the_default_init():
    model = ak.attach(tiny_llama(), ak.AdaLoraConfig(**KW))
    allocator = ak.RankAllocator(model)
    ids = input_ids(4, 10)
    with torch.no_grad():
        first = float(model(input_ids=ids, labels=ids).loss)
    train_with(model, allocator.step, steps=12)
    allocator.remove()
    with torch.no_grad():
        assert float(model(input_ids=ids, labels=ids).loss) < first - 0.05
    assert sum(allocator.ranks().values()) == KW["target_r"] * 4


def test_hf_trainer_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = ak.attach(tiny_llama(), ak.AdaLoraConfig(**{**KW, "total_step": 8, "tinit": 1, "tfinal": 2}))
    allocator = ak.RankAllocator(model)
    data = [{"input_ids": row, "labels": row} for row in input_ids(8, 10)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", learning_rate=1e-2, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[ak.adalora_callback(allocator)]).train()
    assert sum(allocator.ranks().values()) == KW["target_r"] * 4


def test_cli_train_adalora(tmp_path):
    import importlib.util
    from pathlib import Path

    from adapterkit.cli.main import main

    spec = importlib.util.spec_from_file_location("_cli_fixtures", Path(__file__).parents[1] / "cli" / "conftest.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    model_dir = fixtures.build_model_dir(tmp_path / "model")
    data = fixtures.write_chat_data(tmp_path / "chat.jsonl")
    out = tmp_path / "out"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--method", "adalora",
                 "--max-steps", "10", "--r", "4", "--target-r", "2", "--batch-size", "4", "--lr", "1e-2",
                 "--targets", "q_proj,v_proj"]) == 0
    log = json.loads((out / "training.json").read_text())
    assert log["config"]["method"] == "adalora" and sum(log["config"]["adalora_ranks"].values()) == 2 * 4
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "ADALORA"


@pytest.mark.parametrize("kwargs, word", [
    ({"total_step": None}, "needs total_step > 0"),
    ({"tinit": 10, "tfinal": 5}, "leave no pruning phase"),
    ({"target_r": 9}, "0 < target_r <= init_r"),
    ({"beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
    ({"rank_pattern": {"q_proj.lora_E": [1, 0]}}, "list of at most init_r=6 booleans"),
    ({"rank_pattern": "q_proj"}, r"rank_pattern must be a mapping .*got str 'q_proj'"),
    ({"rank_pattern": 3}, r"rank_pattern must be a mapping .*got int 3"),
    ({"use_dora": True}, "does not support use_dora"),
])
def test_bad_configs_are_refused(kwargs, word):
    with pytest.raises(ak.ConfigError, match=word):
        ak.AdaLoraConfig(**{**KW, **kwargs})


def test_allocator_needs_an_adalora_adapter():
    model = ak.attach(tiny_llama(), ak.LoraConfig(target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ak.ConfigError, match="no AdaLoRA adapter named 'default'"):
        ak.RankAllocator(model)
    assert_unchanged(model, before)


def test_inspect_shows_the_schedule_and_kept_ranks(tmp_path, capsys):
    from adapterkit.cli.main import main

    model = ak.attach(tiny_llama(), ak.AdaLoraConfig(**KW))
    allocator = ak.RankAllocator(model)
    train_with(model, allocator.step)
    ak.save(model, tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "ADALORA (init_r=6, target_r=2" in text and "kept ranks        8 of 24 over 4 layers" in text
