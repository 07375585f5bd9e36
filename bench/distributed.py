"""FSDP2 training benchmark: LoRA (and QLoRA) on a Llama-3.1-8B-shaped model, adapterkit vs PEFT, per GPU.

Launched with torchrun; every rank builds the same random model (seeded), attaches the adapter, shards each decoder
layer and the root with `fully_shard`, and trains on its own batch. Reports tokens/s per GPU and peak memory per
GPU for each row (and what was allocated as its steps began: its own sharded model, nothing of an earlier row), then
(adapterkit rows) saves the adapter with `ak.save` and prints the file's SHA-256, so a 2-GPU save can be compared
with a 1-GPU save of the same weights.

    torchrun --nproc_per_node 1 bench/distributed.py            # one GPU
    torchrun --nproc_per_node 2 bench/distributed.py            # two GPUs (NCCL)
    torchrun --nproc_per_node 2 bench/distributed.py --small    # tiny model on CPU (gloo): a check of the script
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, also when imported by a test
from random_llama import random_llama  # noqa: E402

GIB = 1024**3
LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, tie_word_embeddings=False)


def build(shape: dict, dtype: torch.dtype, device: torch.device, layers: int | None):
    return random_llama({**shape, **({"num_hidden_layers": layers} if layers else {})}, dtype, device,
                        max_positions=8192)


def attach(model, impl: str, r: int):
    if impl == "base":
        return model
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"),
                              autocast_adapter_dtype=False)
    import adapterkit as ak

    return ak.attach(model, ak.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))


def shard(model):
    from torch.distributed.fsdp import fully_shard

    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.base_model.model.model.layers
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def run_row(args, impl: str, device, rank: int, world: int) -> dict:
    shape = TINY if args.small else LLAMA_8B
    dtype = torch.float32 if args.small else torch.bfloat16
    model = attach(build(shape, dtype, device, args.layers), impl, args.r)
    if args.quant:
        from adapterkit.quantized import quantize_model  # optional: QLoRA rows need bitsandbytes

        quantize_model(model, args.quant)
    shard(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    gen = torch.Generator(device="cpu").manual_seed(100 + rank)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=gen).to(device)
    # The embedding's output requires grad, so the backward runs through every layer in every row (the frozen
    # base's true floor: input gradients, no weight gradients).
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        start_gib = torch.cuda.memory_allocated() / GIB  # this row's model, and anything an earlier row left behind
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    row = dict(impl=impl, quant=args.quant, world=world, ms=seconds * 1e3,
               tokens_per_s_per_gpu=args.batch * args.seq / seconds, loss=float(loss))
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        row["start_gib"] = start_gib
    if impl == "adapterkit" and not args.no_save:
        row.update(save_digest(model, rank))
    return row


def run_rows(args, device, rank: int, world: int) -> list[dict]:
    """Every row of `args.impls` in turn, each starting from an empty device.

    A model under `fully_shard` is a reference cycle (the FSDP state's hooks on each module refer back to it), so
    dropping the last name does not free it: without a collection here a row's model stays allocated until the
    collector happens to run, and its whole set of weights counts in the next row's peak. One pass is not always
    enough (objects a finalizer touched wait for the next one), so collect until a pass finds nothing.
    """
    rows = []
    for impl in args.impls:
        try:
            rows.append(run_row(args, impl, device, rank, world))
        except Exception as exc:  # keep the other rows
            rows.append(dict(impl=impl, quant=args.quant, world=world, error=f"{type(exc).__name__}: {exc}"[:300]))
        for _ in range(8):
            if not gc.collect():
                break
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dist.barrier()
    return rows


def save_digest(model, rank: int) -> dict:
    """Save the sharded adapter (every rank takes part; rank 0 writes) and return the file's digest."""
    import adapterkit as ak

    out = {}
    folder = os.path.join(tempfile.gettempdir(), "ak-dist-save")
    try:
        ak.save(model, folder)
    except Exception as exc:  # report, keep the timing rows
        return {"save_error": f"{type(exc).__name__}: {exc}"[:300]}
    dist.barrier()
    if rank == 0:
        with open(os.path.join(folder, "adapter_model.safetensors"), "rb") as fh:
            out["adapter_sha256"] = hashlib.sha256(fh.read()).hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny model on CPU (gloo)")
    ap.add_argument("--impls", nargs="*", default=["base", "peft", "adapterkit"])
    ap.add_argument("--quant", choices=["nf4"], help="quantize the base (bitsandbytes) before sharding")
    ap.add_argument("--layers", type=int, help="fewer decoder layers than the 8B shape's 32")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.small:
        args.seq = min(args.seq, 64)
    backend = "gloo" if args.small or not torch.cuda.is_available() else "nccl"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    rows = run_rows(args, device, rank, world)
    if rank == 0:
        name = "Llama-3.1-8B shape" if not args.small else "tiny"
        print(f"# {name}{f', {args.layers} layers' if args.layers else ''}, batch {args.batch}x{args.seq}, "
              f"{world} rank(s), {backend}, LoRA all-linear r={args.r}{', base ' + args.quant if args.quant else ''}")
        base = next((r for r in rows if r["impl"] == "base" and "ms" in r), None)
        for r in rows:
            if "error" in r:
                print(f"{r['impl']:<11} error: {r['error']}")
                continue
            ratio = r["ms"] / base["ms"] if base else float("nan")
            print(f"{r['impl']:<11} {r['ms']:8.1f} ms  {ratio:5.2f}x base  {r['tokens_per_s_per_gpu']:9.0f} tok/s/GPU"
                  f"  peak {r.get('peak_gib', float('nan')):6.2f} GiB (at start {r.get('start_gib', float('nan')):5.2f})"
                  f"  loss {r['loss']:.4f}"
                  + (f"  sha256 {r['adapter_sha256'][:16]}" if "adapter_sha256" in r else "")
                  + (f"  save error: {r['save_error']}" if "save_error" in r else ""))
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"distributed_{world}.json"), "w") as fh:
                json.dump(rows, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
