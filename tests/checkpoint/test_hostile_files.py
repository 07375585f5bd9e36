"""Damaged and hostile adapter files: each is refused by an adapterkit error naming the file and what is wrong, and the
model is bit-identical afterwards (parameters, buffers, module tree, ties, config vocabulary size)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak
from adapterkit.checkpoint import fingerprint as F
from adapterkit.checkpoint.format import ALIASES_METADATA_KEY
from adapterkit.checkpoint.io import MAX_TENSORS
from adapterkit.methods.lora import LoraLinear
from adapterkit.vocab import VOCAB_METADATA_KEY
from helpers import VOCAB, assert_unchanged, build, logits, perturb, snapshot

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def saved(tmp_path):
    """LoRA on q_proj, v_proj and the (tied) embedding of tiny Qwen2, saved with its fingerprint and vocab record."""
    model = ak.attach(build("qwen2"), ak.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False))
    ak.save(model, tmp_path / "a")
    return tmp_path / "a"


def _refused(folder, *needles, model=None, exc=ak.AdapterLoadError, **kwargs):
    model = build("qwen2") if model is None else model
    before = snapshot(model)
    emb = model.get_input_embeddings().weight
    with pytest.raises(exc) as info:
        ak.load(model, folder, **kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    assert_unchanged(model, before)
    assert model.get_input_embeddings().weight is emb and model.lm_head.weight is emb, "tie or tensor replaced"
    assert model.config.vocab_size == emb.shape[0]
    return info.value


def _rewrite(folder, tensors=None, metadata=None, drop=()):
    """Re-save the weights file with edited tensors and/or header metadata entries (None value: remove it)."""
    path = folder / WEIGHTS
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    values = load_file(str(path))
    values.update(tensors or {})
    meta.update(metadata or {})
    for key in drop:
        meta.pop(key, None)
    save_file(values, str(path), metadata=meta)


def _edit_config(folder, text=None, **changes):
    path = folder / CONFIG
    if text is None:
        data = json.loads(path.read_text())
        data.update(changes)
        text = json.dumps(data)  # NaN / Infinity are written as Python's json writes them (and PEFT's)
    path.write_text(text)


# -- tensor values and dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensor_is_refused(saved, bad):
    value = load_file(str(saved / WEIGHTS))[KEY_A].clone()
    value[1, 3] = bad
    _rewrite(saved, {KEY_A: value})
    _refused(saved, WEIGHTS, KEY_A, "1 non-finite value(s)")


def test_huge_value_is_refused(saved):
    value = load_file(str(saved / WEIGHTS))[KEY_A].clone()
    value[0, 0] = 3e30  # a flipped exponent bit: finite, but it would overflow the activations
    _rewrite(saved, {KEY_A: value})
    _refused(saved, KEY_A, "magnitude 3e+30")


@pytest.mark.parametrize("dtype, name", [(torch.int32, "I32"), (torch.int64, "I64"), (torch.bool, "BOOL"),
                                         (torch.uint8, "U8")])
def test_integer_or_bool_tensor_is_refused(saved, dtype, name):
    _rewrite(saved, {KEY_A: torch.ones(4, 32, dtype=dtype)})
    _refused(saved, KEY_A, f"dtype '{name}'", "integer or bool")


def test_legacy_bin_with_nan_is_refused(saved):
    tensors = load_file(str(saved / WEIGHTS))
    tensors[KEY_A][0, 0] = float("nan")
    (saved / WEIGHTS).unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    _refused(saved, "adapter_model.bin", KEY_A, "non-finite")


# -- header bounds, checked from the first bytes ----------------------------------------------------------------------
def test_header_length_over_the_bound(saved):
    path = saved / WEIGHTS
    raw = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + raw[8:])
    _refused(saved, WEIGHTS, "declares a header of 1,099,511,627,776 bytes")


def test_header_length_past_the_end(saved):
    path = saved / WEIGHTS
    raw = path.read_bytes()
    path.write_bytes((len(raw)).to_bytes(8, "little") + raw[8:])
    _refused(saved, WEIGHTS, "header length field")


def test_too_many_tensors(saved):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    text = json.dumps(header).encode()
    (saved / WEIGHTS).write_bytes(len(text).to_bytes(8, "little") + text)
    _refused(saved, WEIGHTS, f"lists {MAX_TENSORS + 1:,} tensors")


def test_offsets_that_do_not_fit(saved):
    path = saved / WEIGHTS
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[KEY_A]["shape"] = [8, 32]  # twice the bytes its offsets span
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    _refused(saved, WEIGHTS, KEY_A, "does not fit its byte range")


# -- header metadata: aliases, vocabulary, fingerprint -------------------------------------------------------------
@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "must map alias keys"),
    ('{"x": 5}', "must map alias keys"),
    ('{"base_model.model.x.weight": "base_model.model.absent.weight"}', "which the file does not hold"),
    (json.dumps({KEY_A: KEY_A.replace("lora_A", "lora_B")}), "ambiguous"),
])
def test_damaged_aliases(saved, text, needle):
    _rewrite(saved, metadata={ALIASES_METADATA_KEY: text})
    _refused(saved, WEIGHTS, ALIASES_METADATA_KEY, needle)


@pytest.mark.parametrize("text, needle", [
    ("{bad", "not valid JSON"),
    ("[128, 32]", "a JSON list"),
    ('{"input": "x"}', "'input' must be [rows, dim]"),
    ('{"input": [128]}', "'input' must be [rows, dim]"),
    ('{"input": [0, 32]}', "'input' must be [rows, dim]"),
    ('{"input": [128, 32], "tied": "yes"}', "'tied' must be true or false"),
    ('{"input": [128, 32], "rows": 5}', "unknown entry 'rows'"),
    ('{"input": [1000000000, 32]}', "sizes from 1 to"),
])
def test_damaged_vocab_record(saved, text, needle):
    _rewrite(saved, metadata={VOCAB_METADATA_KEY: text})
    _refused(saved, WEIGHTS, VOCAB_METADATA_KEY, needle)


def _fingerprint(folder):
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS), "pt") as fh:
        return json.loads(fh.metadata()[F.METADATA_KEY])


def _module(fp):
    return fp["modules"]["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("edit, needle", [
    (lambda fp: "{not json", "not valid JSON"),
    (lambda fp: [1, 2], "a JSON list"),
    (lambda fp: {**fp, "version": 2}, "'version' is '2'"),
    (lambda fp: {**fp, "modules": []}, "'modules' must map"),
    (lambda fp: {**fp, "ties": "x"}, "'ties' must be"),
    (lambda fp: {**fp, "config": {"hidden_size": [32]}}, "'config' must map"),
    (lambda fp: (_module(fp).update(sample=_module(fp)["sample"][:-2]), fp)[1], "sample must be 256 base64"),
    (lambda fp: (_module(fp).update(sample="!" * len(_module(fp)["sample"])), fp)[1], "sample is not base64"),
    (lambda fp: (_module(fp).pop("shape"), fp)[1], "sample must be"),
    (lambda fp: (_module(fp).update(shape=[2**62, 2**62]), fp)[1], "shape must be a list of sizes"),
    (lambda fp: (_module(fp).update(rms="big"), fp)[1], "rms / med_abs must be finite"),
])
def test_damaged_fingerprint_is_an_error_not_skipped(saved, edit, needle):
    fp = edit(_fingerprint(saved))
    _rewrite(saved, metadata={F.METADATA_KEY: fp if isinstance(fp, str) else json.dumps(fp)})
    _refused(saved, WEIGHTS, F.METADATA_KEY, needle)
    _refused(saved, WEIGHTS, needle, check_base="warn")


def test_damaged_fingerprint_ignored_with_check_base_off(saved):
    _rewrite(saved, metadata={F.METADATA_KEY: "{not json"})
    model = build("qwen2")
    report = ak.load(model, saved, check_base="off")
    assert any("fingerprint is damaged and was ignored" in n for n in report.notes)


def test_compare_refuses_a_damaged_fingerprint_passed_directly():
    fp = F.compute(build("qwen2"), ["model.layers.0.self_attn.q_proj"])
    _module(fp)["sample"] = "AAAA"
    with pytest.raises(ak.AdapterLoadError, match="fingerprint is damaged.*sample"):
        F.compare(fp, build("qwen2"))


def test_fingerprint_and_vocab_record_disagree(saved):
    _rewrite(saved, metadata={VOCAB_METADATA_KEY: json.dumps({"input": [140, 32], "output": [140, 32], "tied": True})})
    _refused(saved, WEIGHTS, F.METADATA_KEY, VOCAB_METADATA_KEY, "[128, 32]", "[140, 32]", "disagree")


# -- a failed load after a vocabulary resize puts the very tensors back -----------------------------------------------
@pytest.mark.parametrize("rows", [100, 140])
def test_failed_load_after_a_resize_restores_the_original_rows(saved, rows):
    # No fingerprint (as PEFT writes it), so only the shapes after the resize tell: lora_embedding_A is (4, 128).
    sizes = {"input": [rows, 32], "output": [rows, 32], "tied": True}
    _rewrite(saved, metadata={VOCAB_METADATA_KEY: json.dumps(sizes)}, drop=[F.METADATA_KEY])
    model = build("qwen2")
    weight = model.model.embed_tokens.weight
    data_ptr = weight.data_ptr()
    _refused(saved, "do not fit", "lora_embedding_A", f"[4, {rows}]", model=model)
    assert model.model.embed_tokens.weight is weight and weight.data_ptr() == data_ptr
    assert model.model.embed_tokens.num_embeddings == VOCAB and model.config.vocab_size == VOCAB


def test_vocab_record_growing_past_the_bound(saved):
    sizes = {"input": [10_000_000, 32], "output": [10_000_000, 32], "tied": True}
    _rewrite(saved, metadata={VOCAB_METADATA_KEY: json.dumps(sizes)}, drop=[F.METADATA_KEY])
    _refused(saved, WEIGHTS, "10,000,000 rows", "at most 262,272")


# -- adapter_config.json --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, needles", [
    ({"lora_alpha": "16"}, ["lora_alpha must be a finite number", "'16' (str)"]),
    ({"r": 10**9}, ["r must be a positive integer up to 16384", "1000000000"]),
    ({"modules_to_save": "lm_head"}, ["modules_to_save must be a list of strings", "'lm_head'"]),
    ({"rank_pattern": {"(": 4}}, ["rank_pattern key '('", "not a valid regular expression"]),
    ({"rank_pattern": {"(?i)q_proj": 4}}, ["rank_pattern key '(?i)q_proj'", "not a valid regular expression"]),
    ({"target_modules": "(q"}, ["target_modules '(q'", "not a valid regular expression"]),
    ({"target_modules": "(.*_proj)+"}, ["target_modules '(.*_proj)+'", "exponential"]),
    ({"target_modules": 123}, ["target_modules must be a string (regex) or a list of strings", "123 (int)"]),
    ({"layers_pattern": "(?P<idx>layers)", "layers_to_transform": [0]}, ["layers_pattern", "not a valid regular"]),
    ({"lora_dropout": "x"}, ["lora_dropout must be a finite number", "'x'"]),
    ({"lora_alpha": float("nan")}, ["lora_alpha must be a finite number", "nan"]),
    ({"lora_alpha": float("inf")}, ["lora_alpha must be a finite number", "inf"]),
    ({"lora_alpha": 1e308}, ["lora_alpha must be a number from -1e+06 to 1e+06", "1e+308"]),
    ({"alpha_pattern": {"q_proj": -1e7}}, ["alpha_pattern['q_proj'] must be a number from", "-10000000"]),
    ({"use_rslora": "yes"}, ["use_rslora must be true or false", "'yes'"]),
    ({"trainable_token_indices": [True]}, ["trainable_token_indices must hold non-negative integer"]),
])
def test_wrong_typed_config_values(saved, changes, needles):
    _edit_config(saved, **changes)
    error = _refused(saved, str(saved / CONFIG), *needles)
    assert isinstance(error.__cause__, ak.ConfigError)


@pytest.mark.parametrize("text, needle", [
    (b'{"r": 4, "peft_type": "LORA", \xff\xfe}', "not UTF-8"),
    (b"[" * 1000 + b"]" * 1000, "nests 1000 levels deep"),
    (b'{"r": 4, "r": 8, "peft_type": "LORA"}', "'r' appears twice"),
    (b'["LORA"]', "must be a JSON object"),
    (b"", "not valid JSON"),
])
def test_config_file_damage(saved, text, needle):
    (saved / CONFIG).write_bytes(text)
    _refused(saved, str(saved / CONFIG), needle)


def test_config_with_a_50_mb_target_string(saved):
    data = json.loads((saved / CONFIG).read_text())
    data["target_modules"] = "q" * 50_000_000
    (saved / CONFIG).write_text(json.dumps(data))
    error = _refused(saved, str(saved / CONFIG), "at most 16,777,216")
    assert str(error).count(str(saved / CONFIG)) == 1


# -- named adapters resolve exactly ---------------------------------------------------------------------------------
@pytest.fixture
def two(tmp_path):
    model = ak.attach(build("qwen2"), ak.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ak.attach(model, ak.LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False), name="second")
    ak.save(model, tmp_path / "two")
    return tmp_path / "two"


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "second" / CONFIG).unlink(), "no adapter_config.json in"),
    (lambda d: ((d / "second" / CONFIG).unlink(), (d / "second" / CONFIG).symlink_to(d / "nowhere")),
     "not a readable file"),
    (lambda d: ((d / "second" / CONFIG).unlink(), (d / "second" / CONFIG).mkdir()), "not a readable file"),
    (lambda d: (d / "second" / CONFIG).write_bytes(b"\x00\xff"), "not UTF-8"),
    (lambda d: ((d / "second" / WEIGHTS).unlink(), (d / "second" / WEIGHTS).symlink_to(d / "nowhere")),
     "not a readable file"),
])
def test_damaged_named_adapter_never_falls_back_to_the_default(two, damage, needle):
    damage(two)
    error = _refused(two, str(two / "second"), needle, name="second")
    assert "second" in str(error)


def test_named_adapter_folder_that_is_a_dangling_link(two):
    import shutil

    shutil.rmtree(two / "second")
    os.symlink(two / "nowhere", two / "second")
    _refused(two, str(two / "second"), "not a readable folder", name="second")


def test_named_adapter_without_a_folder_loads_the_top_level_under_that_name(two):
    import shutil

    shutil.rmtree(two / "second")
    model = build("qwen2")
    ak.load(model, two, name="other")
    assert ak.adapters(model)["other"].target_modules == ["q_proj"]


@pytest.mark.parametrize("name", ["../two", "a/b", "", "x" * 129])
def test_adapter_names_that_are_not_names(two, name):
    _refused(two, "must be 1-128 letters", name=name)


# -- a failure in the middle of attach leaves no wrapper behind ---------------------------------------------------------
def test_failure_halfway_through_attach_restores_the_module_tree(two, monkeypatch):
    model = build("qwen2")
    ak.load(model, two)  # "default": LoRA on q_proj
    perturb([model.model.layers[0].self_attn.q_proj.lora_B["default"].weight], scale=0.1)
    expected = logits(model)
    calls = []
    original = LoraLinear.add_adapter

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated allocation failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "add_adapter", failing)
    before = snapshot(model)
    (two / "second" / CONFIG).write_text((two / "second" / CONFIG).read_text().replace('"v_proj"', '"q_proj", "v_proj"'))
    with pytest.raises(RuntimeError, match="simulated"):
        ak.load(model, two, name="second", strict=False)
    assert_unchanged(model, before)
    assert sorted(ak.adapters(model)) == ["default"]
    assert torch.equal(logits(model), expected)
