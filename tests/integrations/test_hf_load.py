"""Loading an adapterkit adapter the ways PEFT users do: AutoPeftModelForCausalLM (auto_mapping when task_type is
unset), adapterkit.from_pretrained (base from the recorded path, or given), and PEFT's parameter summary line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import logits, tiny_llama

import adapterkit as ak
from adapterkit.errors import AdapterLoadError

CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path, object]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hfload")
    tiny_llama().save_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    ak.attach(model, ak.LoraConfig(**CFG))  # task_type unset
    ak.save(model, root / "adapter")
    return root / "base", root / "adapter", logits(model)


def test_config_records_the_base_and_auto_mapping(saved):
    base, adapter, _ = saved
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] is None
    assert cfg["base_model_name_or_path"] == str(base)
    assert cfg["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                   "parent_library": "transformers.models.llama.modeling_llama"}


def test_auto_peft_model_loads_the_adapter(saved):
    from peft import AutoPeftModelForCausalLM

    _, adapter, want = saved
    got = logits(AutoPeftModelForCausalLM.from_pretrained(str(adapter)))
    assert (got - want).abs().max().item() <= 1e-5


def test_adapterkit_from_pretrained_recorded_and_given_base(saved):
    from transformers import AutoModelForCausalLM

    base, adapter, want = saved
    model = ak.from_pretrained(adapter)
    assert type(model).__name__ == "LlamaForCausalLM" and ak.adapters(model).keys() == {"default"}
    assert (logits(model) - want).abs().max().item() <= 1e-6
    assert (logits(ak.from_pretrained(adapter, base=str(base))) - want).abs().max().item() <= 1e-6
    built = AutoModelForCausalLM.from_pretrained(base)
    assert ak.from_pretrained(adapter, base=built) is built
    assert (logits(built) - want).abs().max().item() <= 1e-6


def test_from_pretrained_without_a_recorded_base_says_so(tmp_path):
    model = tiny_llama()  # built from a config: no name_or_path
    ak.attach(model, ak.LoraConfig(**CFG))
    ak.save(model, tmp_path / "adapter")
    with pytest.raises(AdapterLoadError, match="records no base_model_name_or_path; pass base="):
        ak.from_pretrained(tmp_path / "adapter")


def test_print_trainable_parameters_matches_peft(capsys):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(**CFG))
    peft_model.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()

    model = tiny_llama()
    ak.attach(model, ak.LoraConfig(**CFG))
    assert ak.print_trainable_parameters(model).splitlines()[0] == peft_line
    capsys.readouterr()

    ak.attach(model, ak.LoraConfig(r=2, target_modules=["k_proj"]), name="extra")
    text = ak.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == text
    lines = text.splitlines()
    peft_total = int(peft_line.split("all params: ")[1].split(" ")[0].replace(",", ""))
    per_layer = (4 * 32 + 32 * 4) + (4 * 32 + 16 * 4)  # q: A (4, 32), B (32, 4); v: A (4, 32), B (16, 4)
    assert lines[1] == f"  adapter 'default': {2 * per_layer:,d} params (lora, active)"
    extra = 2 * (2 * 32 + 16 * 2)  # k: A (2, 32), B (16, 2), 2 layers
    assert lines[2] == f"  adapter 'extra': {extra:,d} params (lora, inactive)"
    # "extra" is attached inactive, hence frozen: the trainable count stays the default adapter's.
    assert lines[0].startswith(f"trainable params: {2 * per_layer:,d} || all params: {peft_total + extra:,d} ||")
