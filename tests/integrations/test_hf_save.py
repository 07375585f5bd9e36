"""`model.save_pretrained` on an adapted transformers model writes a PEFT adapter directory that transformers, PEFT
and adapterkit load with the in-memory logits; the method lives on the instance only and goes with the last adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import input_ids, logits, tiny_llama

import adapterkit as ak
from adapterkit.errors import AdapterSaveError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as a local model directory: the adapter's base_model_name_or_path."""
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    return path


def adapted(base_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    ak.attach(model, ak.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval()


def test_save_pretrained_writes_a_peft_adapter(tmp_path, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = adapted(base_dir)
    want = logits(model)
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG, WEIGHTS]

    # transformers: from_pretrained(adapter dir) finds the base through base_model_name_or_path.
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    assert (got - want).abs().max().item() <= 1e-5
    got = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "out"))
    assert (got - want).abs().max().item() <= 1e-5
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    ak.load(fresh, tmp_path / "out")
    assert (logits(fresh) - want).abs().max().item() <= 1e-6


def test_save_pretrained_is_per_instance_and_leaves_with_the_adapter(tmp_path, base_dir):
    from transformers import AutoModelForCausalLM

    model = adapted(base_dir)
    other = AutoModelForCausalLM.from_pretrained(base_dir)
    assert "save_pretrained" in model.__dict__ and "save_pretrained" not in other.__dict__
    other.save_pretrained(tmp_path / "plain")  # the class's own method: a full model
    assert (tmp_path / "plain" / "config.json").is_file() and not (tmp_path / "plain" / CONFIG).exists()

    ak.unload(model)
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "unloaded")
    assert (tmp_path / "unloaded" / "config.json").is_file()

    model = adapted(base_dir)
    ak.delete(model, "default")
    assert "save_pretrained" not in model.__dict__


def test_save_pretrained_refuses_push_to_hub(tmp_path, base_dir):
    model = adapted(base_dir)
    with pytest.raises(AdapterSaveError, match="never touches the network"):
        model.save_pretrained(tmp_path / "out", push_to_hub=True)
    assert not (tmp_path / "out").exists()


def test_selected_adapters_and_deepcopy(tmp_path, base_dir):
    import copy

    model = adapted(base_dir)
    ak.attach(model, ak.LoraConfig(r=2, target_modules=["q_proj"]), name="second")
    model.save_pretrained(tmp_path / "one", selected_adapters=["second"])
    assert (tmp_path / "one" / "second" / WEIGHTS).is_file() and not (tmp_path / "one" / WEIGHTS).exists()
    twin = copy.deepcopy(model)
    assert twin.save_pretrained.__self__ is twin  # the copy saves itself, not the original
    twin.save_pretrained(tmp_path / "twin")
    assert (tmp_path / "twin" / WEIGHTS).is_file()


def test_accelerate_unwrap_keeps_the_instance_method(tmp_path, base_dir):
    from accelerate import Accelerator

    model = adapted(base_dir)
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    accelerator.unwrap_model(prepared).save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG, WEIGHTS]
    with torch.no_grad():
        assert prepared(input_ids=input_ids()).logits.shape[-1] == model.config.vocab_size
