"""attach / load / merge+unload on CPU: adapterkit vs PEFT side by side, SmolLM2-135M shape, all-linear r=16.

The base is an untrained LlamaForCausalLM with SmolLM2-135M's exact config (the timings of these operations do not
depend on weight values). Each repetition gets a fresh deepcopy of the base, made outside the timed region.

Each operation is timed in two memory states, the same for both libraries:
- cold: free heap memory is handed back to the OS (glibc `malloc_trim`) before the timed region, so the new adapter
  tensors are first-touch pages, as in a fresh process. On a virtual machine a page fault costs several µs; 20 MB of
  LoRA factors is ~4,800 pages.
- warm: the process keeps freed memory (`M_TRIM_THRESHOLD` raised) and one untimed repetition runs first, so the new
  tensors reuse pages the process already has, as in a long-running session.
Without this, which side pays for growing the heap depends on which ran first.

    .venv/bin/python bench/cpu_ops.py [--reps 5] [--threads N] [--profile attach|load|merge]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import ctypes
import ctypes.util
import gc
import pstats
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import adapterkit as ak

GOALS_S = {"attach": 0.05, "load": 0.10, "merge+unload": 0.25}


def smollm2_shape() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, head_dim=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter


def keep_freed_memory() -> None:
    """From now on glibc keeps freed heap memory in the process instead of returning it (the warm state)."""
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def timed(base, prepare, op, reps: int, cold: bool) -> tuple[float, int]:
    """Median seconds of op(prepare(fresh copy)) over reps, and the median count of minor page faults inside it; the
    copy and prepare are not timed.

    As timeit does, the cyclic garbage collector is off inside the timed region (collected before it), so freeing
    the previous copy is not charged to whichever side happens to trigger a collection. cold: free memory is handed
    back to the OS before each timed region; warm: one untimed repetition first (see the module docstring).
    """
    times, faults = [], []
    for rep in range(reps + (0 if cold else 1)):
        obj = prepare(copy.deepcopy(base))
        gc.collect()
        if cold:
            _LIBC.malloc_trim(0)
        gc.disable()
        try:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            op(obj)
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        finally:
            gc.enable()
        del obj
    if not cold:
        times, faults = times[1:], faults[1:]
    return statistics.median(times), int(statistics.median(faults))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", choices=["attach", "load", "merge"], default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import peft

    base = smollm2_shape()
    r = 16
    peft_cfg = lambda: peft.LoraConfig(r=r, lora_alpha=32, target_modules="all-linear")  # noqa: E731
    ak_cfg = lambda: ak.LoraConfig(r=r, lora_alpha=32, target_modules="all-linear")  # noqa: E731
    tmp = Path(tempfile.mkdtemp())
    # The adapter file, saved once by PEFT and loaded by both.
    peft.get_peft_model(copy.deepcopy(base), peft_cfg()).save_pretrained(tmp / "adapter")

    ident = lambda m: m  # noqa: E731
    ours = {
        "attach": (ident, lambda m: ak.attach(m, ak_cfg())),
        "load": (ident, lambda m: ak.load(m, tmp / "adapter")),
        "merge+unload": (lambda m: (ak.load(m, tmp / "adapter"), m)[1], lambda m: ak.unload(m, merge=True)),
    }
    theirs = {
        "attach": (ident, lambda m: peft.get_peft_model(m, peft_cfg())),
        "load": (ident, lambda m: peft.PeftModel.from_pretrained(m, tmp / "adapter")),
        "merge+unload": (lambda m: peft.PeftModel.from_pretrained(m, tmp / "adapter"), lambda m: m.merge_and_unload()),
    }
    if args.profile:
        key = {"attach": "attach", "load": "load", "merge": "merge+unload"}[args.profile]
        prepare, op = ours[key]
        obj = prepare(copy.deepcopy(base))
        prof = cProfile.Profile()
        prof.runcall(op, obj)
        pstats.Stats(prof).sort_stats("cumtime").print_stats(30)
        return

    print(f"SmolLM2-135M shape (fp32, tied), LoRA all-linear r={r}; median of {args.reps}; "
          f"torch threads {torch.get_num_threads()}; peft {peft.__version__}")
    results = {}
    for state in ("cold", "warm"):  # cold first: keep_freed_memory() lasts for the rest of the process
        if state == "warm":
            keep_freed_memory()
        for key in ours:
            results[state, key] = (
                timed(base, *ours[key], args.reps, cold=state == "cold"),
                timed(base, *theirs[key], args.reps, cold=state == "cold"),
            )
    print(f"{'operation':<14}{'memory':<7}{'adapterkit ms':>14}{'PEFT ms':>10}{'ours/PEFT':>11}{'goal ms':>9}  met"
          f"{'page faults ours / PEFT':>26}")
    for key in ours:
        for state in ("cold", "warm"):
            (t_ours, f_ours), (t_peft, f_peft) = results[state, key]
            goal = GOALS_S[key]
            print(f"{key:<14}{state:<7}{t_ours * 1e3:>14.1f}{t_peft * 1e3:>10.1f}{t_ours / t_peft:>11.3f}"
                  f"{goal * 1e3:>9.0f}  {'yes' if t_ours <= goal else 'NO ':<3}{f'{f_ours} / {f_peft}':>26}")


if __name__ == "__main__":
    main()
