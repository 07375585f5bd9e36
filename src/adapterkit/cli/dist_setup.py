"""`adapterkit train` under torchrun: the process group (gloo on CPU, NCCL on GPUs), the DDP or FSDP2 wrapper, and
quiet output on every rank but 0."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .common import console


@dataclass
class Group:
    rank: int
    world: int
    device: torch.device


def start() -> Group | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank = dist.get_rank()
    if rank != 0:
        console.quiet = True  # progress and summaries come from rank 0 only
    return Group(rank, dist.get_world_size(), device)


def finish(group: Group | None) -> None:
    if group is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        console.quiet = False


def wrap(model: nn.Module, group: Group, fsdp: bool) -> nn.Module:
    """What the training loop calls: DDP around the model, or the model itself after FSDP2 fully_shard of each
    decoder layer (transformers' `_no_split_modules` classes) and of the root."""
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[group.device.index] if group.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model
