"""Training-step benchmark: frozen base vs PEFT LoRA vs adapterkit LoRA, side by side in one process.

GPU (default): a randomly initialised Llama-3.2-1B-shaped model in bf16, batch 8x1024, sdpa attention, plus QLoRA
rows on the same model quantized to NF4 with bitsandbytes (double quantization, bf16 compute): the frozen NF4 base,
PEFT QLoRA with fp32 and with bf16 adapters, PEFT's documented recipe (prepare_model_for_kbit_training, which
upcasts every non-quantized weight to fp32 and turns on gradient checkpointing, then fp32 adapters), adapterkit
QLoRA, and adapterkit after its prepare_for_kbit_training (norms in fp32 only). QLoRA rows' "x base" is against the
frozen NF4 base. `--cpu`: SmolLM2-135M shapes in fp32, batch 2x128 (`--qlora` adds the NF4 rows). `--small`: a
2-layer model of hidden 256, to smoke-test the script. `--micro`: one adapted linear at the 1B model's shapes, kernel
variants timed against the bare base GEMM (GPU only). Results go to $OUT as JSON when OUT is set.

    python bench/train_step.py            # GPU table (LoRA and QLoRA rows)
    python bench/train_step.py --only nf4 # GPU, QLoRA rows only
    python bench/train_step.py --interleave --only nf4   # GPU, the rows stepped in turn (host drift on all alike)
    python bench/train_step.py --cpu      # CPU table
    python bench/train_step.py --cpu --qlora --small --steps 2 --warmup 1   # smoke test of every row, CPU
    python bench/train_step.py --micro    # per-linear kernel variants (GPU)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, also when imported by a test
from random_llama import random_llama  # noqa: E402

GIB = 1024**3
PROFILE = False  # --profile: print the top CUDA ops of two steps per row
HOST_PROFILE = False  # --host-profile: print where the host's Python time goes in three steps per row
# --optimizer: AdamW "fused" (GPU default: one kernel for all tensors, what transformers' Trainer uses with torch >= 2.8
# and adapterkit's own training loop on CUDA) or torch's default ("foreach" on CUDA). Every row takes the same one.
OPTIMIZER = "fused"

# Model shapes. Llama-3.2-1B: tied embeddings, GQA 32/8; SmolLM2-135M: tied, GQA 9/3.
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
SMALL = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, vocab_size=1024, tie_word_embeddings=True)
QLORA_IMPLS = ["peft", "peft-bf16", "peft-kbit", "adapterkit", "adapterkit-kbit"]
ALL_LINEAR = "all-linear"
QV = ["q_proj", "v_proj"]


@dataclass
class Case:
    """One row of the table: which library, which adapter settings."""

    # "base" | "peft" | "peft-bf16" | "peft-kbit" | "adapterkit" | "adapterkit-torch" | "adapterkit-triton" |
    # "adapterkit-kbit" (-kbit: the library's prepare-for-k-bit-training helper first)
    impl: str
    targets: object = ALL_LINEAR
    r: int = 16
    dropout: float = 0.0
    quant: str = ""  # "" (float base) | "nf4" (bitsandbytes 4-bit base)
    dora: bool = False  # DoRA (use_dora=True) instead of plain LoRA

    @property
    def group(self) -> str:
        if self.impl == "base":
            return f"frozen {self.quant} base" if self.quant else "frozen base"
        t = "all-linear" if self.targets == ALL_LINEAR else ",".join(t.replace("_proj", "") for t in self.targets)
        dora = "DoRA " if self.dora else ""
        return f"{self.quant + ' ' if self.quant else ''}{dora}{t} r={self.r} p={self.dropout:g}"

    @property
    def label(self) -> str:
        return self.group if self.impl == "base" else f"{self.group} | {self.impl}"


@dataclass
class Result:
    case: Case
    ms: float
    ms_all: list = field(default_factory=list)
    peak_gib: float = 0.0
    trainable: int = 0
    host_ms: float = float("nan")  # GPU: the host's time to issue a step (close to ms: the row is bound by the host)


def build_model(shape: dict, dtype: torch.dtype, device: str):
    return random_llama(shape, dtype, device)


def attach(model, case: Case):
    """Return (module to call, trainable params) for the case; the base stays frozen in every case."""
    if case.impl == "base":
        return model, []
    if case.impl.startswith("peft"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if case.impl == "peft-kbit":
            model = prepare_model_for_kbit_training(model)  # PEFT's defaults: fp32 upcast + gradient checkpointing
        cfg = LoraConfig(r=case.r, lora_alpha=2 * case.r, target_modules=case.targets, lora_dropout=case.dropout,
                         use_dora=case.dora)
        model = get_peft_model(model, cfg, autocast_adapter_dtype=(case.impl != "peft-bf16"))
    else:
        import adapterkit as ak
        from adapterkit.kernels import set_backend

        backend = case.impl.split("-")[1] if "-" in case.impl else "auto"
        set_backend(backend if backend in ("torch", "triton") else "auto")
        if case.impl == "adapterkit-kbit":
            ak.prepare_for_kbit_training(model)
        ak.attach(model, ak.LoraConfig(r=case.r, lora_alpha=2 * case.r, target_modules=case.targets,
                                       lora_dropout=case.dropout, use_dora=case.dora), name="default")
    return model, [p for p in model.parameters() if p.requires_grad]


def make_step(case: Case, shape, dtype, device, batch, seq):
    """A fresh model for the case and a closure running one training step on it; returns (step, n_trainable)."""
    model = build_model(shape, dtype, device)
    if case.quant:
        import adapterkit as ak

        # Every linear layer but the head, as transformers' BitsAndBytesConfig(load_in_4bit=True,
        # bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype) does.
        ak.quantize_model(model, case.quant, compute_dtype=dtype)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    model, params = attach(model, case)
    model.train()
    embed = model.get_input_embeddings()
    fused = {"fused": True} if OPTIMIZER == "fused" and device == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=1e-4, **fused) if params else None

    def step():
        # inputs_embeds as a grad-requiring leaf: the backward runs through every layer in every case, so the
        # frozen base is the true floor (input gradients, no weight gradients).
        emb = embed(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def run_case(case: Case, shape, dtype, device, batch, seq, warmup, steps) -> Result:
    """GPU: one case at a time, CUDA-event timing, peak memory of this case alone."""
    step, n_trainable = make_step(case, shape, dtype, device, batch, seq)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    times, host = [], []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)  # the GPU starts each step idle: what the host took to issue it
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    peak = torch.cuda.max_memory_allocated() / GIB
    if PROFILE:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        print(f"-- profile of 2 steps: {case.label}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    if HOST_PROFILE:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        torch.cuda.synchronize()
        prof.enable()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        prof.disable()
        print(f"-- host (Python) time of 3 steps by function: {case.label}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    del step
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return Result(case, statistics.median(times), times, peak, n_trainable, statistics.median(host))


def _backend_of(case: Case) -> str:
    part = case.impl.split("-")[1] if case.impl.startswith("adapterkit-") else ""
    return part if part in ("torch", "triton") else "auto"


def run_interleaved(cases: list[Case], shape, dtype, device, batch, seq, warmup, steps) -> list[Result]:
    """All cases built up front and stepped in turn, one step each per round, so that a host or machine whose speed
    drifts (other processes on a shared CPU; a GPU machine's host, bench/README.md) weighs on every case alike. The
    CPU table always runs so; the GPU one with --interleave.

    GPU: each step is timed from an idle GPU with CUDA events (and the host's issue time beside it); a case's peak
    is what it keeps resident (model, optimizer state, measured after its warm-up) plus the most its steps allocate
    on top, which is the peak it has alone."""
    from adapterkit.kernels import set_backend

    cuda = device == "cuda"
    built, kept = [], []
    for case in cases:
        before = torch.cuda.memory_allocated() if cuda else 0
        try:
            step, n_trainable = make_step(case, shape, dtype, device, batch, seq)
            set_backend(_backend_of(case))
            for _ in range(warmup):
                step()
        except Exception as e:  # keep the other rows when one library fails
            print(f"!! {case.label}: {type(e).__name__}: {e}", flush=True)
            set_backend("auto")
            continue
        if cuda:
            torch.cuda.synchronize()
        built.append((step, n_trainable, (torch.cuda.memory_allocated() - before) if cuda else 0))
        kept.append(case)
    set_backend("auto")
    cases = kept
    times: list[list[float]] = [[] for _ in cases]
    host: list[list[float]] = [[] for _ in cases]
    extra = [0] * len(cases)
    for _ in range(steps):
        for k, (step, _, _) in enumerate(built):
            set_backend(_backend_of(cases[k]))
            if cuda:
                torch.cuda.synchronize()
                allocated = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            step()
            host[k].append((time.perf_counter() - t0) * 1e3)
            if cuda:
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end))
                extra[k] = max(extra[k], torch.cuda.max_memory_allocated() - allocated)
            else:
                times[k].append(host[k][-1])
    set_backend("auto")
    return [Result(c, statistics.median(t), t, (resident + e) / GIB, n, statistics.median(h) if cuda else float("nan"))
            for c, t, h, e, (_, n, resident) in zip(cases, times, host, extra, built)]


def print_table(results: list[Result], cuda: bool):
    bases = {r.case.quant: r for r in results if r.case.impl == "base"}  # QLoRA rows: against the frozen NF4 base
    peft_default = {r.case.group: r for r in results if r.case.impl == "peft"}
    hdr = f"{'config':<50} {'ms':>8} {'x base':>7} {'x PEFT':>7}"
    if cuda:
        hdr += f" {'peak GiB':>9} {'+GiB':>6} {'host ms':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        pd = peft_default.get(r.case.group)
        base = bases.get(r.case.quant, bases.get(""))
        line = f"{r.case.label:<50} {r.ms:8.1f} {r.ms / base.ms:7.3f} {r.ms / pd.ms if pd else float('nan'):7.3f}"
        if cuda:
            line += f" {r.peak_gib:9.2f} {r.peak_gib - base.peak_gib:6.2f} {r.host_ms:8.1f}"
        print(line)


def environment(device: str) -> dict:
    import transformers

    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), python=platform.python_version(),
               torch=torch.__version__, transformers=transformers.__version__, command=" ".join(sys.argv))
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def write_json(name: str, payload: dict):
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            json.dump(payload, f, indent=1, default=str)


def gpu_cases(args) -> list[Case]:
    cases = [Case("base")]
    impls = ["peft", "peft-bf16", "adapterkit"]
    groups = [(ALL_LINEAR, 16, 0.0), (ALL_LINEAR, 16, 0.1), (QV, 16, 0.0), (ALL_LINEAR, 64, 0.0)]
    for targets, r, p in groups:
        for impl in impls:
            cases.append(Case(impl, targets, r, p))
        if targets == ALL_LINEAR and r == 16:
            cases += [Case(f"adapterkit-{be}", targets, r, p) for be in args.backends]
    for p in (0.0, 0.1):
        cases += [Case(impl, ALL_LINEAR, 16, p, dora=True) for impl in impls]
    cases += qlora_cases()
    if args.only:
        cases = [c for c in cases if c.impl == "base" or any(s in c.label for s in args.only)]
    return cases


def qlora_cases() -> list[Case]:
    return [Case("base", quant="nf4")] + [Case(impl, ALL_LINEAR, 16, 0.0, quant="nf4") for impl in QLORA_IMPLS]


def main_train(args):
    cuda = not args.cpu
    device = "cuda" if cuda else "cpu"
    if cuda:
        shape, dtype, batch, seq = LLAMA_1B, torch.bfloat16, args.batch or 8, args.seq or 1024
        cases = gpu_cases(args)
        warmup, steps = args.warmup or 3, args.steps or 10
    else:
        shape, dtype, batch, seq = SMOLLM2_135M, torch.float32, args.batch or 2, args.seq or 128
        cases = [Case("base")]
        for p in (0.0, 0.1):
            cases += [Case("peft", ALL_LINEAR, 16, p), Case("adapterkit", ALL_LINEAR, 16, p)]
        cases += [Case("peft", ALL_LINEAR, 16, 0.0, dora=True), Case("adapterkit", ALL_LINEAR, 16, 0.0, dora=True)]
        if args.qlora:
            cases += qlora_cases()
        warmup, steps = args.warmup or 2, args.steps or 7
    if args.small:
        shape = SMALL
    if args.only and not cuda:
        cases = [c for c in cases if c.impl == "base" or any(s in c.label for s in args.only)]
    env = environment(device)
    print(f"# {env['device']}  torch {env['torch']}  transformers {env['transformers']}  peft {env.get('peft')}  "
          f"batch {batch}x{seq} {str(dtype).replace('torch.', '')}  median of {steps} steps after {warmup} warm-up"
          f"{'  AdamW ' + OPTIMIZER if cuda else ''}",
          flush=True)
    if not cuda or args.interleave:
        results = run_interleaved(cases, shape, dtype, device, batch, seq, warmup, steps)
    else:
        results = []
        for case in cases:
            try:
                res = run_case(case, shape, dtype, device, batch, seq, warmup, steps)
            except Exception as e:  # keep the other rows when one library fails
                print(f"!! {case.label}: {type(e).__name__}: {e}", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            results.append(res)
            print(f"  {case.label:<44} {res.ms:8.1f} ms  peak {res.peak_gib:6.2f} GiB", flush=True)
    print()
    print_table(results, cuda)
    write_json(f"train_step_{device}.json",
               dict(env=env, batch=batch, seq=seq, results=[dict(asdict(r.case), label=r.case.label, ms=r.ms,
                                                               ms_all=r.ms_all, peak_gib=r.peak_gib,
                                                               trainable=r.trainable) for r in results]))


# --------------------------------------------------------------------------------------------------- micro (GPU)
def main_micro(args):
    """One adapted linear at the 1B model's shapes: forward + backward, each variant against the bare base GEMM."""
    import triton.testing as tt
    import torch.nn.functional as F

    from adapterkit.kernels import lora_linear, set_backend
    ll_mod = importlib.import_module("adapterkit.kernels.lora_linear")  # the module, not the function
    from adapterkit.kernels.reference import lora_linear_reference

    dev, dt, T, r, s = "cuda", torch.bfloat16, 8192, args.rank, 2.0
    shapes = {"q": (2048, 2048), "k": (2048, 512), "o": (2048, 2048), "gate": (2048, 8192), "down": (8192, 2048)}
    if not torch.cuda.is_available():  # smoke test of this script only (TRITON_INTERPRET=1), numbers meaningless
        dev, dt, T = "cpu", torch.float16, 128
        shapes = {k: (i // 32, o // 32) for k, (i, o) in shapes.items()}
    rows = []

    def bench(fn):
        if dev == "cpu":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return tt.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def memory_allocated():
        return torch.cuda.memory_allocated() if dev == "cuda" else 0

    for name, (fin, fout) in shapes.items():
        g = torch.Generator(dev).manual_seed(0)
        x = torch.randn(T, fin, device=dev, dtype=dt, generator=g).requires_grad_(True)
        w = (torch.randn(fout, fin, device=dev, dtype=dt, generator=g) / fin**0.5)
        a = (torch.randn(r, fin, device=dev, dtype=dt, generator=g) / fin**0.5).requires_grad_(True)
        b = (torch.randn(fout, r, device=dev, dtype=dt, generator=g) / r**0.5).requires_grad_(True)
        dy = torch.randn(T, fout, device=dev, dtype=dt, generator=g)

        def fwd_bwd(f):
            def run():
                x.grad = a.grad = b.grad = None
                f().backward(dy)
            return run

        variants = {
            "base": fwd_bwd(lambda: F.linear(x, w)),
            "naive": fwd_bwd(lambda: lora_linear_reference(x, w, None, a, b, s)),
        }
        for p in (0.0, 0.1):
            for be in ("torch", "triton"):
                def mk(p=p, be=be):
                    def f():
                        set_backend(be)
                        return lora_linear(x, w, None, a, b, s, dropout_p=p, training=True)
                    return f
                variants[f"{be} p={p:g}"] = fwd_bwd(mk())
        variants["naive p=0.1"] = fwd_bwd(lambda: lora_linear_reference(x, w, None, a, b, s, 0.1, True))
        # Pieces, to see where the time goes.
        xd, xa_, g_ = x.detach(), (x.detach() @ a.detach().t()), dy @ b.detach()
        wa = torch.cat([w, a.detach()], 0)
        pieces = {
            "[fwd] x@W^T": lambda: F.linear(xd, w),
            "[fwd] x@[W;A]^T": lambda: F.linear(xd, wa),
            "[fwd] x@A^T cublas": lambda: xd @ a.detach().t(),
            "[fwd] out+=xa@B^T": None,
            "[bwd] dY@B cublas": lambda: dy @ b.detach(),
            "[bwd] dA=g^T x cublas": lambda: g_.t() @ xd,
            "[bwd] dB=dY^T xa cublas": lambda: dy.t() @ xa_,
            "[bwd] dX+=gA cublas": None,
        }
        out_buf = F.linear(xd, w)
        dx_buf = dy @ w
        pieces["[fwd] out+=xa@B^T"] = lambda: out_buf.addmm_(xa_, b.detach().t(), alpha=s)
        pieces["[bwd] dX+=gA cublas"] = lambda: dx_buf.addmm_(g_, a.detach(), alpha=s)
        # The shipped order: write the rank-r part, then let the big GEMM accumulate onto it (beta=1).
        pieces["[fwd] C=s*xa@B^T (beta=0)"] = lambda: torch.empty_like(out_buf).addmm_(
            xa_, b.detach().t(), beta=0, alpha=s)
        pieces["[fwd] C+=x@W^T (beta=1)"] = lambda: out_buf.addmm_(xd, w.t())
        pieces["[bwd] dX=dY@W"] = lambda: dy @ w
        pieces["[bwd] C=s*gA (beta=0)"] = lambda: torch.empty_like(dx_buf).addmm_(g_, a.detach(), beta=0, alpha=s)
        pieces["[bwd] C+=dY@W (beta=1)"] = lambda: dx_buf.addmm_(dy, w)
        tri = ll_mod._triton()
        if tri is not None:
            for p in (0.0, 0.1):
                pieces[f"[fwd] xa triton p={p:g}"] = (
                    lambda p=p: tri.lora_a_forward(xd, a.detach(), p, 1234))
                pieces[f"[bwd] dX+dA triton p={p:g}"] = (
                    lambda p=p: tri.lora_a_backward(xd, g_, a.detach(), p, 1234, s, True, True))
        if tri is not None and args.sweep and name in ("q", "down"):
            for bm, bk, nw, ns in [(32, 128, 4, 4), (32, 256, 4, 3), (16, 256, 4, 4), (32, 64, 4, 6)]:
                pieces[f"[sweep fwd] bm{bm} bk{bk} w{nw} s{ns}"] = (
                    lambda bm=bm, bk=bk, nw=nw, ns=ns: tri.lora_a_forward(
                        xd, a.detach(), 0.1, 1234, bm=bm, bk=bk, num_warps=nw, num_stages=ns))
            for bm, bn, nw, ns in [(64, 128, 4, 3), (32, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (32, 256, 4, 4)]:
                pieces[f"[sweep bwd] bm{bm} bn{bn} w{nw} s{ns}"] = (
                    lambda bm=bm, bn=bn, nw=nw, ns=ns: tri.lora_a_backward(
                        xd, g_, a.detach(), 0.1, 1234, s, True, True, bm=bm, bn=bn, num_warps=nw,
                        num_stages=ns))
        if name == "q":
            # q, k, v read one x: one (3r)-wide product instead of three r-wide ones.
            a3 = torch.randn(3 * r, fin, device=dev, dtype=dt) / fin**0.5
            g3 = torch.randn(T, 3 * r, device=dev, dtype=dt)
            pieces["[fwd] x@[Aq;Ak;Av]^T cublas"] = lambda: xd @ a3.t()
            pieces["[bwd] dA3=g3^T x cublas"] = lambda: g3.t() @ xd
        for vname, fn in list(variants.items()) + list(pieces.items()):
            try:
                ms = bench(fn)
            except Exception as e:
                print(f"!! {name} {vname}: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append(dict(shape=name, fin=fin, fout=fout, variant=vname, ms=ms))
        # Saved-activation memory of one forward (what stays alive until backward).
        for vname in ("base", "naive", "torch p=0", "triton p=0", "torch p=0.1", "triton p=0.1", "naive p=0.1"):
            m0 = memory_allocated()
            if vname == "base":
                y = F.linear(x, w)
            elif vname.startswith("naive"):
                p = 0.1 if "0.1" in vname else 0.0
                y = lora_linear_reference(x, w, None, a, b, s, p, True)
            else:
                be, p = vname.split(" p=")
                set_backend(be)
                y = lora_linear(x, w, None, a, b, s, dropout_p=float(p), training=True)
            saved = (memory_allocated() - m0 - y.numel() * y.element_size()) / 2**20
            rows.append(dict(shape=name, fin=fin, fout=fout, variant=f"saved MiB {vname}", ms=saved))
            del y
        set_backend("auto")
        del x, w, a, b, dy, out_buf, dx_buf, wa
        if dev == "cuda":
            torch.cuda.empty_cache()

    base = {rw["shape"]: rw["ms"] for rw in rows if rw["variant"] == "base"}
    print(f"{'shape':<6} {'variant':<28} {'ms':>8} {'x base':>7}")
    for rw in rows:
        if rw["variant"].startswith("saved"):
            print(f"{rw['shape']:<6} {rw['variant']:<28} {rw['ms']:8.1f}")
        else:
            print(f"{rw['shape']:<6} {rw['variant']:<28} {rw['ms'] * 1e3:8.1f}us {rw['ms'] / base[rw['shape']]:6.3f}")
    write_json("micro.json", dict(env=environment(dev), T=T, r=r, rows=rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="SmolLM2-135M shapes on the CPU, fp32")
    ap.add_argument("--micro", action="store_true", help="per-linear kernel variants (GPU)")
    ap.add_argument("--backends", nargs="*", default=[], choices=["torch", "triton"],
                    help="also time adapterkit with these kernel backends forced (all-linear r=16 rows)")
    ap.add_argument("--only", nargs="*", help="keep only rows whose label contains one of these")
    ap.add_argument("--qlora", action="store_true", help="--cpu: add the NF4 (bitsandbytes) rows (GPU: always)")
    ap.add_argument("--small", action="store_true", help="a 2-layer, hidden-256 model: a quick run of every row")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--rank", type=int, default=16, help="rank for --micro")
    ap.add_argument("--sweep", action="store_true", help="--micro: also sweep Triton launch shapes")
    ap.add_argument("--profile", action="store_true", help="GPU: print the top CUDA ops of two steps per row")
    ap.add_argument("--host-profile", action="store_true",
                    help="GPU: print the functions taking the host's time in three steps per row (cProfile)")
    ap.add_argument("--interleave", action="store_true",
                    help="GPU: build every row first, then step them in turn (one step each per round), so that a "
                         "host whose speed drifts weighs on every row alike (the CPU table always runs so)")
    ap.add_argument("--optimizer", choices=["fused", "foreach"], default="fused",
                    help="GPU: AdamW fused (the default) or torch's default (foreach)")
    args = ap.parse_args()
    if args.interleave and (args.profile or args.host_profile):
        ap.error("--interleave times rows in turn; profile them without it")
    global PROFILE, HOST_PROFILE, OPTIMIZER
    PROFILE, HOST_PROFILE, OPTIMIZER = args.profile, args.host_profile, args.optimizer
    if args.micro:
        main_micro(args)
    else:
        main_train(args)


if __name__ == "__main__":
    main()
