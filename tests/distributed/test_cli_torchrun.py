"""`adapterkit train` under `torchrun --nproc_per_node 2` on CPU (gloo): DDP and FSDP2 write the adapter a single
process writes for the same global batches (1e-6), only rank 0 prints progress and writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli.conftest import build_model_dir, write_chat_data
from safetensors.torch import load_file

from adapterkit.cli.main import main

SRC = Path(__file__).resolve().parents[2] / "src"
WEIGHTS = "adapter_model.safetensors"
ARGS = ["--max-steps", "3", "--batch-size", "4", "--lora-r", "4", "--alpha", "8", "--lr", "1e-2", "--targets",
        "q_proj,v_proj", "--eval-fraction", "0.2", "--seed", "3"]
ENTRY = "import sys\nfrom adapterkit.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    model = build_model_dir(root / "model", layers=1)
    data = write_chat_data(root / "chat.jsonl")
    assert main(["train", "--model", str(model), "--data", str(data), "--out", str(root / "single"), *ARGS]) == 0
    (root / "entry.py").write_text(ENTRY)
    return root, model, data


def torchrun(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(root / "entry.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_training_matches_a_single_process(setup, mode):
    root, model, data = setup
    out = root / mode
    extra = ["--fsdp"] if mode == "fsdp" else []
    done = torchrun(root, "train", "--model", str(model), "--data", str(data), "--out", str(out), *ARGS, *extra)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("eval loss") == 1, "progress must come from rank 0 only:\n" + done.stdout
    log = json.loads((out / "training.json").read_text())
    assert log["processes"] == 2 and log["parallel"] == ("fsdp2" if mode == "fsdp" else "ddp")
    got, want = load_file(out / WEIGHTS), load_file(root / "single" / WEIGHTS)
    assert got.keys() == want.keys()
    moved = max(want[k].abs().max().item() for k in want if "lora_B" in k)
    assert moved > 1e-4, "training must have moved lora_B for the comparison to mean anything"
    for key in want:
        diff = (got[key] - want[key]).abs().max().item()
        assert diff <= 1e-6, f"{mode}: {key} differs from the single-process run by {diff:.3g}"
    single = json.loads((root / "single" / "training.json").read_text())
    for a, b in zip(log["steps"], single["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), "the logged loss is the global batch's"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [], "a second writer left temp files"


def test_fsdp_needs_torchrun(setup, capsys):
    root, model, data = setup
    code = main(["train", "--model", str(model), "--data", str(data), "--out", str(root / "x"), *ARGS, "--fsdp"])
    assert code != 0 and "torchrun" in capsys.readouterr().err
    assert not (root / "x").exists()


def test_batch_not_divisible_by_processes_is_refused(setup):
    root, model, data = setup
    args = [a if a != "4" else "3" for a in ARGS]  # --batch-size 3 over 2 processes
    done = torchrun(root, "train", "--model", str(model), "--data", str(data), "--out", str(root / "y"), *args)
    assert done.returncode != 0 and "must be divisible by the 2 torchrun processes" in done.stdout + done.stderr
    assert not (root / "y").exists()
