"""Host cost per call: the microseconds the CPU spends issuing each piece of an adapted layer.

Steps that are close to CPU-bound (DoRA, a 4-bit base, eager decode) are decided by this, not by GPU time. Tensors
are tiny (the GPU finishes each kernel before the host issues the next), and each figure is the mean over many calls
with one synchronisation at the end. Rows: single ops (a torch op, Triton launches: through the JIT and
direct, as `kernels/direct_launch.py` relaunches a compiled kernel), then layers: the frozen base,
LoRA, DoRA and a 4-bit base with and without LoRA, under no_grad (decode) and forward + backward (training).

Training rows come twice. "one layer" is a forward + backward of a single layer, so it includes what every backward
call costs once (the autograd engine's start, on CUDA a hand-off to its device thread). "per layer in a stack" is
the difference between a stack of STACK layers and a single one, divided by STACK - 1: what each further layer adds,
which is what a model's step pays per adapted linear. In the stack, "norm recomputed" changes every DoRA layer's A
before each call (one foreach op), as an optimizer step does.

    PYTHONPATH=src python3 bench/host_cost.py            # CUDA (the numbers that matter)
    PYTHONPATH=src python3 bench/host_cost.py --cpu      # the CPU paths: Python and dispatcher cost only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import adapterkit as ak  # noqa: E402

WIDTH, ROWS, RANK, STACK = 256, 8, 16, 8
KINDS = ("base", "lora", "dora", "nf4", "nf4-lora")


def per_call_us(fn, calls: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(max(5, calls // 20)):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def layers(kind: str, depth: int, device: str, dtype: torch.dtype) -> nn.Module:
    """`depth` linear layers of WIDTH: "base", "lora", "dora", "nf4" or "nf4-lora" (4-bit: CUDA only)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(depth))).to(device, dtype)
    model.requires_grad_(False)
    if kind.startswith("nf4"):
        ak.quantize_model(model, "nf4", compute_dtype=dtype)
    if kind in ("lora", "dora", "nf4-lora"):
        ak.attach(model, ak.LoraConfig(r=RANK, target_modules=[str(i) for i in range(depth)],
                                       use_dora=kind == "dora", init_lora_weights=False), name="a")
    return model


def training_rows(kind: str, x: torch.Tensor, calls: int) -> list[tuple[str, float]]:
    rows = []
    times: dict[tuple[int, bool], float] = {}
    for depth in (1, STACK):
        model = layers(kind, depth, x.device.type, x.dtype).train()
        xg = x.clone().requires_grad_(True)
        factors = [m.lora_A["a"].weight for m in model] if kind == "dora" else []

        def fwd_bwd():
            model(xg).sum().backward()

        def fwd_bwd_new_norm():
            with torch.no_grad():
                torch._foreach_mul_(factors, 1.0)  # a new version of every A: each norm is stale, as after a step
            model(xg).sum().backward()

        times[depth, False] = per_call_us(fwd_bwd, calls)
        if factors:
            times[depth, True] = per_call_us(fwd_bwd_new_norm, calls)
    for new_norm in (False, True):
        if (1, new_norm) not in times:
            continue
        label = f"{kind}, norm recomputed" if new_norm else kind
        one, stack = times[1, new_norm], times[STACK, new_norm]
        rows.append((f"fwd+bwd, one layer: {label}", one))
        rows.append((f"fwd+bwd, per layer in a stack: {label}", (stack - one) / (STACK - 1)))
    return rows


class Rows(list):
    """The table's rows, each printed as it is added: a run cut short by a time limit still shows what it measured."""

    def append(self, row: tuple[str, float]) -> None:
        super().append(row)
        print(f"  {row[0]:<52} {row[1]:8.1f} us", flush=True)

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="time the CPU paths (no CUDA, no Triton, no 4-bit rows)")
    ap.add_argument("--calls", type=int, default=1000, help="calls per figure")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("host_cost.py measures CUDA launches: run it on a GPU machine, or pass --cpu")
    dev, dt = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)
    x = torch.randn(ROWS, WIDTH, device=dev, dtype=dt)
    w = torch.randn(WIDTH, WIDTH, device=dev, dtype=dt)
    name = "CPU" if args.cpu else torch.cuda.get_device_name()
    print(f"# host cost per call, {name}, torch {torch.__version__}, {str(dt)[6:]}, {ROWS}x{WIDTH}, r={RANK}, "
          f"stack of {STACK}", flush=True)
    rows = Rows()
    with torch.no_grad():
        rows.append(("torch op: x.mul_(1)", per_call_us(lambda: x.mul_(1.0), 2 * args.calls)))
        rows.append(("torch op: F.linear(x, W)", per_call_us(lambda: F.linear(x, w), 2 * args.calls)))
        rows.append(("torch op: torch.empty",
                     per_call_us(lambda: torch.empty(ROWS, WIDTH, device=dev, dtype=dt), 2 * args.calls)))
        if not args.cpu:
            try:
                from adapterkit.kernels import _triton_dora as td

                m = torch.ones(WIDTH, device=dev, dtype=dt)
                n = torch.ones(WIDTH, device=dev, dtype=torch.float32)
                rows.append(("Triton launch: DoRA scale_columns_",
                             per_call_us(lambda: td.scale_columns_(x, m, n, None), 2 * args.calls)))
                from adapterkit.kernels import _triton_gathered as tg

                a_tab = torch.zeros(4, RANK, WIDTH, device=dev, dtype=dt)
                b_tab = torch.zeros(4, WIDTH, RANK, device=dev, dtype=dt)
                index = torch.zeros(ROWS, device=dev, dtype=torch.long)
                run = tg.decode_launch(ROWS, a_tab, b_tab)
                via_jit = run.launch.jit[run.grid]
                rows.append(("Triton launch: gathered decode, through the JIT", per_call_us(
                    lambda: via_jit(x, a_tab, b_tab, index, x, **run.meta, **run.launch.options), 2 * args.calls)))
                rows.append(("Triton launch: gathered decode, direct (as served)",
                             per_call_us(lambda: run(x, index, x), 2 * args.calls)))
            except Exception as exc:  # report and go on: the layer rows still mean something
                rows.append((f"Triton launch: unavailable ({type(exc).__name__})", float("nan")))
    for kind in KINDS if not args.cpu else ("base", "lora", "dora"):
        try:
            model = layers(kind, 1, dev, dt).eval()
        except Exception as exc:
            rows.append((f"{kind}: {type(exc).__name__}: {str(exc)[:80]}", float("nan")))
            continue
        with torch.no_grad():
            rows.append((f"no_grad, one layer: {kind}", per_call_us(lambda: model(x), args.calls)))
        rows.extend(training_rows(kind, x, args.calls))  # the frozen base too: its input needs grad
    return list(rows)


if __name__ == "__main__":
    main()
