"""The training loop's optimizer: AdamW over the adapter parameters, fused where every parameter is on CUDA (as
transformers' Trainer defaults to with torch >= 2.8), torch's default elsewhere; LoRA+ groups keep their rates."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit import train as train_mod
from helpers import build


def examples(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(1, 128, (6 + i,), generator=gen).tolist()), "labels": ids}
            for i in range(n)]


def made_optimizers(monkeypatch) -> list[dict]:
    """Record the keyword arguments of every AdamW the loop builds."""
    made = []
    real = torch.optim.AdamW

    class Recording(real):
        def __init__(self, params, **kwargs):
            made.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(train_mod.torch.optim, "AdamW", Recording)
    return made


@pytest.mark.parametrize("loraplus", [None, 4.0])
def test_cpu_parameters_get_torchs_default_adamw(monkeypatch, loraplus):
    made = made_optimizers(monkeypatch)
    model = build("llama")
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cfg = train_mod.TrainConfig(max_steps=1, batch_size=2, warmup_steps=0, lr=1e-3, loraplus_ratio=loraplus)
    result = train_mod.train(model, examples(), cfg=cfg)
    assert result.completed_steps == 1
    assert len(made) == 1 and "fused" not in made[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parameters_get_the_fused_adamw(monkeypatch):
    made = made_optimizers(monkeypatch)
    model = build("llama").cuda()
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    result = train_mod.train(model, examples(), cfg=train_mod.TrainConfig(max_steps=2, batch_size=2, warmup_steps=0))
    assert result.completed_steps == 2
    assert made == [dict(lr=made[0]["lr"], weight_decay=made[0]["weight_decay"], fused=True)]
