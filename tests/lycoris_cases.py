"""Checks shared by the LoHa and LoKr tests: interop with the real `peft` both ways, merge exactness, named adapters,
NaN refusal and a training step, each run for one method with its own configs (tests/methods/test_loha.py, ...).

A case is (architecture, config kwargs); kwargs use PEFT's names, which adapterkit's configs share, and always ask for
random non-zero factors (init_weights=False) so that a wrongly mapped tensor changes the logits.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

import adapterkit as ak
from adapterkit.errors import AdapterSaveError, MergeError
from adapterkit.methods.base import AdapterWrapper
from helpers import assert_state_equal, bit_equal, build, input_ids, logits

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    """A small image model: a 3x3 conv, a grouped 3x3 conv with stride, a 1x1 conv and a linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2)
        self.point = nn.Conv2d(12, 16, 1)
        self.head = nn.Linear(16, 10)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.grouped(x))
        x = self.point(x).mean(dim=(2, 3))  # (N, 16)
        return self.head(x)


CONV_TARGETS = ["stem", "grouped", "point", "head"]


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def build_any(arch: str) -> nn.Module:
    return ConvNet() if arch == "conv" else build(arch)


@torch.no_grad()
def outputs(model: nn.Module, arch: str) -> torch.Tensor:
    if arch == "conv":
        return model(images()).float()
    return logits(model, input_ids())


