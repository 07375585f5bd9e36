"""bench/host_cost.py --cpu: every row is timed, the stack rows included."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path


def test_host_cost_cpu_run(capsys):
    path = Path(__file__).resolve().parents[2] / "bench" / "host_cost.py"
    spec = importlib.util.spec_from_file_location("bench_host_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = dict(bench.main(["--cpu", "--calls", "5"]))
    for kind in ("base", "lora", "dora"):
        assert rows[f"no_grad, one layer: {kind}"] > 0
        assert rows[f"fwd+bwd, one layer: {kind}"] > 0
        assert math.isfinite(rows[f"fwd+bwd, per layer in a stack: {kind}"])
    assert math.isfinite(rows["fwd+bwd, per layer in a stack: dora, norm recomputed"])
    assert "stack of 8" in capsys.readouterr().out
