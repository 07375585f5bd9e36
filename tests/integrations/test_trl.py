"""TRL's SFTTrainer on an adapterkit-attached model: it trains the adapter only and save_model writes the adapter."""

from __future__ import annotations

import pytest
import torch
from cli.conftest import build_model_dir

import adapterkit as ak

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def test_sft_trainer_trains_and_saves_the_adapter(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    base = build_model_dir(tmp_path / "base", layers=1)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    ak.attach(model, ak.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    data = Dataset.from_list([{"text": f"Fact {i} is {i * 7}."} for i in range(16)])
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                     learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                     max_length=32, disable_tqdm=True,
                     bf16=False)  # bf16 autocast would stay patched onto model.forward (accelerate) after training
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert trainer.model is model or ak.adapters(trainer.model), "TRL must train the adapterkit model itself"

    moved = max((p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before)
    assert moved > 1e-4, "the adapter did not train"
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"base weight {n} changed"

    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {CONFIG, WEIGHTS} <= files and "model.safetensors" not in files and "config.json" not in files
    fresh = AutoModelForCausalLM.from_pretrained(base)
    ak.load(fresh, tmp_path / "final")
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item() <= 1e-6
