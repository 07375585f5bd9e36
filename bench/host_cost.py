"""Host cost per call on CUDA: the microseconds the CPU spends issuing each piece of an adapted layer.

Steps that are close to CPU-bound (DoRA, a 4-bit base, eager decode) are decided by this, not by GPU time. Tensors
are tiny (the GPU finishes each kernel before the host issues the next), and each figure is the mean over many calls
with one synchronisation at the end. Rows: single ops (a torch op, a Triton launch), then whole layers: the frozen
base, LoRA, DoRA and a 4-bit base with and without LoRA, under no_grad (decode) and forward + backward (training).

    PYTHONPATH=src python3 bench/host_cost.py
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import adapterkit as ak  # noqa: E402

WIDTH, ROWS, RANK = 256, 8, 16


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def layer(kind: str) -> nn.Module:
    """One bf16 linear layer of WIDTH on CUDA: "base", "lora", "dora", "nf4" or "nf4-lora"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False)).to("cuda", torch.bfloat16)
    model.requires_grad_(False)
    if kind.startswith("nf4"):
        ak.quantize_model(model, "nf4", compute_dtype=torch.bfloat16)
    if kind in ("lora", "dora", "nf4-lora"):
        ak.attach(model, ak.LoraConfig(r=RANK, target_modules=["0"], use_dora=kind == "dora",
                                       init_lora_weights=False), name="a")
    return model


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("host_cost.py measures CUDA launches: run it on a GPU machine")
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(ROWS, WIDTH, device=dev, dtype=dt)
    w = torch.randn(WIDTH, WIDTH, device=dev, dtype=dt)
    rows: list[tuple[str, float]] = []
    with torch.no_grad():
        rows.append(("torch op: x.mul_(2)", per_call_us(lambda: x.mul_(1.0))))
        rows.append(("torch op: F.linear(x, W)", per_call_us(lambda: F.linear(x, w))))
        rows.append(("torch op: torch.empty", per_call_us(lambda: torch.empty(ROWS, WIDTH, device=dev, dtype=dt))))
        try:
            from adapterkit.kernels import _triton_dora as td

            m = torch.ones(WIDTH, device=dev, dtype=dt)
            n = torch.ones(WIDTH, device=dev, dtype=torch.float32)
            rows.append(("Triton launch: DoRA scale_columns_", per_call_us(lambda: td.scale_columns_(x, m, n, None))))
        except Exception as exc:  # report and go on: the layer rows still mean something
            rows.append((f"Triton launch: unavailable ({type(exc).__name__})", float("nan")))
    for kind in ("base", "lora", "dora", "nf4", "nf4-lora"):
        try:
            model = layer(kind)
        except Exception as exc:
            rows.append((f"{kind}: {type(exc).__name__}: {str(exc)[:80]}", float("nan")))
            continue
        model.eval()
        with torch.no_grad():
            rows.append((f"layer no_grad: {kind}", per_call_us(lambda: model(x))))
        model.train()
        xg = x.clone().requires_grad_(True)

        def fwd_bwd():
            model(xg).sum().backward()

        rows.append((f"layer forward + backward: {kind}", per_call_us(fwd_bwd, 1000)))
        if kind == "dora":  # as in training, where each optimizer step changes A and so the weight norm
            lora_a = model[0].lora_A["a"].weight

            def fwd_bwd_new_norm():
                with torch.no_grad():
                    lora_a.mul_(1.0)  # a new version of A: the norm is recomputed (costs one torch op)
                model(xg).sum().backward()

            rows.append(("layer forward + backward: dora, norm recomputed", per_call_us(fwd_bwd_new_norm, 1000)))
    print(f"# host cost per call, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"bf16, {ROWS}x{WIDTH}, r={RANK}")
    for label, us in rows:
        print(f"  {label:<44} {us:8.1f} us")


if __name__ == "__main__":
    main()
