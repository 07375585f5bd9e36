"""GPU time of the one-launch LoRA decode kernel inside CUDA graphs, against the base GEMM and cuBLAS's three GEMMs,
over a sweep of its launch shapes (rows per program, output columns, K step, stages, warps), per Llama-3.2-1B
projection. Inside a graph the host drops out, so this is what a captured decode step pays; each call reads its own
copy of the weights, so no call finds another's in L2. The kernel's fixed launch shape and the K limit above which
a capture keeps cuBLAS (`kernels/_triton_lora_decode.py`) come from this table (bench/README.md, fifth pass).

    PYTHONPATH=src python3 bench/decode_sweep.py            # CUDA only; about 40 s on an H200
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

COPIES, REPLAYS = 16, 20
SHAPES = ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192))  # (N, K): q/o, k/v, gate/up, down


def graph_us(fn) -> float:
    """µs per call of fn(i), i < COPIES, captured once in a CUDA graph and replayed REPLAYS times."""
    for i in range(COPIES):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(COPIES):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(REPLAYS):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (REPLAYS * COPIES) * 1e6


def variants(rows: int, n: int, k: int):
    """(BM, BN, BK, stages, warps) launch shapes that fit shared memory and leave at least 16 column blocks."""
    for bm, bn, bk, stages, warps in itertools.product((16, 64) if rows <= 16 else (64,), (16, 32, 64, 128),
                                                       (128, 256), (3, 5), (4, 8)):
        if n // bn < 16 or (bm + bn + 16) * bk * 2 * stages > 200_000 or (warps == 8 and bn < 128):
            continue
        yield bm, bn, bk, stages, warps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[64, 16], help="decode rows (batch x 1 token)")
    ap.add_argument("--top", type=int, default=5, help="launch shapes shown per projection")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_sweep.py times CUDA graphs: run it on a GPU machine")
    import triton

    dec = importlib.import_module("adapterkit.kernels._triton_lora_decode")
    ll = importlib.import_module("adapterkit.kernels.lora_linear")
    dt = torch.bfloat16
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, r=16; "
          f"µs per call inside a CUDA graph", flush=True)
    with torch.no_grad():
        for rows in args.rows:
            for n, k in SHAPES:
                x = torch.randn(rows, k, device="cuda", dtype=dt)
                ws = [torch.randn(n, k, device="cuda", dtype=dt) / k**0.5 for _ in range(COPIES)]
                a_s = [torch.randn(16, k, device="cuda", dtype=dt) / k**0.5 for _ in range(COPIES)]
                b_s = [torch.randn(n, 16, device="cuda", dtype=dt) / 4 for _ in range(COPIES)]
                outs = [torch.empty(rows, n, device="cuda", dtype=dt) for _ in range(COPIES)]
                base = graph_us(lambda i: F.linear(x, ws[i]))
                cublas = graph_us(lambda i: ll._decode_cublas(x, ws[i], None, a_s[i], b_s[i], 2.0))
                shipped = graph_us(lambda i: dec.lora_decode(x, ws[i], None, a_s[i], b_s[i], 2.0))
                want = ll._decode_cublas(x, ws[0], None, a_s[0], b_s[0], 2.0).float()
                results = []
                for bm, bn, bk, stages, warps in variants(rows, n, k):
                    grid = (triton.cdiv(rows, bm), triton.cdiv(n, bn))
                    meta = dict(N=n, K=k, R=16, BM=bm, BN=bn, BK=bk, BR=16, SCALE=2.0, HAS_BIAS=False)

                    def run(i, grid=grid, meta=meta, stages=stages, warps=warps):
                        dec._lora_decode_kernel[grid](x, ws[i], a_s[i], b_s[i], outs[i], outs[i], rows, **meta,
                                                      num_warps=warps, num_stages=stages)

                    us = graph_us(run)
                    err = (outs[0].float() - want).abs().max().item()
                    results.append((us, bm, bn, bk, stages, warps, err))
                results.sort()
                print(f"rows {rows:3d}, {k:5d} -> {n:5d}: base {base:6.2f}  cuBLAS x3 {cublas:6.2f}  "
                      f"kernel as shipped {shipped:6.2f}  | fastest:", flush=True)
                for us, bm, bn, bk, stages, warps, err in results[:args.top]:
                    print(f"    {us:6.2f}  BM {bm:3d} BN {bn:3d} BK {bk:3d} stages {stages} warps {warps}  "
                          f"max |diff| vs cuBLAS {err:.3g}", flush=True)
                del ws, a_s, b_s, outs


if __name__ == "__main__":
    main()
