"""A save removes temp folders that earlier, interrupted saves into the same target left beside it — only folders
this library made (name pattern and marker) and only when no save holds them (the marker's flock)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import adapterkit as ak
from adapterkit.checkpoint import io
from helpers import build

pytestmark = pytest.mark.skipif(io.fcntl is None, reason="needs flock")

# Makes a marked temp folder with the library's own code, then waits for a line on stdin (holding the lock while
# it waits) and exits.
MAKER = """
import sys
from pathlib import Path
from adapterkit.checkpoint import io
folder = Path(sys.argv[1])
folder.mkdir()
io._write_marker(folder)
print("ready", flush=True)
sys.stdin.readline()
"""


def _model():
    return ak.attach(build("llama"), ak.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))


def _marked_by_child(folder: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", MAKER, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def _end(child: subprocess.Popen) -> None:
    child.stdin.close()
    assert child.wait(timeout=30) == 0


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_folder_of_a_dead_save_is_removed(tmp_path):
    target = tmp_path / "ad"
    ak.save(_model(), target)
    stale = tmp_path / ".ad.tmp-dead1234"
    _end(_marked_by_child(stale))  # its process is gone, and with it the lock
    (stale / "adapter_model.safetensors").write_bytes(b"half a file")
    marker = (stale / io.MARKER).read_text()
    assert marker.startswith("adapterkit save in progress\npid ")
    ak.save(_model(), target)
    assert _names(tmp_path) == ["ad"]


def test_stale_old_folder_of_the_rename_fallback_is_removed(tmp_path):
    stale = tmp_path / ".ad.old-0badc0de"
    _end(_marked_by_child(stale))
    ak.save(_model(), tmp_path / "ad")  # into a new target too
    assert _names(tmp_path) == ["ad"]


def test_folder_of_a_running_save_in_another_process_is_kept(tmp_path):
    target = tmp_path / "ad"
    live = tmp_path / ".ad.tmp-live5678"
    child = _marked_by_child(live)
    try:
        ak.save(_model(), target)
        assert _names(tmp_path) == [".ad.tmp-live5678", "ad"]
        assert _names(live) == [io.MARKER]
    finally:
        _end(child)
    ak.save(_model(), target)  # the same folder, once its owner has ended
    assert _names(tmp_path) == ["ad"]


def test_folder_locked_in_this_process_is_kept(tmp_path):
    live = tmp_path / ".ad.tmp-mine"
    live.mkdir()
    fd = io._write_marker(live)
    try:
        ak.save(_model(), tmp_path / "ad")
        assert (live / io.MARKER).is_file()
    finally:
        os.close(fd)


@pytest.mark.parametrize("case", ["no marker", "foreign marker", "other target", "no dot", "symlink"])
def test_folders_not_made_by_a_save_into_this_target_are_kept(tmp_path, case):
    outside = tmp_path / "outside"
    name = {"other target": ".adx.tmp-1", "no dot": "ad.tmp-1"}.get(case, ".ad.tmp-1")
    folder = tmp_path / name
    if case == "symlink":
        _end(_marked_by_child(outside))  # an unlocked marker, but reached through a link
        folder.symlink_to(outside, target_is_directory=True)
    elif case in ("other target", "no dot"):
        _end(_marked_by_child(folder))
    else:
        folder.mkdir()
        if case == "foreign marker":
            (folder / io.MARKER).write_text("something else\n")
    (folder / "keep.txt").write_text("mine")
    ak.save(_model(), tmp_path / "ad")
    assert (folder / "keep.txt").read_text() == "mine"


def test_saved_folder_holds_no_marker(tmp_path):
    model = _model()
    ak.attach(model, ak.LoraConfig(r=2, target_modules=["v_proj"]), name="other")
    target = tmp_path / "ad"
    ak.save(model, target)
    ak.save(model, target)  # exchange path
    assert not [p for p in target.rglob("*") if p.name.startswith(io.MARKER)]
    assert _names(tmp_path) == ["ad"]


def test_stale_marker_inside_the_target_is_dropped(tmp_path):
    target = ak.save(_model(), tmp_path / "ad")
    (target / io.MARKER).write_text("adapterkit save in progress\npid 1\n")  # a kill right after the exchange
    ak.save(_model(), target)
    assert io.MARKER not in _names(target)


def test_without_flock_the_save_still_works_unmarked(tmp_path, monkeypatch):
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(io.fcntl, "flock", refuse)
    seen = []
    real = io._write_marker
    monkeypatch.setattr(io, "_write_marker", lambda folder: seen.append(real(folder)) or seen[-1])
    target = ak.save(_model(), tmp_path / "ad")
    assert seen == [None]
    assert _names(target) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _names(tmp_path) == ["ad"]