def file_shapes(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def _adapter_keys(shapes: dict, prefix: str) -> dict:
    """Only the method's tensors (PEFT also writes the tied embedding when a tied head is targeted)."""
    return {k: v for k, v in shapes.items() if k.rsplit(".", 1)[-1].startswith(prefix)}


def round_trip(ak_config, peft_config, prefix: str, arch: str, kwargs: dict, tmp_path) -> None:
    """PEFT -> adapterkit and adapterkit -> PEFT give the same outputs (1e-5, fp32) and the same tensor layout."""
    # PEFT -> adapterkit
    theirs = peft.get_peft_model(build_any(arch), peft_config(**kwargs)).eval()
    expected = outputs(theirs, arch)
    assert not torch.allclose(expected, outputs(build_any(arch), arch), atol=1e-4), "the adapter changes nothing"
    theirs.save_pretrained(tmp_path / "peft")
    ours = build_any(arch)
    report = ak.load(ours, tmp_path / "peft")
    assert not report.missing and not report.unexpected and not report.refused, report.summary()
    torch.testing.assert_close(outputs(ours, arch), expected, atol=1e-5, rtol=0)

    # adapterkit -> PEFT, with an adapter made here
    torch.manual_seed(1)
    made = ak.attach(build_any(arch), ak_config(**kwargs)).eval()
    ours_out = outputs(made, arch)
    ak.save(made, tmp_path / "ak")
    back = peft.PeftModel.from_pretrained(build_any(arch), tmp_path / "ak").eval()
    torch.testing.assert_close(outputs(back, arch), ours_out, atol=1e-5, rtol=0)
    assert _adapter_keys(file_shapes(tmp_path / "ak"), prefix) == _adapter_keys(file_shapes(tmp_path / "peft"), prefix)


def merge_unmerge_unload(ak_config, arch: str, kwargs: dict) -> None:
    """merge matches the unmerged outputs, unmerge restores every base tensor bit-exactly (the same objects), and
    unload(merge=True) leaves a plain model computing the merged outputs."""
    model = ak.attach(build_any(arch), ak_config(**kwargs)).eval()
    plain = build_any(arch).state_dict()
    before = outputs(model, arch)
    weights = {n: p for n, p in model.named_parameters() if "base_layer" in n}
    ak.merge(model)
    merged = outputs(model, arch)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    ak.unmerge(model)
    assert all(p is dict(model.named_parameters())[n] for n, p in weights.items())
    assert torch.equal(outputs(model, arch), before)
    ak.unload(model)
    assert_state_equal(model.state_dict(), plain)

    model = ak.attach(build_any(arch), ak_config(**kwargs)).eval()
    before = outputs(model, arch)
    ak.unload(model, merge=True)
    assert not any(isinstance(m, AdapterWrapper) for m in model.modules())
    assert set(model.state_dict()) == set(plain)
    torch.testing.assert_close(outputs(model, arch), before, atol=1e-5, rtol=0)


def two_named_adapters(ak_config, peft_config, arch: str, kw1: dict, kw2: dict, tmp_path) -> None:
    # adapterkit -> PEFT
    model = ak.attach(build_any(arch), ak_config(**kw1))
    ak.attach(model, ak_config(**kw2), name="other")
    model.eval()
    ours = {}
    for name in ("default", "other"):
        ak.set_active(model, name)
        ours[name] = outputs(model, arch)
    assert not torch.allclose(ours["default"], ours["other"], atol=1e-4)
    ak.save(model, tmp_path / "ak")
    pm = peft.PeftModel.from_pretrained(build_any(arch), tmp_path / "ak")
    pm.load_adapter(tmp_path / "ak" / "other", adapter_name="other")
    pm.eval()
    for name in ("default", "other"):
        pm.set_adapter(name)
        torch.testing.assert_close(outputs(pm, arch), ours[name], atol=1e-5, rtol=0)

    # PEFT -> adapterkit
    pm = peft.get_peft_model(build_any(arch), peft_config(**kw1))
    pm.add_adapter("other", peft_config(**kw2))
    pm.eval()
    theirs = {}
    for name in ("default", "other"):
        pm.set_adapter(name)
        theirs[name] = outputs(pm, arch)
    pm.save_pretrained(tmp_path / "peft")
    model = build_any(arch)
    ak.load(model, tmp_path / "peft")
    ak.load(model, tmp_path / "peft", name="other")
    for name in ("default", "other"):
        ak.set_active(model, name)
        torch.testing.assert_close(outputs(model, arch), theirs[name], atol=1e-5, rtol=0)

    # Both merged at once: the sum of both updates, and unmerge is exact.
    ak.set_active(model, ["default", "other"])
    both = outputs(model, arch)
    ak.merge(model)
    torch.testing.assert_close(outputs(model, arch), both, atol=1e-5, rtol=0)
    ak.unmerge(model)
    assert torch.equal(outputs(model, arch), both)


def nan_refused(ak_config, arch: str, kwargs: dict, tmp_path) -> None:
    model = ak.attach(build_any(arch), ak_config(**kwargs)).eval()
    wrapper = next(m for m in model.modules() if isinstance(m, AdapterWrapper))
    tensor = next(iter(wrapper.file_tensors("default").values()))
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="non-finite"):
        ak.merge(model)
    for key, value in model.state_dict().items():
        assert bit_equal(value, state[key]), f"{key} changed by a refused merge"
    with pytest.raises(AdapterSaveError, match="non-finite"):
        ak.save(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def training_reduces_loss(ak_config, kwargs: dict, steps: int = 10) -> tuple[float, float]:
    """A few AdamW steps of next-token loss on one fixed batch of the tiny Llama; returns (first, last) loss."""
    torch.manual_seed(0)
    model = ak.attach(build("llama"), ak_config(**kwargs))
    model.train()
    ids = input_ids(batch=4, length=12, seed=3)
    params = ak.trainable_parameters(model)
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.AdamW(params, lr=3e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    return losses[0], losses[-1]


def bf16_unmerges_bit_exactly(ak_config, targets: list[str]) -> None:
    """On a bf16 base the adapter keeps bf16, the merge changes the stored weight, and unmerge puts back the very
    tensor with its bits."""
    torch.manual_seed(0)
    model = build("llama").to(torch.bfloat16)
    ak.attach(model, ak_config(r=2, alpha=4, target_modules=targets, init_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    assert all(t.dtype == torch.bfloat16 for t in layer.file_tensors("default").values())
    weight = layer.base_layer.weight
    stored = weight.detach().clone()
    before = logits(model)
    ak.merge(model)
    assert layer.base_layer.weight.dtype == torch.bfloat16 and not torch.equal(layer.base_layer.weight, stored)
    torch.testing.assert_close(logits(model), before, atol=0.1, rtol=0.05)  # merged rounds ΔW into bf16 weights
    ak.unmerge(model)
    assert layer.base_layer.weight is weight and torch.equal(weight, stored)
    assert torch.equal(logits(model), before)


def structured_gradients_match_dense(layer: AdapterWrapper, n_in: int, n_out: int) -> None:
    """The structured forward (factors applied one after the other) gives the gradients of the formed update."""
    record = layer.records["default"]
    assert record.structured
    x = torch.randn(3, 5, n_in, requires_grad=True)
    target = torch.randn(3, 5, n_out)
    grads = []
    for structured in (True, False):
        record.structured = structured
        params = layer.adapter_parameters("default")
        for p in params:
            p.grad = None
        x.grad = None
        ((layer(x) - target) ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
