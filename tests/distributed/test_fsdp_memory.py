"""What an FSDP2-sharded LoRA model keeps alive between forward and backward, and between the rows of
bench/distributed.py, on one CPU process (gloo).

FSDP2 frees a layer's unsharded weights after its forward (their storage resized to 0) and gathers them again for its
backward; a LoRA layer that held a copy of its weight, or a tensor FSDP2 cannot free, would keep the whole unsharded
model alive until backward. A sharded model is also a reference cycle, so a benchmark that only drops its name keeps
it allocated into the next row.
"""

from __future__ import annotations

import gc
import importlib.util
import weakref
from argparse import Namespace
from pathlib import Path

import dist_launch as launch
import torch
from helpers import input_ids, tiny_llama

import adapterkit as ak

BENCH = Path(__file__).resolve().parents[2] / "bench" / "distributed.py"


def _shard(model: torch.nn.Module, layers) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def _after_forward(impl: str) -> tuple[list[int], int]:
    """(unsharded storage sizes of every decoder layer's parameters, bytes of distinct live storage the autograd graph
    saved) after one training forward of a sharded tiny Llama: plain frozen base, adapterkit or PEFT LoRA all-linear."""
    model = tiny_llama(hidden=64, layers=2)
    config = dict(r=4, lora_alpha=8, target_modules="all-linear")
    if impl == "adapterkit":
        ak.attach(model, ak.LoraConfig(**config))
    elif impl == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**config), autocast_adapter_dtype=False)
    else:
        model.requires_grad_(False)
    layers = model.get_decoder().layers
    _shard(model, layers)
    model.train()
    # The embedding's output requires grad, so every row saves what its backward through the layers needs.
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
    saved = []
    ids = input_ids(batch=2, length=16)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    sizes = [fp._unsharded_param.untyped_storage().size() for layer in layers
             for fp in layer._get_fsdp_state()._fsdp_param_group.fsdp_params]
    live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved if t.untyped_storage().size()}
    loss.backward()
    return sizes, sum(live.values())


def after_forward(rank: int, world_size: int) -> dict[str, tuple[list[int], int]]:
    return {impl: _after_forward(impl) for impl in ("base", "peft", "adapterkit")}


def test_fsdp2_frees_adapterkit_layers_after_forward():
    (got,) = launch.run(after_forward, world_size=1, timeout=120)
    for impl, (sizes, _) in got.items():
        assert sizes and not any(sizes), f"{impl}: unsharded parameter storage still allocated after forward: {sizes}"
    base, peft, mine = got["base"][1], got["peft"][1], got["adapterkit"][1]
    assert peft > base, "PEFT saved no more than the frozen base: the comparison would be vacuous"
    assert mine <= peft, f"adapterkit's autograd graph holds {mine} bytes of live storage after forward, PEFT's {peft}"


def bench_rows(rank: int, world_size: int) -> list[str]:
    """Run bench/distributed.py's rows with the cyclic collector off; list what an earlier row left alive."""
    spec = importlib.util.spec_from_file_location("bench_distributed", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    models: list[tuple[str, list[weakref.ref]]] = []
    leaks: list[str] = []

    def shard(model):
        out = bench_shard(model)
        leaks.extend(f"{impl}'s model alive when the next row starts" for impl, refs in models
                     if any(r() is not None for r in refs))
        models.append((current[0], [weakref.ref(p) for p in out.parameters()]))
        return out

    def run_row(args, impl, *rest):
        current[0] = impl
        return bench_run_row(args, impl, *rest)

    current = [""]
    bench_shard, bench_run_row = bench.shard, bench.run_row
    bench.shard, bench.run_row = shard, run_row
    args = Namespace(small=True, impls=["base", "adapterkit"], quant=None, layers=1, r=4, batch=1, seq=8, warmup=0,
                     steps=1, no_save=True)
    gc.disable()  # only the bench's own release may free a sharded model: the result may not depend on gc timing
    try:
        rows = bench.run_rows(args, torch.device("cpu"), rank, world_size)
    finally:
        gc.enable()
    leaks.extend(r["error"] for r in rows if "error" in r)
    leaks.extend(f"{impl}'s model alive after the last row" for impl, refs in models
                 if any(r() is not None for r in refs))
    return leaks


def test_bench_rows_free_each_sharded_model():
    (leaks,) = launch.run(bench_rows, world_size=1, timeout=120)
    assert leaks == [], f"bench/distributed.py kept memory across rows: {leaks}"
