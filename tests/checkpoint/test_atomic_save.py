"""`save` is atomic: a process killed (SIGKILL) mid-save leaves the previous adapter complete and loadable, and
non-finite tensors are refused before anything is written."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.checkpoint.io import read_tensors
from helpers import assert_unchanged, build, snapshot

# A model whose adapter file is large (a 4096 x 8192 fp32 modules_to_save copy: 128 MiB), so a save takes long
# enough to be killed in the middle of writing it.
NET = """
import torch
from torch import nn
import adapterkit as ak

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Linear(4096, 8192, bias=False)
        self.small = nn.Linear(8, 8)

    def forward(self, x):
        return self.small(x)

def make(value):
    torch.manual_seed(0)
    net = ak.attach(Net(), ak.LoraConfig(r=2, target_modules=["small"], modules_to_save=["big"]))
    with torch.no_grad():
        net.big.modules_to_save["default"].weight.fill_(value)
    return net
"""

CHILD = NET + """
import sys
net = make(0.0)
copy = net.big.modules_to_save["default"].weight
for k in range(1, 1000):
    with torch.no_grad():
        copy.fill_(float(k))
    ak.save(net, sys.argv[1])
"""

WEIGHTS = "adapter_model.safetensors"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _temp_weights(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.tmp-*/{WEIGHTS}"))


def test_sigkill_mid_save_leaves_previous_adapter_intact(tmp_path):
    ns: dict = {}
    exec(NET, ns)
    target = tmp_path / "adapter"
    ak.save(ns["make"](-1.0), target)  # the previous adapter
    before = _digest(target)
    expected, _ = read_tensors(target / WEIGHTS)
    full = (target / WEIGHTS).stat().st_size
    assert full > 128 * 2**20

    # Kill the saving process as soon as its weights file exists in the temp folder: while it is written or fsynced,
    # before the directory exchange. (Measured: the 128 MiB file has usually reached full size in the page cache by
    # then; a torn file on disk is covered by test_truncated_file_is_a_clear_error.)
    killed_mid_save = False
    for _attempt in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(target)], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and child.poll() is None and not _temp_weights(target):
                time.sleep(0.0002)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait()
        assert child.returncode == -signal.SIGKILL
        # Mid-save when the temp weights file outlived the process: the exchange never happened.
        stray = _temp_weights(target)
        killed_mid_save = bool(stray)
        if _digest(target) != before:
            # A save of the child completed before the kill: it is complete, and becomes the "previous" one.
            before, (expected, _) = _digest(target), read_tensors(target / WEIGHTS)
        if killed_mid_save:
            break
    assert killed_mid_save, "could not catch the child in the middle of a save"
    assert stray[0].stat().st_size <= full

    assert _digest(target) == before
    torch.manual_seed(0)
    model = ns["Net"]()  # the same base as the saver's (same seed)
    report = ak.load(model, target)
    assert report.ok and report.base_check == "same base"
    loaded = {k: v for k, v in model.state_dict().items()}
    assert torch.equal(loaded["big.modules_to_save.default.weight"], expected["base_model.model.big.weight"])
    assert torch.equal(loaded["small.lora_B.default.weight"], expected["base_model.model.small.lora_B.weight"])

    # The next save works and removes the killed save's temp folder (its lock died with the process).
    ak.save(ns["make"](3.0), target)
    assert read_tensors(target / WEIGHTS)[0]["base_model.model.big.weight"].eq(3.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def _lora_llama():
    return ak.attach(build("llama"), ak.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused_nothing_written(tmp_path, bad):
    model = _lora_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[3, 1] = bad
    with pytest.raises(ak.AdapterSaveError) as err:
        ak.save(model, tmp_path / "new")
    message = str(err.value)
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in message
    assert "NaN/Inf" in message and "nothing was written" in message
    assert list(tmp_path.iterdir()) == []


def test_non_finite_leaves_previous_adapter_intact(tmp_path):
    good = _lora_llama()
    ak.save(good, tmp_path / "a")
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    before = _digest(tmp_path / "a")
    with torch.no_grad():
        good.model.layers[0].self_attn.q_proj.lora_A["default"].weight.fill_(float("nan"))
    with pytest.raises(ak.AdapterSaveError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight"):
        ak.save(good, tmp_path / "a")
    assert _digest(tmp_path / "a") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp folder left behind
    assert ak.load(build("llama"), tmp_path / "a").ok


def test_resave_replaces_atomically_and_keeps_other_files(tmp_path):
    model = _lora_llama()
    ak.save(model, tmp_path / "a")
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(1)
    ak.save(model, tmp_path / "a")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    loaded = build("llama")
    ak.load(loaded, tmp_path / "a")
    assert torch.equal(
        loaded.model.layers[0].self_attn.q_proj.lora_B["default"].weight,
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight,
    )


def test_saving_onto_a_file_refuses_and_keeps_the_file(tmp_path):
    """An adapter is a folder: a file already at the path (a typo, a config file) is never replaced by one."""
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(ak.AdapterSaveError, match=r"notes\.txt exists and is a file, not a directory; nothing was "
                                                  r"written"):
        ak.save(_lora_llama(), notes)
    assert notes.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no temp folder left behind
    with pytest.raises(ak.AdapterSaveError, match=r"cannot write .*: .*notes\.txt is a file, not a "
                                                  r"directory; nothing was written"):
        ak.save(_lora_llama(), notes / "adapter")
    assert notes.read_text() == "keep me"


def test_saving_through_a_link(tmp_path):
    """A link to a folder (`latest` -> `run-1`): the save goes into the folder and the link stays a link. A link to
    a file or to nothing is refused and left as it is."""
    (tmp_path / "run-1").mkdir()
    (tmp_path / "run-1" / "tokenizer.json").write_text("{}")
    latest = tmp_path / "latest"
    latest.symlink_to("run-1")
    ak.save(_lora_llama(), latest)
    assert latest.is_symlink() and os.readlink(latest) == "run-1"
    assert (tmp_path / "run-1" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run-1" / "tokenizer.json").read_text() == "{}"
    assert ak.load(build("llama"), latest).ok
    (tmp_path / "file").write_text("keep me")
    for name, points_to in (("to-file", "file"), ("dangling", "nowhere")):
        link = tmp_path / name
        link.symlink_to(points_to)
        with pytest.raises(ak.AdapterSaveError, match=rf"{name} exists and is a symbolic link, not a directory"):
            ak.save(_lora_llama(), link)
        assert link.is_symlink() and os.readlink(link) == points_to
    assert (tmp_path / "file").read_text() == "keep me"


def test_truncated_file_is_a_clear_error(tmp_path):
    ak.save(_lora_llama(), tmp_path)
    weights = tmp_path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # what a non-atomic writer leaves
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ak.AdapterLoadError, match="not a readable safetensors file .* truncated or corrupt"):
        ak.load(model, tmp_path)
    assert_unchanged(model, before)
