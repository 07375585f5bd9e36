"""Bad input to `load`: each case raises the right exception, names the culprit, and leaves the model unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak
from adapterkit.state import adapter_state
from helpers import assert_unchanged, build, logits, snapshot


@pytest.fixture
def saved(tmp_path):
    """An adapterkit adapter (q_proj, v_proj on tiny Llama, hidden 32) saved to tmp_path/adapter."""
    model = ak.attach(build("llama"), ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path / "adapter"
    ak.save(model, folder)
    return folder


def _expect_failure(model, path, exc, *needles, **kwargs):
    before = snapshot(model)
    with pytest.raises(exc) as info:
        ak.load(model, path, **kwargs)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in: {info.value}"
    assert_unchanged(model, before)
    return info.value


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_tensors(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_directory(tmp_path) -> None:
    _expect_failure(build("llama"), tmp_path / "nowhere", ak.AdapterLoadError, "nowhere", "does not exist")


def test_directory_without_config(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    _expect_failure(build("llama"), tmp_path, ak.AdapterLoadError, "adapter_config.json", "notes.txt")


def test_config_without_weights(saved) -> None:
    (saved / "adapter_model.safetensors").unlink()
    _expect_failure(build("llama"), saved, ak.AdapterLoadError, "adapter_model.safetensors")


def test_truncated_safetensors(saved) -> None:
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_failure(build("llama"), saved, ak.AdapterLoadError, "adapter_model.safetensors", "truncated")


def test_use_dora_in_json_is_refused(saved) -> None:
    _edit_config(saved, use_dora=True)
    _expect_failure(build("llama"), saved, ak.AdapterLoadError, "use_dora")


def test_target_matching_nothing(saved) -> None:
    _edit_config(saved, target_modules=["wq", "wv"])
    error = _expect_failure(build("llama"), saved, ak.AdapterLoadError, "wq", "q_proj")
    assert isinstance(error.__cause__, ak.TargetError)


def test_unknown_future_keys_are_reported_not_fatal(saved) -> None:
    _edit_config(saved, some_future_option={"x": 1})
    model = build("llama")
    report = ak.load(model, saved)
    assert report.unknown_config_keys == ["some_future_option"]
    assert "some_future_option" in str(report)
    assert ak.adapters(model)["default"].unknown_keys == {"some_future_option": {"x": 1}}


def test_wrong_shape_hidden_32_onto_48(saved) -> None:
    # Caught by the base fingerprint first, and by the tensor shapes for a file without one (PEFT's).
    _expect_failure(build("llama", hidden=48), saved, ak.AdapterLoadError, "q_proj", "32", "48")
    _edit_tensors(saved, lambda t: None)  # no fingerprint, as PEFT writes it: the tensor shapes tell
    _expect_failure(build("llama", hidden=48), saved, ak.AdapterLoadError, "q_proj", "[4, 32]", "[4, 48]")


def test_extra_layers_are_unexpected(tmp_path) -> None:
    big = ak.attach(build("llama", layers=3), ak.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ak.save(big, tmp_path)
    _expect_failure(build("llama"), tmp_path, ak.AdapterLoadError, "layers.2.self_attn.q_proj")
    _edit_tensors(tmp_path, lambda t: None)  # without the fingerprint: the strict key check tells
    _expect_failure(build("llama"), tmp_path, ak.AdapterLoadError, "layers.2.self_attn.q_proj", "strict=False")
    model = build("llama")
    report = ak.load(model, tmp_path, strict=False)
    assert report.unexpected == [
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight",
    ]
    assert not report.ok


def test_missing_keys_strict(saved) -> None:
    _edit_tensors(saved, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    _expect_failure(build("llama"), saved, ak.AdapterLoadError, "layers.1.self_attn.v_proj.lora_B.weight")


def test_tensor_that_would_overwrite_a_base_weight(saved) -> None:
    key = "base_model.model.model.norm.weight"
    base = build("llama")
    changed = base.model.norm.weight.detach() + 1
    _edit_tensors(saved, lambda t: t.__setitem__(key, changed.clone()))
    _expect_failure(build("llama"), saved, ak.AdapterLoadError, key, "allow_base_overwrite")

    model = build("llama")
    report = ak.load(model, saved, allow_base_overwrite=True)
    assert key in report.applied
    assert torch.equal(model.model.norm.weight, changed)

    # A base tensor identical to the model's own is skipped and reported as such.
    _edit_tensors(saved, lambda t: t.__setitem__(key, base.model.norm.weight.detach().clone()))
    model = build("llama")
    report = ak.load(model, saved)
    assert report.skipped == [key] and key not in report.applied
    assert torch.equal(model.model.norm.weight, base.model.norm.weight)


def test_loading_the_same_name_twice(saved) -> None:
    model = build("llama")
    ak.load(model, saved)
    expected = logits(model)
    _expect_failure(model, saved, ak.AdapterLoadError, "'default'", "already attached")
    assert torch.equal(logits(model), expected)
    ak.load(model, saved, name="second")
    assert set(ak.adapters(model)) == {"default", "second"}


def test_failed_load_on_a_model_with_an_adapter_keeps_it(saved, tmp_path) -> None:
    model = ak.attach(build("llama"), ak.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    expected = logits(model)
    _edit_tensors(saved, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"))
    _expect_failure(model, saved, ak.AdapterLoadError, "layers.0.self_attn.q_proj.lora_A", name="other")
    assert list(ak.adapters(model)) == ["default"]
    assert torch.equal(logits(model), expected)
    assert adapter_state(model) is not None


def test_lora_config_lora_bias_refused_at_construction() -> None:
    with pytest.raises(ak.ConfigError, match="lora_bias"):
        ak.LoraConfig(target_modules=["q_proj"], lora_bias=True)
