"""torch.distributed glue for save and load: whole tensors out of FSDP2 (DTensor) shards, file values back into them,
and which rank writes.

Gathering a sharded tensor is a collective: every rank of its mesh must call `full` for the same tensors in the same
order (save and load walk the model in one fixed order on every rank, so calling them on every rank is enough).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # torch >= 2.5 exports DTensor publicly; older builds keep it private
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = None
    distribute_tensor = None


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2 / tensor parallel): its local storage holds only this rank's part."""
    return DTensor is not None and isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank when sharded (a collective), else `tensor` itself (detached)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """Rank 0 of an initialised process group, or the only process."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def assign(live: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole-tensor `value` into `live` (under no_grad); a sharded `live` receives only its own part.

    Every rank holds the whole value (each read the file), so a shard is cut out locally: no communication.
    """
    if not is_sharded(live):
        live.copy_(value)
        return
    value = value.to(device=live.device, dtype=live.dtype)
    try:
        part = distribute_tensor(value, live.device_mesh, live.placements, src_data_rank=None)
    except TypeError:  # torch without src_data_rank: scatters from rank 0 instead (every rank calls this anyway)
        part = distribute_tensor(value, live.device_mesh, live.placements)
    live.to_local().copy_(part.to_local())


def model_class(module: torch.nn.Module) -> type:
    """The module's own class: FSDP2's fully_shard swaps in a generated subclass (FSDP<Name>), which names nothing
    a reader could import."""
    for cls in type(module).__mro__:  # (FSDPLlamaForCausalLM, FSDPModule, LlamaForCausalLM, ...)
        if not cls.__module__.startswith("torch.distributed."):
            return cls
    return type(module)
