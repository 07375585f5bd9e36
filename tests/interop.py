"""Shared checks for the method test files: a tiny conv net, PEFT round trips in both directions, file shapes, and a
short training run. Every model is built seeded, so one copy goes to PEFT and one to adapterkit."""

from __future__ import annotations

import warnings

import torch
from safetensors import safe_open
from torch import nn

import adapterkit as ak
from helpers import input_ids, perturb

TOL = 1e-5


class ConvNet(nn.Module):
    """Conv2d layers (1x1, grouped 1x1, 3x3), a linear head: the layer kinds the language models lack."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 1)
        self.mix = nn.Conv2d(8, 8, 1, groups=2)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.mix(h))
        return self.head(self.conv(h).mean((2, 3)))


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


def conv_input(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def output(model: nn.Module) -> torch.Tensor:
    """Logits of a tiny language model, or the conv net's output, on a fixed input."""
    if isinstance(_inner(model), ConvNet):
        return model(conv_input()).float()
    return model(input_ids=input_ids()).logits.float()


def _inner(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def adapter_params(model: nn.Module, markers: tuple[str, ...]) -> list[torch.Tensor]:
    """Parameters whose name contains one of `markers` (e.g. "ia3_l"), in a fixed order."""
    return [p for n, p in sorted(model.named_parameters()) if any(m in n for m in markers)]


def file_shapes(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def peft_to_ours(build, peft_config, markers, tmp_path, scale=0.3) -> tuple[nn.Module, torch.Tensor, dict]:
    """PEFT makes and perturbs an adapter and saves it; adapterkit loads it. Returns (our model, PEFT's output, PEFT's
    file shapes) after checking both outputs agree."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build(), peft_config)
    perturb(adapter_params(pm, markers), scale=scale)
    pm.eval()
    expected = output(pm)
    pm.save_pretrained(tmp_path / "peft")
    ours = build()
    report = ak.load(ours, tmp_path / "peft")
    assert not report.missing and not report.unexpected and not report.refused, report
    got = output(ours)
    assert (got - expected).abs().max() <= TOL, f"PEFT -> adapterkit: max diff {(got - expected).abs().max():.3g}"
    return ours, expected, file_shapes(tmp_path / "peft")


def ours_to_peft(build, config, markers, tmp_path, scale=0.3) -> tuple[nn.Module, torch.Tensor]:
    """adapterkit makes and perturbs an adapter and saves it; PEFT loads it. Returns (our model, our output)."""
    import peft

    model = ak.attach(build(), config)
    perturb(adapter_params(model, markers), scale=scale)
    model.eval()
    ours = output(model)
    assert (ours - output(build())).abs().max() > 1e-4, "the adapter is a no-op"
    ak.save(model, tmp_path / "ak")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "ak").eval()
    got = output(loaded)
    assert (got - ours).abs().max() <= TOL, f"adapterkit -> PEFT: max diff {(got - ours).abs().max():.3g}"
    return model, ours


def train_steps(model: nn.Module, steps: int = 8, lr: float = 0.05) -> tuple[float, float]:
    """(first, last) loss of a few Adam steps on the trainable parameters, on one fixed batch (next-token loss)."""
    model.train()
    ids = input_ids(batch=4, length=12, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing is trainable"
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses[0], losses[-1]


def two_outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """The output with adapter "default" active and with "other" active, checked to differ."""
    outs = {}
    for name in ("default", "other"):
        ak.set_active(model, name)
        outs[name] = output(model)
    assert (outs["default"] - outs["other"]).abs().max() > 1e-4
    return outs


def two_adapters_both_ways(model: nn.Module, build, tmp_path) -> None:
    """`model` carries adapters "default" and "other" (different outputs): saved here, each loads in PEFT and in a
    fresh model here with the same output."""
    import peft  # the test extra; imported here so modules using only the rest of this file need not have it

    outs = two_outputs(model)
    ak.save(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    pm.load_adapter(tmp_path / "other", adapter_name="other")
    reloaded = build("llama")
    ak.load(reloaded, tmp_path)
    ak.load(reloaded, tmp_path, name="other")
    for name in ("default", "other"):
        pm.set_adapter(name)
        ak.set_active(reloaded, name)
        assert (output(pm.eval()) - outs[name]).abs().max() <= TOL
        assert (output(reloaded) - outs[name]).abs().max() <= TOL
