"""Multi-adapter serving benchmark: base vs PEFT vs adapterkit, one adapter and mixed batches, side by side.

GPU (default): a randomly initialised Llama-3.2-1B-shaped model in bf16, random LoRA r=16 on all linear layers.
- prefill: 32 rows x 256 tokens, 8 adapters mixed (row i -> adapter i % 8);
- decode: 64 rows x 1 token (one forward of the new token, use_cache=False), 32 adapters mixed;
rows: frozen base / PEFT one adapter / PEFT mixed (`adapter_names=`) / adapterkit one adapter / adapterkit mixed
(serving table; forwards inside one open routed() block, whose entry and exit is timed on its own; on CUDA also each
path forced: the Triton kernel, the plain-PyTorch gather path), plus a CUDA-graph-captured adapterkit mixed decode step
(and the base's, for its ratio) and hot-swap latency (put from disk, put from memory). The same adapter files are
loaded into both libraries, and the mixed outputs of the two are compared.
`--small`: tiny shapes in fp32 on CPU, seconds. `--profile`: also break one eager decode forward of the base, of one
adapter and of the mixed batch down by op (host time, calls, kernel launches). Results go to $OUT/serve.json when OUT
is set.

    python bench/serve.py            # GPU table
    python bench/serve.py --small    # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, also when imported by a test
from random_llama import random_llama  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.kernels import gathered_lora as gathered  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, tie_word_embeddings=True)


def build(shape, dtype, device, seed=0):
    return random_llama(shape, dtype, device, seed=seed, use_cache=None).eval()


def make_adapters(shape, dtype, device, n, r, root: Path) -> list[Path]:
    """n random LoRA adapters (non-zero B, small) saved in PEFT format; one attach/save per adapter."""
    model = build(shape, dtype, device)
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        ak.attach(model, ak.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False),
                  name=f"a{i}")
        with torch.no_grad():
            for p in ak.routing.require_state(model).wrappers.values():
                p.lora_B[f"a{i}"].weight.mul_(0.02)  # keep logits in a sane range
        path = root / f"a{i}"
        ak.save(model, path, names=[f"a{i}"])
        paths.append(path / f"a{i}" if (path / f"a{i}").is_dir() else path)
        ak.delete(model, f"a{i}")
    return paths


def with_adapters(shape, dtype, device, names, paths):
    """A fresh base with every adapter loaded from its PEFT directory."""
    model = build(shape, dtype, device)
    for name, path in zip(names, paths):
        ak.load(model, path, name=name)
    return model


class Timer:
    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self, fn, warmup, iters) -> float:
        """Median milliseconds of fn() over iters calls."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def interleaved(self, cases: dict, warmup: int, iters: int) -> dict:
        """Median milliseconds of each case, the cases called in turn, one call each per round."""
        times: dict = {label: [] for label in cases}
        for rnd in range(warmup + iters):
            for label, fn in cases.items():
                ms = self(fn, 0, 1)
                if rnd >= warmup:
                    times[label].append(ms)
        return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes, fp32, CPU: a smoke run in seconds")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="break eager decode forwards down by op")
    args = parser.parse_args()
    small = args.small or not torch.cuda.is_available()
    device = "cpu" if small else "cuda"
    dtype = torch.float32 if small else torch.bfloat16
    shape = TINY if small else LLAMA_1B
    prefill = (4, 16, 3) if small else (32, 256, 8)  # rows, tokens, adapters
    decode = (8, 1, 4) if small else (64, 1, 32)
    r = 16
    iters = args.iters or (3 if small else 20)
    warmup = 1 if small else 5
    timer = Timer(device)
    n_adapters = max(prefill[2], decode[2])
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
                     "shape": shape, "r": r, "prefill": list(prefill), "decode": list(decode), "ms": {}}

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(shape, dtype, device, n_adapters, r, Path(tmp))
        names = [f"a{i}" for i in range(n_adapters)]

        # adapterkit: one model with the adapters loaded (the one-adapter rows), and a second with a serving table
        # for the routed rows, so that a routed block can stay open while the other rows run between its calls.
        akm, akr = (with_adapters(shape, dtype, device, names, paths) for _ in range(2))
        table = ak.serving_table(akr, capacity=n_adapters, max_rank=r, names=names)

        import peft

        pm = peft.PeftModel.from_pretrained(build(shape, dtype, device), str(paths[0]), adapter_name=names[0])
        for name, path in zip(names[1:], paths[1:]):
            pm.load_adapter(str(path), adapter_name=name)
        pm.to(dtype).eval()  # bf16 adapters, as adapterkit's (PEFT would upcast them to fp32 by default)

        base = build(shape, dtype, device)
        gen = torch.Generator(device).manual_seed(1)
        for phase, (rows, tokens, k) in (("prefill", prefill), ("decode", decode)):
            ids = torch.randint(0, shape["vocab_size"], (rows, tokens), device=device, generator=gen)
            route = [names[i % k] for i in range(rows)]
            with torch.inference_mode():
                pm.set_adapter(names[0])
                ak.set_active(akm, names[0])

                def forward(model):
                    return lambda: model(input_ids=ids, use_cache=False)

                # The routed rows are forwards inside one routed() block, as a server runs its steps (a block's
                # entry and exit is timed on its own below). Round by round, every row once per round: a change in
                # the host's speed during the run (eager decode is bound by it) falls on every row alike.
                cases = {"base": forward(base), "peft one adapter": forward(pm),
                         "peft mixed": lambda: pm(input_ids=ids, use_cache=False, adapter_names=route),
                         "adapterkit one adapter": forward(akm), "adapterkit mixed": forward(akr)}
                with ak.routed(akr, route):
                    ms = timer.interleaved(cases, warmup, iters)
                    if phase == "decode" and args.profile:
                        results["decode_profile"] = profile_rows(
                            {label: cases[label] for label in ("base", "adapterkit one adapter", "adapterkit mixed")})
                    got = akr(input_ids=ids, use_cache=False).logits.float()
                # Each path forced (CUDA: the Triton kernel or the torch gather path), in a block of its own, timed
                # in rounds with the base again; the ratio printed is against the first rounds' base.
                for forced in ("torch", "triton") if device == "cuda" else ():
                    gathered._BACKEND = forced
                    try:
                        with ak.routed(akr, route):
                            own = timer.interleaved({"base": forward(base), "forced": forward(akr)}, warmup, iters)
                    finally:
                        gathered._BACKEND = "auto"
                    ms[f"adapterkit mixed ({forced} path forced)"] = own["forced"] * ms["base"] / own["base"]

                def enter_and_leave():
                    with ak.routed(akr, route):
                        pass

                ms["entering and leaving routed() (no forward)"] = timer(enter_and_leave, warmup, iters)
                want = pm(input_ids=ids, use_cache=False, adapter_names=route).logits.float()
                results[f"{phase}_max_rel_diff_vs_peft"] = float((got - want).abs().max() / want.abs().max())
                plain = base(input_ids=ids, use_cache=False).logits.float()
                results[f"{phase}_adapter_effect"] = float((got - plain).abs().max() / plain.abs().max())
                if phase == "decode" and device == "cuda":
                    ms.update(graph_rows(base, akm, akr, pm, table, ids, route, names, timer, warmup, iters))
            results["ms"][phase] = ms
        results["hot_swap_ms"] = swap_latency(table, paths, names, device)

    print_table(results)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "serve.json").write_text(json.dumps(results, indent=2))


