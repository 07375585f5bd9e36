"""LoRA under torch.distributed on 2 CPU processes (gloo): DDP and FSDP2 training match one process, save and load.

Each test launches 2 fresh processes (`dist_launch.run`); the single-process reference runs in the test process itself.
The global batch is fixed and split in halves by rank; the loss is a mean over equally many tokens per rank, so
averaging gradients across ranks gives the full-batch gradient and the weights must agree to float rounding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import dist_launch as launch
import pytest
import torch
import torch.distributed as dist
from helpers import bit_equal, input_ids, tiny_llama

import adapterkit as ak

WORLD = 2
STEPS = 3
LR = 0.5
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TARGETS = {"linear": ["q_proj", "v_proj"], "embedding": ["embed_tokens"]}

# ------------------------------------------------------------------------------------------------ shared pieces
def lora_model(target: str) -> torch.nn.Module:
    """One-layer tiny Llama with LoRA (default init) on `target`; the same weights in every process."""
    model = tiny_llama(layers=1)
    torch.manual_seed(0)
    ak.attach(model, ak.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[target]))
    return model.train()


def global_batches() -> list[torch.Tensor]:
    return [input_ids(batch=2 * WORLD, length=8, seed=100 + step) for step in range(STEPS)]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: gathered when it is a (sharded) DTensor."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in model.named_parameters() if p.requires_grad}


def train(forward: torch.nn.Module, params: list[torch.nn.Parameter], rows: slice) -> None:
    """SGD steps over `rows` of each global batch; `forward` is the model or its distributed wrapper."""
    opt = torch.optim.SGD(params, lr=LR)
    for ids in global_batches():
        ids = ids[rows]
        forward(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def my_rows(rank: int, world_size: int) -> slice:
    per = 2 * WORLD // world_size
    return slice(rank * per, (rank + 1) * per)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def single_process_weights(target: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, trained) adapter weights of the single-process run on the full global batch."""
    model = lora_model(target)
    before = adapter_weights(model)
    train(model, [p for p in model.parameters() if p.requires_grad], slice(None))
    after = adapter_weights(model)
    return before, after


def assert_weights_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: adapter parameters {sorted(got)} != {sorted(want)}"
    for name in want:
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= 1e-6, f"{what}: {name} differs from the single-process run by {diff:.3g}"


def assert_trained(before, after) -> None:
    moved = max((after[n] - before[n]).abs().max().item() for n in before)
    assert moved > 1e-3, f"the reference run barely changed the adapter ({moved:.3g}): the comparison would be vacuous"


# --------------------------------------------------------------------------------------------- worker functions
def ddp_train(rank: int, world_size: int, target: str) -> dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = lora_model(target)
    train(DDP(model), [p for p in model.parameters() if p.requires_grad], my_rows(rank, world_size))
    return adapter_weights(model)


def fsdp_train(rank: int, world_size: int, target: str) -> dict[str, torch.Tensor]:
    model = shard(lora_model(target))
    train(model, [p for p in model.parameters() if p.requires_grad], my_rows(rank, world_size))
    return adapter_weights(model)


def ddp_save(rank: int, world_size: int, out: str, wrapped: bool) -> dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = lora_model("linear")
    ddp = DDP(model)
    train(ddp, [p for p in model.parameters() if p.requires_grad], my_rows(rank, world_size))
    if rank == 0:
        ak.save(ddp if wrapped else model, out)
    dist.barrier()
    return adapter_weights(model)


def fsdp_save(rank: int, world_size: int, out: str) -> dict[str, torch.Tensor]:
    # Gathering a sharded tensor takes every rank, so every rank calls save; rank 0 alone writes, and every rank
    # returns only once the files exist.
    model = shard(lora_model("linear"))
    train(model, [p for p in model.parameters() if p.requires_grad], my_rows(rank, world_size))
    ak.save(model, out)
    assert (Path(out) / WEIGHTS).is_file(), f"rank {rank}: save returned before rank 0's file existed"
    return adapter_weights(model)


def fsdp_load(rank: int, world_size: int, adapter: str) -> tuple[torch.Tensor, bool]:
    model = shard(tiny_llama(layers=1))
    ak.load(model, adapter)
    with torch.no_grad():
        logits = model(input_ids=global_batches()[0]).logits
    return logits, assign_shards(rank, world_size)  # in the same processes: spawning costs more than the check


def save_with_weights(weights: dict[str, torch.Tensor], out: Path) -> None:
    """Single-process save of a fresh model holding `weights` as its adapter."""
    model = lora_model("linear")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
    ak.save(model, out)


