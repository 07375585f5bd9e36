"""Per adapter method, adapterkit vs PEFT side by side: trainable parameters, adapter file size, and the
forward+backward time of a training step against the frozen base, in one process.

Methods come from the table below (lora, dora, loha, lokr, ia3, vera, oft); only those adapterkit implements
(`adapterkit.METHODS`) are run. Models: "smollm2" (the embedded SmolLM2-135M-Instruct, real weights) or
"llama1b-shape" (random init with Llama-3.2-1B's shape, for the GPU).

    PYTHONPATH=src python bench/methods.py --methods lora,loha,lokr                     # CPU, SmolLM2, 2x128
    PYTHONPATH=src python bench/methods.py --model llama1b-shape --device cuda --dtype bfloat16 --batch 8 --seq 1024
    PYTHONPATH=src python bench/methods.py --small                                      # tiny model: a smoke run

A step is forward + backward with `inputs_embeds` as a grad-requiring leaf, so even the frozen base runs the backward
through every layer (its floor); no optimizer step. Time: median of --steps after --warmup. On CPU all cases are built
first and stepped in turn, round after round, so load from other processes falls on every case alike; on CUDA one case
at a time (CUDA events, peak memory per case).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, also when imported by a test
from random_llama import random_llama  # noqa: E402

GIB = 1024**3
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=256, tie_word_embeddings=True)


@dataclass(frozen=True)
class MethodSpec:
    """One method: its peft_type in adapterkit's table, PEFT's config class name, and config kwargs for rank r.

    kwargs use PEFT's field names, which adapterkit's configs share; `targets` None: use --targets.
    """

    peft_type: str
    peft_class: str
    kwargs: callable
    targets: list[str] | None = None


METHOD_SPECS: dict[str, MethodSpec] = {
    "lora": MethodSpec("LORA", "LoraConfig", lambda r: {"r": r, "lora_alpha": 2 * r}),
    "dora": MethodSpec("LORA", "LoraConfig", lambda r: {"r": r, "lora_alpha": 2 * r, "use_dora": True}),
    "loha": MethodSpec("LOHA", "LoHaConfig", lambda r: {"r": r, "alpha": 2 * r}),
    "lokr": MethodSpec("LOKR", "LoKrConfig", lambda r: {"r": r, "alpha": 2 * r}),
    # PEFT's own defaults for Llama: IA3 scales k, v and the MLP input of down_proj.
    "ia3": MethodSpec("IA3", "IA3Config", lambda r: {"feedforward_modules": ["down_proj"]},
                      targets=["k_proj", "v_proj", "down_proj"]),
    "vera": MethodSpec("VERA", "VeraConfig", lambda r: {"r": 256}),
    "oft": MethodSpec("OFT", "OFTConfig", lambda r: {"r": 0, "oft_block_size": 32}),
}


@dataclass
class Row:
    method: str
    impl: str  # "base" | "peft" | "adapterkit"
    trainable: int = 0
    file_bytes: int = 0
    times: list[float] = field(default_factory=list)
    peak_gib: float = 0.0

    @property
    def ms(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def build_model(name: str, dtype: torch.dtype, device: str):
    if name == "smollm2":
        from adapterkit.base_models import load_model

        model = load_model("smollm2-135m-instruct", dtype=dtype)[0]
    else:
        model = random_llama(TINY if name == "tiny" else LLAMA_1B, dtype, device)
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def attach(model, method: str, impl: str, args) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """(module to call, trainable parameters); the base stays frozen in every case."""
    if impl == "base":
        return model, []
    spec = METHOD_SPECS[method]
    kwargs = {**spec.kwargs(args.r), "target_modules": spec.targets or args.targets}
    if impl == "peft":
        import peft

        cfg = getattr(peft, spec.peft_class)(**kwargs)
        model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=not args.peft_adapter_dtype_of_base)
    else:
        import adapterkit as ak

        ak.attach(model, ak.METHODS[spec.peft_type].config(**kwargs))
    return model, [p for p in model.parameters() if p.requires_grad]


def file_size(model, impl: str) -> int:
    if impl == "base":
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if impl == "peft":
            model.save_pretrained(tmp)
        else:
            import adapterkit as ak

            ak.save(model, tmp)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


def make_case(method: str, impl: str, args, vocab_ids):
    model = build_model(args.model, args.torch_dtype, args.device)
    model, params = attach(model, method, impl, args)
    row = Row(method, impl, sum(p.numel() for p in params), file_size(model, impl))
    model.train()
    for m in model.modules():  # the base model's own dropout off: every row runs the same arithmetic
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    embed = model.get_input_embeddings()
    ids = vocab_ids

    def step():
        emb = embed(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
        loss.backward()
        for p in params:
            p.grad = None

    return row, step, model


def cases(args) -> list[tuple[str, str]]:
    out = [("-", "base")]
    for method in args.methods:
        out += [(method, "peft"), (method, "adapterkit")]
    return out


def run(args) -> list[Row]:
    vocab = {"smollm2": 49152, "tiny": TINY["vocab_size"]}.get(args.model, LLAMA_1B["vocab_size"])
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(args.device)
    rows = []
    if args.device == "cuda":
        for method, impl in cases(args):
            row, step, model = make_case(method, impl, args, ids)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                step()
            for _ in range(args.steps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                step()
                b.record()
                b.synchronize()
                row.times.append(a.elapsed_time(b))
            row.peak_gib = torch.cuda.max_memory_allocated() / GIB
            rows.append(row)
            del step, model
            gc.collect()
            torch.cuda.empty_cache()
            print(f"  {row.method} {row.impl}: {row.ms:.1f} ms", file=sys.stderr)
        return rows
    built = [make_case(method, impl, args, ids) for method, impl in cases(args)]
    for rnd in range(args.warmup + args.steps):
        for row, step, _ in built:
            t0 = time.perf_counter()
            step()
            if rnd >= args.warmup:
                row.times.append((time.perf_counter() - t0) * 1e3)
    return [row for row, _, _ in built]


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def table(rows: list[Row], cuda: bool) -> str:
    base = next(r for r in rows if r.impl == "base")
    peft_rows = {r.method: r for r in rows if r.impl == "peft"}
    head = "| method | library | trainable params | adapter file | step ms | × frozen base | × PEFT |"
    sep = "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    if cuda:
        head += " peak GiB | + GiB over base |"
        sep += " ---: | ---: |"
    lines = [head, sep]
    for r in rows:
        theirs = peft_rows.get(r.method)
        vs_peft = f"{r.ms / theirs.ms:.3f}" if theirs is not None and r.impl != "base" else ""
        name = "frozen base" if r.impl == "base" else r.method
        cells = [name, "" if r.impl == "base" else r.impl, f"{r.trainable:,}" if r.impl != "base" else "",
                 human(r.file_bytes) if r.impl != "base" else "", f"{r.ms:.1f}", f"{r.ms / base.ms:.3f}", vs_peft]
        if cuda:
            cells += [f"{r.peak_gib:.2f}", f"{r.peak_gib - base.peak_gib:.2f}"]
        if r.impl == "adapterkit":
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "llama1b-shape", "tiny"])
    p.add_argument("--methods", default="lora,loha,lokr", help="comma-separated, from: " + ", ".join(METHOD_SPECS))
    p.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear")
    p.add_argument("--r", type=int, default=16, help="rank (alpha = 2r)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--peft-adapter-dtype-of-base", action="store_true",
                   help="PEFT with autocast_adapter_dtype=False (adapters in the base dtype, not PEFT's default fp32)")
    p.add_argument("--small", action="store_true", help="a tiny random Llama, 1 warm-up + 2 steps (smoke test)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here ($OUT/methods.json when OUT is set)")
    args = p.parse_args(argv)
    if args.small:
        args.model, args.warmup, args.steps, args.batch, args.seq = "tiny", 1, 2, 2, 16
    args.targets = args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    args.torch_dtype = getattr(torch, args.dtype)
    return args


def main(argv=None) -> str:
    import adapterkit as ak

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in METHOD_SPECS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; the table has {', '.join(METHOD_SPECS)}")
    args.methods = [m for m in wanted if METHOD_SPECS[m].peft_type in ak.METHODS]
    skipped = [m for m in wanted if m not in args.methods]
    if skipped:
        print(f"skipped (not in adapterkit.METHODS): {', '.join(skipped)}", file=sys.stderr)
    rows = run(args)
    text = table(rows, args.device == "cuda")
    print(f"model {args.model}, {args.dtype}, {args.device}, batch {args.batch}x{args.seq}, targets "
          f"{args.targets if isinstance(args.targets, str) else ','.join(args.targets)}, r={args.r} (alpha 2r), "
          f"median of {args.steps} after {args.warmup} warm-up, torch {torch.__version__}")
    print(text)
    out = args.json or (os.path.join(os.environ["OUT"], "methods.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as fh:
            json.dump([{**r.__dict__, "ms": r.ms} for r in rows], fh, indent=2)
    return text


if __name__ == "__main__":
    main()