def profile_rows(cases: dict, calls: int = 5) -> dict:
    """Per case: host microseconds per forward by op (self time, the top ones), op calls and kernel launches per
    forward. Eager decode is bound by the host issuing ops, so this says where each case's extra time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    out = {}
    for label, fn in cases.items():
        fn()
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        events = prof.key_averages()
        launches = sum(e.count for e in events if "LaunchKernel" in e.key or e.key.startswith("cuLaunch"))
        ops = [e for e in events if e.key.startswith("aten::") or "triton" in e.key.lower()]
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        out[label] = {
            "kernel launches per forward": launches / calls,
            "aten op calls per forward": sum(e.count for e in ops) / calls,
            "host us per forward, top ops by self time": {e.key: round(e.self_cpu_time_total / calls, 1) for e in top},
        }
    for label, row in out.items():
        print(f"-- eager decode forward, {label}: {row['kernel launches per forward']:.0f} kernel launches, "
              f"{row['aten op calls per forward']:.0f} aten op calls")
        for key, us in row["host us per forward, top ops by self time"].items():
            print(f"     {us:9.1f} us  {key[:70]}")
    return out


def graph_rows(base, akm, akr, pm, table, ids, route, names, timer, warmup, iters) -> dict:
    """CUDA-graph-captured decode steps: the base; one adapter in PEFT and in adapterkit; adapterkit mixed (the route
    changed between replays)."""
    out = {}
    pm.set_adapter(names[0])
    ak.set_active(akm, names[0])
    for label, model, rows in (("base (CUDA graph)", base, None), ("PEFT one adapter (CUDA graph)", pm, None),
                               ("adapterkit one adapter (CUDA graph)", akm, None),
                               ("adapterkit mixed (CUDA graph)", akr, route)):
        try:
            ctx = ak.routed(model, rows) if rows is not None else torch.inference_mode()
            with torch.inference_mode(), ctx:
                for _ in range(3):
                    model(input_ids=ids, use_cache=False)  # warm up kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    model(input_ids=ids, use_cache=False)
                out[label] = timer(graph.replay, warmup, iters)
                if rows is not None:  # a new route for the same graph: written into the captured index tensor
                    table.index_for(list(reversed(rows)), ids.device)
                    graph.replay()
                    torch.cuda.synchronize()
        except Exception as exc:  # report and continue: the other rows still mean something
            out[label] = f"capture failed: {type(exc).__name__}: {str(exc)[:120]}"
    return out


def swap_latency(table, paths, names, device) -> dict:
    """Replacing a slot's adapter: from a PEFT directory on disk, and from an attached adapter (copy only)."""
    def timed(fn):
        times = []
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return {"put from disk": timed(lambda: table.put(names[0], paths[1])),
            "put from attached adapter": timed(lambda: table.put(names[0]))}


