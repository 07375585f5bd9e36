"""transformers Trainer with an adapterkit-attached model: save_model and checkpoints write the adapter, and
`train(resume_from_checkpoint=...)` continues exactly as the uninterrupted run (losses, adapter weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import VOCAB, logits, tiny_llama

import adapterkit as ak

STEPS, SAVE_AT = 6, 3
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_llama(layers=1).save_pretrained(path)
    return path


def dataset() -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(24):
        ids = torch.randint(0, VOCAB, (12,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)})
    return rows


def trainer(base_dir: Path, out: Path, max_steps: int = STEPS, rank: int = 4):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(0)
    ak.attach(model, ak.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=SAVE_AT, per_device_train_batch_size=4,
        learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        lr_scheduler_type="linear", warmup_steps=1, dataloader_num_workers=0, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=dataset())


def losses(tr) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in tr.state.log_history if "loss" in e}


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoints_are_adapters_and_resume_continues_exactly(tmp_path, base_dir):
    from transformers import AutoModelForCausalLM

    full = trainer(base_dir, tmp_path / "full")
    full.train()
    want_losses, want = losses(full), adapter(full.model)
    assert len(want_losses) == STEPS and len(set(want_losses.values())) > 1

    ckpt = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    assert (ckpt / WEIGHTS).is_file() and (ckpt / CONFIG).is_file()
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "config.json").exists()
    assert (ckpt / "optimizer.pt").is_file()

    resumed = trainer(base_dir, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    got_losses = losses(resumed)  # the checkpoint's log history (steps 1-3), then the resumed steps
    assert sorted(got_losses) == list(range(1, STEPS + 1))
    for step, loss in got_losses.items():
        assert loss == pytest.approx(want_losses[step], abs=1e-6), f"step {step}: {loss} != {want_losses[step]}"
    got = adapter(resumed.model)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), f"{name} differs after resume"

    # The final save_model: an adapter directory that transformers, PEFT and adapterkit load alike.
    full.save_model(str(tmp_path / "final"))
    files = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert CONFIG in files and WEIGHTS in files and "model.safetensors" not in files
    want_logits = logits(full.model.eval())
    got_logits = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "final"))
    assert (got_logits - want_logits).abs().max().item() <= 1e-5
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    ak.load(fresh, tmp_path / "final")
    assert (logits(fresh) - want_logits).abs().max().item() <= 1e-6


def test_resume_onto_an_adapter_of_another_rank_fails_loudly(tmp_path, base_dir):
    first = trainer(base_dir, tmp_path / "a", max_steps=SAVE_AT)
    first.train()
    other = trainer(base_dir, tmp_path / "b", rank=8)
    with pytest.raises(RuntimeError, match=r"size mismatch for model\.layers\.0\.self_attn\.q_proj\.lora_A"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{SAVE_AT}"))
