"""LoRA+ parameter groups (optim.py): membership and learning rates, parity with PEFT's create_loraplus_optimizer,
training with a plain torch loop, HF Trainer and `adapterkit train --loraplus-ratio`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from helpers import VOCAB, input_ids, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _names(model, params) -> set[str]:
    by_id = {id(p): n.removeprefix("base_model.model.") for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def _groups(model, groups) -> list[tuple[set[str], float, float]]:
    return sorted(((_names(model, g["params"]), g["lr"], g["weight_decay"]) for g in groups if g["params"]),
                  key=lambda t: sorted(t[0]))


def test_groups_hold_the_right_parameters_and_rates():
    model = tiny_llama()
    ak.attach(model, ak.LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["lm_head"]))
    groups = {g["name"]: g for g in ak.loraplus_param_groups(model, 1e-3, loraplus_lr_ratio=8,
                                                             loraplus_weight_decay=0.1, loraplus_lr_embedding=5e-5)}
    names = {k: _names(model, g["params"]) for k, g in groups.items()}
    assert names["embedding"] == {"model.embed_tokens.lora_embedding_A.default",
                                  "model.embed_tokens.lora_embedding_B.default"}
    assert all(n.endswith("lora_B.default.weight") for n in names["lora_B"]) and len(names["lora_B"]) == 4
    assert names["lora_A"] == {n for n, p in model.named_parameters() if "lora_A" in n} | \
        {"lm_head.modules_to_save.default.weight"}
    assert "lora_B_no_decay" not in groups  # no bias, no LayerNorm among the trainable parameters
    assert (groups["lora_A"]["lr"], groups["lora_B"]["lr"], groups["embedding"]["lr"]) == (1e-3, 8e-3, 5e-5)
    assert groups["lora_A"]["weight_decay"] == groups["lora_B"]["weight_decay"] == 0.1
    every = set().union(*names.values())
    assert every == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dora", [False, True])
def test_groups_match_peft(dora):
    ours, theirs = tiny_llama(), tiny_llama()
    kwargs = dict(r=4, target_modules=TARGETS, modules_to_save=["lm_head"], use_dora=dora)
    ak.attach(ours, ak.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(**kwargs))
    from peft.optimizers import create_loraplus_optimizer

    opts = dict(lr=2e-4, loraplus_lr_ratio=16, loraplus_weight_decay=0.01, loraplus_lr_embedding=1e-5)
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, **opts)
    mine = ak.create_loraplus_optimizer(ours, torch.optim.AdamW, **opts)
    assert _groups(ours, mine.param_groups) == _groups(theirs, ref.param_groups)
    if dora:  # 1-D magnitude vectors go with B, as in PEFT
        b_names = next(names for names, lr, _ in _groups(ours, mine.param_groups) if lr == 2e-4 * 16)
        assert any("lora_magnitude_vector" in n for n in b_names)


def test_layernorm_and_bias_parameters_get_no_decay():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    ak.attach(model, ak.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"]))
    groups = {g["name"]: g for g in ak.loraplus_param_groups(model, 1e-3, loraplus_weight_decay=0.5)}
    assert _names(model, groups["lora_B_no_decay"]["params"]) == {"transformer.ln_f.modules_to_save.default.weight",
                                                                  "transformer.ln_f.modules_to_save.default.bias"}
    assert groups["lora_B_no_decay"]["weight_decay"] == 0.0 and groups["lora_B_no_decay"]["lr"] == 16e-3


@pytest.mark.parametrize("kwargs, word", [
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"loraplus_lr_ratio": -1}, "loraplus_lr_ratio must be a positive number"),
    ({"loraplus_lr_embedding": "x"}, "loraplus_lr_embedding must be a positive number"),
    ({"loraplus_weight_decay": -0.1}, "loraplus_weight_decay must be a non-negative number"),
])
def test_bad_settings_are_refused(kwargs, word):
    model = tiny_llama()
    ak.attach(model, ak.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ak.ConfigError, match=word):
        ak.loraplus_param_groups(model, **{"lr": 1e-3, **kwargs})


def test_plain_model_is_refused():
    with pytest.raises(ak.ConfigError, match="no trainable parameters"):
        ak.loraplus_param_groups(tiny_llama().requires_grad_(False), 1e-3)


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_loss_falls_with_a_torch_loop():
    model = tiny_llama()
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    opt = ak.create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-3, loraplus_lr_ratio=16)
    ids = input_ids(4, 12)
    model.train()
    first = float(_lm_loss(model, ids).detach())
    for _ in range(15):
        loss = _lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(_lm_loss(model, ids).detach()) < first - 0.05


def test_hf_trainer_with_loraplus_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = ak.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    ids = input_ids(8, 10)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", logging_steps=1, learning_rate=1e-3,
                             lr_scheduler_type="constant", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt  # accelerate wraps it
    rates = sorted({g["lr"] for g in opt.param_groups})
    assert rates == [1e-3, 16e-3]  # the scheduler kept each group's own rate
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved)


def _cli_fixtures():
    spec = importlib.util.spec_from_file_location("_cli_fixtures", Path(__file__).parents[1] / "cli" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_train_loraplus_ratio(tmp_path, capsys):
    from adapterkit.cli.main import main

    fixtures = _cli_fixtures()
    model_dir = fixtures.build_model_dir(tmp_path / "model")
    data = fixtures.write_chat_data(tmp_path / "chat.jsonl")
    common = ["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "6", "--r", "4",
              "--batch-size", "4", "--lr", "5e-3"]
    assert main(common + ["--out", str(tmp_path / "plus"), "--loraplus-ratio", "16"]) == 0
    log = json.loads((tmp_path / "plus" / "training.json").read_text())
    assert log["config"]["loraplus_ratio"] == 16
    assert log["steps"][-1]["loss"] < log["steps"][0]["loss"]
    assert main(common + ["--out", str(tmp_path / "bad"), "--loraplus-ratio", "0"]) != 0
    assert "--loraplus-ratio must be a positive number" in "".join(capsys.readouterr())


def test_train_loop_keeps_group_ratios(monkeypatch):
    from adapterkit.train import TrainConfig, train

    model = tiny_llama()
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(sorted(g["lr"] for g in self.param_groups))
        return real_step(self, *a, **k)

    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in input_ids(8, 10)]
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    result = train(model, examples, cfg=TrainConfig(max_steps=4, lr=1e-2, batch_size=4, warmup_steps=1,
                                                    loraplus_ratio=4))
    assert all(abs(hi / lo - 4) < 1e-9 for lo, hi in seen) and len(seen) == 4
    assert result.steps[-1].loss < result.steps[0].loss
