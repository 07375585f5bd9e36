"""`adapterkit inspect` on damaged adapters (the load fuzzer's adapters and mutations): each case prints a report or
one `error:` line naming the problem; never an unexpected exception.

Seeded (FUZZ_SEED, INSPECT_FUZZ_CASES override). Last run (seed 20261201, 800 cases, 7 s): 0 bad. The same cases
before inspect's per-module checks: 5 unexpected errors (LoRA pairs of different ranks, DoRA and LoHa tensors that
do not fit together).
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[1] / "checkpoint" / "test_fuzz.py"
SEED = int(os.environ.get("FUZZ_SEED", "20261201"))
CASES = int(os.environ.get("INSPECT_FUZZ_CASES", "800"))


def test_inspect_never_fails_unexpectedly(cli, tmp_path):
    spec = importlib.util.spec_from_file_location("load_fuzz", FUZZ)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    adapters = fuzz._adapters(tmp_path / "valid")
    bad, codes = [], {0: 0, 1: 0}
    for case in range(CASES):
        rng = random.Random(f"inspect-{SEED}-{case}")
        which, folder, files, kind = fuzz.damaged_copy(adapters, rng, tmp_path / "case")
        code, out, err = cli("inspect", files if rng.random() < 0.5 else folder)
        codes[code] = codes.get(code, 0) + 1
        if code not in (0, 1) or "error: unexpected" in err or "Traceback" in err:
            bad.append(f"case {case} ({which}, {kind}): exit {code}: {err.strip()[-300:]}")
        elif code == 1 and not err.startswith("error: "):
            bad.append(f"case {case} ({which}, {kind}): exit 1 without an error line: {err.strip()[-300:]}")
    assert not bad, f"{len(bad)} bad case(s) of {CASES}:\n" + "\n".join(bad[:20])
    assert codes[0] > 0 and codes[1] > 0  # some files still read, some refused
