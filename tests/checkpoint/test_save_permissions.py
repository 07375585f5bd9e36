"""Saved adapter folders and files get the mode a plain mkdir/open gives under the umask, not mkdtemp's 0700, so
that another user (a server) can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import adapterkit as ak
from adapterkit.checkpoint import io
from helpers import build

# umask -> (folder mode, file mode) that mkdir / open(..., "w") give under it.
MODES = {0o022: (0o755, 0o644), 0o077: (0o700, 0o600)}


@pytest.fixture(params=sorted(MODES), ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _two_adapters():
    model = build("llama")
    ak.attach(model, ak.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ak.attach(model, ak.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), name="other")
    return model


def _modes(root: Path) -> dict[str, int]:
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in paths}


def _expected(root: Path, umask: int) -> dict[str, int]:
    folder, file = MODES[umask]
    return {str(p.relative_to(root)): folder if p.is_dir() else file for p in [root, *root.rglob("*")]}


def test_new_folder_and_named_subfolder(tmp_path, umask):
    target = ak.save(_two_adapters(), tmp_path / "ad")
    modes = _modes(target)
    assert {".", "adapter_model.safetensors", "adapter_config.json", "other",
            "other/adapter_model.safetensors", "other/adapter_config.json"} == set(modes)
    assert modes == _expected(target, umask)


def test_saving_over_an_existing_folder(tmp_path, umask):
    model = _two_adapters()
    target = tmp_path / "ad"
    target.mkdir(mode=0o700)  # as an earlier version of adapterkit left it
    os.chmod(target, 0o700)
    ak.save(model, target)
    ak.save(model, target)  # the exchange path: a previous tree is in place
    assert _modes(target) == _expected(target, umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_carried_over_entries_keep_their_own_modes(tmp_path, umask):
    model = _two_adapters()
    target = ak.save(model, tmp_path / "ad")
    (target / "private").mkdir()
    os.chmod(target / "private", 0o711)
    (target / "private" / "notes.txt").write_text("x")
    os.chmod(target / "private" / "notes.txt", 0o640)
    ak.save(model, target)
    assert stat.S_IMODE((target / "private").stat().st_mode) == 0o711
    assert stat.S_IMODE((target / "private" / "notes.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE(target.stat().st_mode) == MODES[umask][0]


def test_umask_read_without_proc_is_unchanged(monkeypatch, umask):
    monkeypatch.setattr(io, "_PROC_STATUS", "/nonexistent/status")
    assert io.current_umask() == umask
    assert os.umask(umask) == umask  # and it was set back


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc only")
def test_umask_read_from_proc(umask):
    assert io.current_umask() == umask
