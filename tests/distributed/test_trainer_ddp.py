"""transformers Trainer under `torchrun --nproc_per_node 2` (DDP, gloo, CPU) on an adapterkit model: rank 0 alone
writes adapter checkpoints, and resuming from one continues the uninterrupted run exactly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def torchrun(*args: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(HERE / "trainer_worker.py"), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]


def test_ddp_trainer_checkpoints_and_resume(tmp_path):
    tiny_llama(layers=1).save_pretrained(tmp_path / "base")
    torchrun(str(tmp_path / "base"), str(tmp_path / "run"), "full")
    ckpt = tmp_path / "run" / "checkpoint-3"
    names = sorted(p.name for p in ckpt.iterdir())
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    assert "model.safetensors" not in names and "config.json" not in names
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")], "a second writer left temps"

    torchrun(str(tmp_path / "base"), str(tmp_path / "run2"), "resumed", str(ckpt))
    full = torch.load(tmp_path / "run" / "result-full.pt")
    resumed = torch.load(tmp_path / "run2" / "result-resumed.pt")
    assert sorted(resumed["losses"]) == list(range(1, 7))
    for step in range(4, 7):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], abs=1e-6), f"step {step}"
    for name, value in full["weights"].items():
        assert torch.allclose(resumed["weights"][name], value, atol=1e-6, rtol=0), name
