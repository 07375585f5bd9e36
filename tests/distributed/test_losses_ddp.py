"""The chunked causal-LM loss under DDP on 2 CPU processes (gloo): gradients are the average of each rank's own."""

from __future__ import annotations

import dist_launch as launch
import torch
from helpers import build, input_ids

import adapterkit as ak


def _grads(rank: int) -> list[torch.Tensor]:
    """One backward of the chunked loss on rank `rank`'s batch, without any process group."""
    model = build("llama")
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    ak.causal_lm_loss(model, input_ids(batch=1, length=7, seed=rank), chunk_size=4).backward()
    return [p.grad.clone() for p in ak.trainable_parameters(model)]


def _ddp_grads(rank: int, world_size: int) -> list[torch.Tensor]:
    model = build("llama")
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ak.causal_lm_loss(ddp, input_ids(batch=1, length=7, seed=rank), chunk_size=4).backward()
    return [p.grad.clone() for p in ak.trainable_parameters(model)]


def test_causal_lm_loss_through_ddp_averages_gradients():
    """The model's own forward runs through the DDP wrapper, so its gradient sync happens (the head, bypassed in
    the forward and run chunk by chunk after it, included)."""
    got0, got1 = launch.run(_ddp_grads)
    singles = [_grads(rank) for rank in range(2)]
    assert len(got0) == len(singles[0]) > 0
    for a, b, g0, g1 in zip(*singles, got0, got1):
        assert not torch.equal(a, b)  # the ranks' batches differ, so averaging is visible
        torch.testing.assert_close(g0, (a + b) / 2, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g1, g0)