def assert_same_adapter(got: Path, want: Path) -> None:
    """Same files, same config, same header metadata and bitwise-equal tensors (bytes may still differ in order)."""
    from safetensors import safe_open

    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names, f"{got} holds other files than {want}"
    assert json.loads((got / CONFIG).read_text()) == json.loads((want / CONFIG).read_text()), "configs differ"
    with safe_open(got / WEIGHTS, "pt") as g, safe_open(want / WEIGHTS, "pt") as w:
        assert g.metadata() == w.metadata(), "header metadata (fingerprint, vocabulary) differs"
        assert sorted(g.keys()) == sorted(w.keys()), f"tensor keys {sorted(g.keys())} != {sorted(w.keys())}"
        for key in w.keys():
            assert bit_equal(g.get_tensor(key), w.get_tensor(key)), f"{key} differs from the single-process save"


def assert_same_bytes(got: Path, want: Path) -> None:
    for name in sorted(p.name for p in want.iterdir()):
        assert (got / name).read_bytes() == (want / name).read_bytes(), f"{name} differs from {want / name}"


# ------------------------------------------------------------------------------------------------------- tests
def test_harness_reports_a_child_traceback():
    with pytest.raises(launch.WorkerError, match=r"(?s)rank 1 of 2 failed:.*ValueError: rank 1 refuses"):
        launch.run(_fail_on_rank_1, timeout=30)


def _fail_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 refuses")
    dist.barrier()  # rank 0 blocks here until the harness ends it


def _sleep(rank: int, world_size: int) -> None:
    time.sleep(120)


def test_harness_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(launch.WorkerError, match=r"rank\(s\) \[0, 1\] did not finish within 3 s"):
        launch.run(_sleep, timeout=3)
    assert time.monotonic() - start < 20, "the stuck children were not ended promptly"


@pytest.mark.parametrize("target", ["linear", "embedding"])
def test_ddp_training_matches_single_process(target):
    before, want = single_process_weights(target)
    assert_trained(before, want)
    for rank, got in enumerate(launch.run(ddp_train, target, world_size=WORLD)):
        assert_weights_match(got, want, f"DDP rank {rank}")


@pytest.mark.parametrize(
    "target",
    ["linear", "embedding"],
)
def test_fsdp2_training_matches_single_process(target):
    before, want = single_process_weights(target)
    assert_trained(before, want)
    for rank, got in enumerate(launch.run(fsdp_train, target, world_size=WORLD)):
        assert_weights_match(got, want, f"FSDP2 rank {rank}")


@pytest.mark.parametrize(
    "wrapped",
    [
        pytest.param(False, id="module"),
        pytest.param(True, id="ddp"),
    ],
)
def test_ddp_rank0_save_matches_single_process(tmp_path, wrapped):
    trained = launch.run(ddp_save, str(tmp_path / "ddp"), wrapped, world_size=WORLD)
    assert_weights_match(trained[1], trained[0], "DDP ranks 0 and 1")
    save_with_weights(trained[0], tmp_path / "single")
    assert_same_adapter(tmp_path / "ddp", tmp_path / "single")


def test_ddp_rank0_save_is_byte_identical_to_single_process_saves(tmp_path):
    trained = launch.run(ddp_save, str(tmp_path / "ddp"), False, world_size=WORLD)
    # Several single-process saves: a nondeterministic layout cannot match all of them by chance.
    for i in range(8):
        save_with_weights(trained[0], tmp_path / f"single{i}")
        assert_same_bytes(tmp_path / "ddp", tmp_path / f"single{i}")


def test_fsdp2_save_writes_the_full_adapter(tmp_path):
    trained = launch.run(fsdp_save, str(tmp_path / "fsdp"), world_size=WORLD)
    save_with_weights(trained[0], tmp_path / "single")
    assert_same_adapter(tmp_path / "fsdp", tmp_path / "single")
    assert_same_bytes(tmp_path / "fsdp", tmp_path / "single")
    # One writer: no second (or partial) copy beside the target.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsdp", "single"]


def test_fsdp2_load_gives_single_process_logits(tmp_path):
    _, trained = single_process_weights("linear")
    save_with_weights(trained, tmp_path / "adapter")
    model = tiny_llama(layers=1)
    ak.load(model, tmp_path / "adapter")
    with torch.no_grad():
        want = model(input_ids=global_batches()[0]).logits
    for rank, (got, filled) in enumerate(launch.run(fsdp_load, str(tmp_path / "adapter"), world_size=WORLD)):
        assert filled, f"rank {rank}: assigning a whole tensor to a sharded parameter left a shard unfilled"
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5, f"FSDP2 rank {rank}: logits differ from the single-process load by {diff:.3g}"



def assign_shards(rank: int, world_size: int) -> bool:
    """distributed.assign of a whole tensor into a sharded parameter: every rank's shard filled."""
    from adapterkit.distributed import assign

    weight = shard(tiny_llama(layers=1)).model.layers[0].self_attn.q_proj.weight
    value = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assign(weight, value)
    return bool(torch.equal(weight.full_tensor(), value)) and weight.to_local().shape[0] < value.shape[0]
