"""Bad input gives one `error: ...` line on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys


def _one_error_line(code: int, err: str) -> str:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


def test_missing_data_file(cli, tmp_path, tiny_model_dir):
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "o")
    assert "nope.jsonl" in _one_error_line(code, err)


def test_an_out_path_that_is_a_file_is_refused_before_training(cli, tmp_path, tiny_model_dir, chat_data,
                                                                 monkeypatch):
    import adapterkit.cli.train as train_cli

    monkeypatch.setattr(train_cli, "_train", lambda **kw: (_ for _ in ()).throw(AssertionError("trained")))
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", notes)
    assert "--out: " in _one_error_line(code, err) and "notes.txt exists and is a file, not a directory" in err
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", notes / "adapter")
    assert "notes.txt is a file, not a directory" in _one_error_line(code, err)
    assert notes.read_text() == "keep me"


def test_merge_out_that_is_a_file_is_refused(cli, tmp_path, trained_adapter, tiny_model_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    code, _, err = cli("merge", trained_adapter, "--model", tiny_model_dir, "--out", notes)
    assert "--out: " in _one_error_line(code, err) and "notes.txt exists and is a file, not a directory" in err
    assert notes.read_text() == "keep me"


def test_bad_jsonl_line_is_named(cli, tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    data.write_text(f"{good}\n{good}\n{{not json\n", encoding="utf-8")
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "o")
    assert "line 3" in _one_error_line(code, err)


def test_unknown_model(cli, tmp_path, chat_data):
    code, _, err = cli("train", "--model", tmp_path / "no-such-model", "--data", chat_data, "--out", tmp_path / "o")
    assert "no-such-model" in _one_error_line(code, err)


def test_missing_adapter_directory(cli, tmp_path):
    for command in (["inspect"], ["verify"], ["merge", "--out", str(tmp_path / "m")]):
        code, _, err = cli(command[0], tmp_path / "missing", *command[1:])
        assert "missing" in _one_error_line(code, err)


def test_adapter_base_mismatch(cli, trained_adapter, other_model_dir, tmp_path):
    code, _, err = cli("generate", "--model", other_model_dir, "--adapter", trained_adapter, "hi")
    _one_error_line(code, err)
    code, _, err = cli("merge", trained_adapter, "--model", other_model_dir, "--out", tmp_path / "m")
    _one_error_line(code, err)


def test_bad_options(cli, tmp_path, tiny_model_dir, chat_data, trained_adapter):
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", tmp_path / "o",
                       "--method", "nosuch")
    assert "nosuch" in _one_error_line(code, err)
    code, _, err = cli("merge", trained_adapter, "--out", tmp_path / "m", "--dtype", "int8")
    assert "int8" in _one_error_line(code, err)


def test_more_offloaded_layers_than_the_model_has(cli, tmp_path, tiny_model_dir, chat_data):
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", tmp_path / "o",
                       "--checkpoint", "--offload-layers", "99", "--max-steps", "1")
    assert "--offload-layers 99: LlamaForCausalLM has 2 decoder layers" in _one_error_line(code, err)
    assert not (tmp_path / "o").exists()


def test_debug_shows_traceback(cli, tmp_path):
    import pytest

    from adapterkit.errors import AdapterLoadError

    with pytest.raises(AdapterLoadError):
        cli("--debug", "inspect", tmp_path / "missing")


def test_installed_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adapterkit.cli.main", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    _one_error_line(proc.returncode, proc.stderr)
