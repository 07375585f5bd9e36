"""Saving and loading adapterkit's own files: exact round trips, the load report, and what the file holds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterkit as ak
from helpers import build, input_ids, logits, perturb


def _keys(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_round_trip_is_exact(arch, tmp_path) -> None:
    model = ak.attach(build(arch), ak.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    expected = logits(model)
    ak.save(model, tmp_path)
    other = build(arch)
    report = ak.load(other, tmp_path)
    assert torch.equal(logits(other), expected)
    assert report.ok and not report.missing and not report.skipped
    assert sorted(report.applied) == sorted(_keys(tmp_path))
    assert not any(p.requires_grad for p in other.parameters())  # loaded for inference by default
    trained = build(arch)
    ak.load(trained, tmp_path, trainable=True)
    assert ak.trainable_parameters(trained)


def test_file_layout(tmp_path) -> None:
    model = ak.attach(build("llama"), ak.LoraConfig(r=4, target_modules=["q_proj"]))
    ak.save(model, tmp_path)
    keys = _keys(tmp_path)
    assert keys == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (32, 4),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": (4, 32),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": (32, 4),
    }
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["q_proj"]
    assert cfg["inference_mode"] is True


@pytest.mark.parametrize("arch, embedding", [("llama", "embed_tokens"), ("qwen2", "embed_tokens"), ("gpt2", "wte")])
def test_embedding_lora_saves_no_base_weights(arch, embedding, tmp_path) -> None:
    model = ak.attach(build(arch), ak.LoraConfig(r=4, target_modules=[embedding], init_lora_weights=False))
    ak.save(model, tmp_path)
    keys = set(_keys(tmp_path))
    assert all(".lora_embedding_" in k for k in keys), keys
    assert len(keys) == 2


def test_modules_to_save_copy_saved_under_the_module_key(tmp_path) -> None:
    model = ak.attach(build("llama"), ak.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    perturb([model.lm_head.modules_to_save["default"].weight])
    expected = logits(model)
    ak.save(model, tmp_path)
    assert _keys(tmp_path)["base_model.model.lm_head.weight"] == (128, 32)
    other = build("llama")
    report = ak.load(other, tmp_path)
    assert "base_model.model.lm_head.weight" in report.applied
    assert torch.equal(logits(other), expected)


def test_peft_embedding_adapter_base_weights_are_reported_identical(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                              init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    report = ak.load(build("llama"), tmp_path)
    assert report.skipped, "PEFT saves the base embedding beside an embedding LoRA: it must be reported"
    assert all("embed_tokens" in k for k in report.skipped)
    assert str(report)  # renders


def test_bf16_round_trip(tmp_path) -> None:
    model = ak.attach(build("llama").to(torch.bfloat16), ak.LoraConfig(target_modules=["q_proj"],
                                                                       init_lora_weights=False))
    ak.save(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    other = build("llama").to(torch.bfloat16)
    ak.load(other, tmp_path)
    assert torch.equal(logits(other), logits(model))


def test_save_keeps_other_files_and_refuses_nan(tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    model = ak.attach(build("llama"), ak.LoraConfig(target_modules=["q_proj"]))
    ak.save(model, tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    first = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ak.AdapterSaveError, match="q_proj"):
        ak.save(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == first


def test_save_without_adapters_is_an_error(tmp_path) -> None:
    with pytest.raises(ak.ConfigError, match="no adapters"):
        ak.save(build("llama"), tmp_path)


def test_load_non_strict_reports_missing(tmp_path) -> None:
    small = ak.attach(build("llama", layers=1), ak.LoraConfig(target_modules=["q_proj"]))  # default init: B = 0
    perturb(ak.trainable_parameters(small))  # "trained"
    ak.save(small, tmp_path)
    model = build("llama")
    with pytest.raises(ak.AdapterLoadError, match="layers.1.self_attn.q_proj"):
        ak.load(model, tmp_path, strict=False)  # the base fingerprint says: another structure
    path = tmp_path / "adapter_model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})  # drop the fingerprint, as in PEFT files
    report = ak.load(model, tmp_path, strict=False)
    assert report.missing == [
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
    ]
    assert logits(model, input_ids()).isfinite().all()
    # The parameter with no value gets the config's init (B = 0: a no-op), never uninitialised memory.
    assert torch.count_nonzero(model.model.layers[1].self_attn.q_proj.lora_B["default"].weight) == 0


def test_save_names_takes_one_name_as_a_string(tmp_path):
    """names="ab" is the adapter "ab", not the adapters "a" and "b"."""
    model = build("llama")
    for name in ("ab", "a", "b"):
        ak.attach(model, ak.LoraConfig(r=2, target_modules=["q_proj"]), name=name)
    ak.save(model, tmp_path / "one", names="ab")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["ab"]