def print_table(results: dict) -> None:
    print(f"device {results['device']}, {results['dtype']}, LoRA r={results['r']} on all linear layers")
    for phase in ("prefill", "decode"):
        rows, tokens, k = results[phase]
        ms = results["ms"][phase]
        base, peft_mixed = ms["base"], ms["peft mixed"]
        print(f"\n{phase}: {rows}x{tokens}, {k} adapters mixed "
              f"(adapterkit vs PEFT mixed outputs: max rel diff {results[f'{phase}_max_rel_diff_vs_peft']:.2e}; "
              f"adapters move the logits by {results[f'{phase}_adapter_effect']:.2e})")
        print(f"  {'case':40s} {'ms':>9s} {'x base':>8s} {'x PEFT mixed':>13s}")
        for label, value in ms.items():
            if isinstance(value, str):
                print(f"  {label:40s} {value}")
                continue
            if label.startswith("entering"):
                print(f"  {label:40s} {value:9.3f}")
                continue
            ref = ms.get("base (CUDA graph)") if "CUDA graph" in label else base
            ratio = value / ref if isinstance(ref, float) else float("nan")
            print(f"  {label:40s} {value:9.3f} {ratio:8.2f} {value / peft_mixed:13.2f}")
    print("\nhot swap (replace one adapter in its slot):")
    for label, value in results["hot_swap_ms"].items():
        print(f"  {label:40s} {value:9.3f} ms")


if __name__ == "__main__":
    main()
