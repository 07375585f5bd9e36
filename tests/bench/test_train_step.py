"""bench/train_step.py on the CPU (its rows stepped in turn, as --interleave does on a GPU): every row is timed and
written out; a row that fails to build is reported and the others still run; --interleave refuses the profilers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


def load(monkeypatch):
    path = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_cpu_rows_are_stepped_in_turn_and_written(monkeypatch, tmp_path, capsys):
    bench = load(monkeypatch)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--cpu", "--small", "--steps", "2", "--warmup", "1",
                                      "--only", "all-linear r=16 p=0 | adapterkit"])
    bench.main()
    results = json.loads((tmp_path / "train_step_cpu.json").read_text())["results"]
    assert [r["label"] for r in results] == ["frozen base", "all-linear r=16 p=0 | adapterkit",
                                             "DoRA all-linear r=16 p=0 | adapterkit"]
    assert all(r["ms"] > 0 and len(r["ms_all"]) == 2 for r in results)
    assert "all-linear r=16 p=0 | adapterkit" in capsys.readouterr().out


def test_a_row_that_fails_to_build_is_reported_and_left_out(monkeypatch, capsys):
    bench = load(monkeypatch)
    real = bench.make_step

    def make_step(case, *args):
        if case.impl == "adapterkit" and case.dora:
            raise RuntimeError("out of memory")
        return real(case, *args)

    monkeypatch.setattr(bench, "make_step", make_step)
    cases = [bench.Case("base"), bench.Case("adapterkit"), bench.Case("adapterkit", dora=True)]
    results = bench.run_interleaved(cases, bench.SMALL, bench.torch.float32, "cpu", 1, 16, 1, 2)
    assert [r.case.label for r in results] == ["frozen base", "all-linear r=16 p=0 | adapterkit"]
    assert all(len(r.ms_all) == 2 for r in results)
    assert "!! DoRA all-linear r=16 p=0 | adapterkit: RuntimeError: out of memory" in capsys.readouterr().out


def test_interleave_refuses_the_profilers(monkeypatch):
    bench = load(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--interleave", "--profile"])
    with pytest.raises(SystemExit):
        bench.main()
