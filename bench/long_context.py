"""Long-context training memory: the longest sequence that trains, and peak memory and tokens/s at a fixed length, for
adapterkit's memory options (chunked loss, layer checkpointing, offload) and PEFT's recipe, side by side in one run.

GPU (default): a Llama-3.1-8B-shaped model (random weights, bf16; --layers shrinks its depth), LoRA all-linear r=16,
batch 1; bf16 and NF4 bases (NF4 needs bitsandbytes; skipped with a message without it). Each configuration runs in
its own subprocess, so one configuration's memory never leaks into the next. The longest length is searched by
doubling from --seq, then bisecting to --resolution tokens, up to --max-seq.
`--small`: a tiny model on CPU in a few seconds (in-process; peak = bytes kept for backward, and an OOM is simulated
past --cpu-budget-mib), so the script itself is tested.

    python bench/long_context.py --layers 8          # GPU, about 6 minutes
    python bench/long_context.py --small             # CPU smoke run (seconds)
    python bench/long_context.py --saved-bytes       # CPU: what LoRA keeps for backward, inputs saved vs rebuilt
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, also when imported by a test
from random_llama import random_llama  # noqa: E402

GIB = 1024**3
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=False)
# (name, base, library, options): options are c = chunked loss, k = checkpoint layers, o = offload.
CONFIGS = [
    ("ak", "bf16", "adapterkit", ""),
    ("ak+chunk", "bf16", "adapterkit", "c"),
    ("ak+ckpt", "bf16", "adapterkit", "k"),
    ("ak+chunk+ckpt", "bf16", "adapterkit", "ck"),
    ("ak+chunk+ckpt+offload", "bf16", "adapterkit", "cko"),
    ("peft+gc", "bf16", "peft", "k"),
    ("ak+chunk+ckpt nf4", "nf4", "adapterkit", "ck"),
    ("ak+chunk+ckpt+offload nf4", "nf4", "adapterkit", "cko"),
    ("peft kbit+gc nf4", "nf4", "peft", "k"),
]


class SimulatedOOM(RuntimeError):
    """CPU stand-in for torch.cuda.OutOfMemoryError (--small)."""


def _oom_types():
    return (torch.cuda.OutOfMemoryError, SimulatedOOM)


def build(shape: dict, base: str, device: str):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_llama(shape, dtype, device, max_positions=1 << 20)
    if base == "nf4":
        _quantize_nf4(model, device, dtype)
    return model


def _quantize_nf4(model, device: str, dtype) -> None:
    """Every decoder linear as a bitsandbytes NF4 Linear4bit (the head and embedding stay in `dtype`)."""
    import bitsandbytes as bnb  # optional: the caller reports a skip when it is missing
    from torch import nn

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
                setattr(parent, name, q.to(device))
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"


def attach(model, library: str, options: str, base: str, offload_layers: int | None = None):
    """LoRA all-linear r=16 (head excluded) in the base's compute dtype; the library's memory options applied."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if library == "peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        kwargs = {"use_reentrant": False}
        if base == "nf4":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing="k" in options,
                                                    gradient_checkpointing_kwargs=kwargs)
        elif "k" in options:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        dtype = model.get_input_embeddings().weight.dtype
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)  # bf16 adapters: PEFT's fast setting, as adapterkit's default
        return model
    import adapterkit as ak

    ak.attach(model, ak.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    if "k" in options or "o" in options:
        offload = ("o" in options) if offload_layers is None or "o" not in options else offload_layers
        ak.checkpoint_layers(model, offload=offload, recompute="k" in options)
    return model


def make_step(model, library: str, options: str, device: str, budget: int | None):
    import adapterkit as ak
    from adapterkit.memory import SavedTensorMeter

    vocab = model.config.vocab_size

    def step(seq: int) -> float:
        """One forward+backward at batch 1 x seq; returns the peak bytes (device, or kept for backward on CPU)."""
        ids = torch.randint(0, vocab, (1, seq), device=device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        meter = SavedTensorMeter(exclude=list(model.parameters()))
        with meter:
            if "c" in options and library == "adapterkit":
                loss = ak.causal_lm_loss(model, ids, chunk_size=4096)
            else:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if budget is not None and meter.bytes > budget:
            raise SimulatedOOM(f"{meter.bytes} bytes kept > budget {budget}")
        loss.backward()
        for p in model.parameters():
            p.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return meter.bytes

    return step


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(name: str, base: str, library: str, options: str, args) -> dict:
    """The row of one configuration: peak and tokens/s at args.seq, then the longest length that trains."""
    device = "cpu" if args.small else "cuda"
    budget = args.cpu_budget_mib * 2**20 if args.small else None
    row = {"config": name, "base": base, "library": library, "options": options}
    if "o" in options and args.offload_layers is not None:
        row["offload_layers"] = args.offload_layers
    try:
        model = attach(build(TINY if args.small else {**LLAMA_8B, "num_hidden_layers": args.layers}, base, device),
                       library, options, base, args.offload_layers)
    except ImportError as exc:
        return {**row, "skipped": f"{exc.name or exc} is not installed"}
    except Exception as exc:  # noqa: BLE001 - a base this library cannot adapt is a result, not a crash
        return {**row, "skipped": f"{library} cannot train on this base: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:140]}"}
    step = make_step(model, library, options, device, budget)
    if "c" in options and library == "adapterkit":
        from adapterkit import losses

        row["loss"] = "liger" if device == "cuda" and losses._liger_fn() is not None else "chunked"
    deadline = time.perf_counter() + args.config_seconds

    def fits(seq: int) -> bool:
        try:
            step(seq)
            return True
        except _oom_types():
            _free(device)
            return False

    try:
        t0 = time.perf_counter()
        peak = step(args.seq)  # warm-up (kernels, allocator)
        if args.steps:
            t0 = time.perf_counter()
            peak = max(step(args.seq) for _ in range(args.steps))
        # --steps 0 (one step at a long length, where a step takes minutes): the one step's own time.
        row.update(peak_gib=peak / GIB, tok_s=args.seq * max(1, args.steps) / (time.perf_counter() - t0))
    except _oom_types():
        _free(device)
        row.update(peak_gib=None, tok_s=None)
    # Longest: doubling from the fixed length, then bisection to the resolution; bounded by the cap and the clock.
    lo, hi = (args.seq, None) if row["peak_gib"] is not None else (0, args.seq)
    while lo == 0 and hi > args.resolution and time.perf_counter() < deadline:  # the fixed length did not fit
        half = hi // 2 // args.resolution * args.resolution
        if half == 0:
            break
        lo, hi = (half, hi) if fits(half) else (0, half)
    while hi is None and lo < args.max_seq and time.perf_counter() < deadline:
        nxt = min(lo * 2, args.max_seq)
        lo, hi = (nxt, None) if fits(nxt) else (lo, nxt)
    while hi is not None and hi - lo > args.resolution and time.perf_counter() < deadline:
        mid = (lo + hi) // 2 // args.resolution * args.resolution or args.resolution
        if mid <= lo or mid >= hi:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    row.update(longest=lo, bound="cap" if hi is None and lo >= args.max_seq else
               ("time" if time.perf_counter() >= deadline else "oom"))
    del model, step
    _free(device)
    return row


def run_subprocess(config, args) -> dict:
    name = config[0]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, *args.forward]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.config_seconds + 120)
    except subprocess.TimeoutExpired:
        return {"config": name, "skipped": "subprocess timed out"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = " ".join((done.stderr or done.stdout).split())[-200:]
    return {"config": name, "skipped": f"subprocess failed (rc {done.returncode}): {tail}"}


def table(rows: list[dict], args) -> str:
    unit, scale = ("MiB kept", 1024) if args.small else ("GiB", 1)
    lines = [f"{'config':<24} {'base':<5} {f'peak {unit} @{args.seq}':>20} {'tok/s':>9} {'longest':>9}  bound"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['config']:<24} {r.get('base', ''):<5} skipped: {r['skipped']}")
            continue
        peak = "OOM" if r["peak_gib"] is None else f"{r['peak_gib'] * scale:.2f}"
        tok = "-" if r["tok_s"] is None else f"{r['tok_s']:.0f}"
        lines.append(f"{r['config']:<24} {r['base']:<5} {peak:>20} {tok:>9} {r['longest']:>9}  {r['bound']}"
                     + (f"  loss: {r['loss']}" if "loss" in r else ""))
    return "\n".join(lines)


def saved_bytes(dtype=torch.bfloat16) -> list[tuple[str, int]]:
    """Bytes kept for backward (distinct storages, parameters excluded) by a small Llama-3.2-1B-proportioned model
    (hidden 512, MLP 4x, 4 layers, batch 2x256): frozen base, LoRA all-linear r=16 saving its inputs, and LoRA
    rebuilding them in backward (kernels/recompute.py). CPU; the input embeddings require grad, as in train_step.py."""
    import adapterkit as ak
    from adapterkit.kernels import set_input_recompute
    from adapterkit.memory import SavedTensorMeter

    shape = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True)
    ids = torch.randint(0, shape["vocab_size"], (2, 256), generator=torch.Generator().manual_seed(0))
    out = []
    for label, lora, recompute in (("frozen base", False, True), ("LoRA, inputs saved", True, False),
                                   ("LoRA, inputs rebuilt", True, True)):
        model = build(shape, "bf16", "cpu").to(dtype).train()
        if lora:
            ak.attach(model, ak.LoraConfig(r=16, target_modules="all-linear"))
            for p in ak.trainable_parameters(model):
                p.data = p.data.to(dtype)
        set_input_recompute(recompute)
        try:
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            with SavedTensorMeter(exclude=list(model.parameters())) as meter:
                model.model(inputs_embeds=emb)
        finally:
            set_input_recompute(True)
        out.append((label, meter.bytes))
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny model on CPU (a smoke run)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B shape (32 = the real depth)")
    p.add_argument("--seq", type=int, default=None, help="fixed length for peak and tokens/s (default 16384)")
    p.add_argument("--max-seq", type=int, default=None, help="search cap (default 131072)")
    p.add_argument("--resolution", type=int, default=None, help="bisection stops within this many tokens")
    p.add_argument("--steps", type=int, default=2,
                   help="timed steps at --seq after one warm-up step (0: the warm-up step alone, timed)")
    p.add_argument("--config-seconds", type=float, default=None, help="search time per configuration")
    p.add_argument("--total-seconds", type=float, default=450.0, help="start no configuration after this")
    p.add_argument("--only", nargs="*", default=None, help="configs to run (names as in the table)")
    p.add_argument("--offload-layers", type=int, default=None,
                   help="offload configs: offload only the first N decoder layers (host memory too small for all)")
    p.add_argument("--cpu-budget-mib", type=float, default=0.5, help="--small: simulated memory for activations")
    p.add_argument("--subprocess", action="store_true", help="--small: one subprocess per config as on the GPU")
    p.add_argument("--saved-bytes", action="store_true", help="CPU: bytes LoRA keeps for backward, and what the "
                   "input rebuild saves (no search)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = (64, 256, 32, 5.0) if args.small else (16384, 131072, 8192, 35.0)
    args.seq = args.seq or defaults[0]
    args.max_seq = args.max_seq or defaults[1]
    args.resolution = args.resolution or defaults[2]
    args.config_seconds = args.config_seconds or defaults[3]
    args.forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--subprocess"]
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    configs = [c for c in CONFIGS if args.only is None or c[0] in args.only]
    if args.saved_bytes:
        rows = saved_bytes()
        base = rows[0][1]
        tokens, layers = 2 * 256, 4
        for label, n in rows:
            print(f"{label:<22} {n / 2**20:8.2f} MiB kept  (+{(n - base) / 2**20:6.2f} MiB over the frozen base, "
                  f"{(n - base) / tokens / layers:7.0f} B per token and layer)")
        return [{"label": label, "bytes": n} for label, n in rows]
    if args.worker is not None:
        config = next(c for c in CONFIGS if c[0] == args.worker)
        print(json.dumps(measure(*config, args)), flush=True)
        return []
    if not args.small and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --small for the CPU smoke run")
    shape = "tiny Llama (CPU, fp32)" if args.small else f"Llama-3.1-8B shape with {args.layers} of 32 layers (bf16)"
    print(f"{shape}, LoRA all-linear r=16, batch 1; peak and tokens/s at {args.seq}; longest searched up to "
          f"{args.max_seq} in steps of {args.resolution}", flush=True)
    if args.small:
        torch.set_num_threads(1)
    rows = []
    start = time.perf_counter()
    for config in configs:
        t0 = time.perf_counter()
        if t0 - start > args.total_seconds:
            spent = f"--total-seconds {args.total_seconds:g} spent"
            rows.append({"config": config[0], "base": config[1], "skipped": spent})
            continue
        rows.append(run_subprocess(config, args) if (not args.small or args.subprocess) else measure(*config, args))
        print(f"  {config[0]}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(table(rows, args))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "long_context.json"), "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "forward"}, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
