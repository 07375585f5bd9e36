"""`LoadReport`: every file tensor accounted for; `missing` only adapter parameters; base weights never overwritten
silently (refused, or skipped when identical, or applied on explicit opt-in)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import adapterkit as ak
from helpers import assert_unchanged, build, logits, snapshot

peft = pytest.importorskip("peft")

EMBED_BASE = "base_model.model.model.embed_tokens.base_layer.weight"
NORM = "base_model.model.model.norm.weight"
Q0_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _read(folder) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}


def _rewrite(folder, edit) -> dict[str, torch.Tensor]:
    tensors, meta = _read(folder)
    edit(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=meta)
    return tensors


def _peft_embedding_adapter(folder) -> torch.nn.Module:
    """A real PEFT adapter on embed_tokens + q_proj: PEFT also writes the whole base embedding into the file."""
    theirs = peft.get_peft_model(
        build("llama"), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["embed_tokens", "q_proj"])
    )
    with pytest.warns(UserWarning):
        theirs.save_pretrained(str(folder))
    assert EMBED_BASE in _read(folder)[0]
    return theirs


def test_peft_base_layer_identical_is_skipped_and_noted(tmp_path):
    theirs = _peft_embedding_adapter(tmp_path)
    model = build("llama")
    report = ak.load(model, tmp_path)
    assert report.skipped == [EMBED_BASE]
    assert report.missing == [] and report.unexpected == [] and report.refused == []
    torch.testing.assert_close(logits(model), logits(theirs))
    text = str(report)
    for key in _read(tmp_path)[0]:
        assert key in text  # every tensor of the file has a line
    line = next(l for l in text.splitlines() if EMBED_BASE in l)
    assert "identical-to-base, skipped -> model.embed_tokens." in line
    assert report.base_check == "not verified (no fingerprint in file)"


def test_peft_base_layer_that_differs_is_refused_and_model_unchanged(tmp_path):
    _peft_embedding_adapter(tmp_path)
    model = build("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.1)  # the base the file's embedding would overwrite
    before = snapshot(model)
    with pytest.raises(ak.AdapterLoadError) as err:
        ak.load(model, tmp_path)
    message = str(err.value)
    assert EMBED_BASE in message and "would overwrite base weights" in message
    assert "Nothing was changed" in message and "allow_base_overwrite=True" in message
    assert_unchanged(model, before)


def test_base_overwrite_opt_in_applies_it(tmp_path):
    theirs = _peft_embedding_adapter(tmp_path)
    model = build("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.1)
    report = ak.load(model, tmp_path, allow_base_overwrite=True)
    assert EMBED_BASE in report.applied
    assert torch.equal(model.model.embed_tokens.base_layer.weight, _read(tmp_path)[0][EMBED_BASE])
    torch.testing.assert_close(logits(model), logits(theirs))
    assert "applied to a base weight (allowed by the caller)" in str(report)


def _ours(folder) -> None:
    ak.save(ak.attach(build("llama"), ak.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"])), folder)


def test_arbitrary_base_key_refused_or_skipped(tmp_path):
    _ours(tmp_path)
    base = build("llama")
    _rewrite(tmp_path, lambda t: t.__setitem__(NORM, base.model.norm.weight.detach() + 1))
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ak.AdapterLoadError, match=f"would overwrite base weights: {NORM}"):
        ak.load(model, tmp_path)
    assert_unchanged(model, before)

    _rewrite(tmp_path, lambda t: t.__setitem__(NORM, base.model.norm.weight.detach().clone()))
    report = ak.load(model, tmp_path)
    assert report.skipped == [NORM] and report.unexpected == []


def test_base_key_of_wrong_shape_is_refused_with_shapes(tmp_path):
    _ours(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__(NORM, torch.ones(7)))
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ak.AdapterLoadError, match=NORM):
        ak.load(model, tmp_path, allow_base_overwrite=True)  # the opt-in never applies a tensor of another shape
    assert_unchanged(model, before)


def test_missing_lists_only_adapter_parameters(tmp_path):
    _ours(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop(Q0_B))
    with pytest.raises(ak.AdapterLoadError) as err:
        ak.load(build("llama"), tmp_path)
    assert Q0_B in str(err.value) and "strict=False" in str(err.value)

    report = ak.load(build("llama"), tmp_path, strict=False)
    assert report.missing == [Q0_B]  # never base weights, though the file has none of them
    assert not report.ok
    assert f"MISSING {Q0_B}" in str(report)


def test_unexpected_lists_tensors_not_applied(tmp_path):
    _ours(tmp_path)
    stray = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    _rewrite(tmp_path, lambda t: t.__setitem__(stray, torch.ones(32)))
    with pytest.raises(ak.AdapterLoadError) as err:
        ak.load(build("llama"), tmp_path)
    assert stray in str(err.value) and "match no module" in str(err.value)

    report = ak.load(build("llama"), tmp_path, strict=False)
    assert report.unexpected == [stray]
    assert report.missing == []
    line = next(l for l in str(report).splitlines() if stray in l)
    assert "unexpected: matches no adapter parameter" in line


def test_summary_counts_every_outcome(tmp_path):
    _ours(tmp_path)
    tensors = _rewrite(tmp_path, lambda t: t.__setitem__(NORM, build("llama").model.norm.weight.detach().clone()))
    report = ak.load(build("llama"), tmp_path)
    assert len(report.outcomes) == len(tensors)
    assert report.summary().startswith(f"adapter 'default' from {tmp_path}: 4 applied, 1 identical-to-base skipped")
    assert report.summary().endswith("base: same base")
