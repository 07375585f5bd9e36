"""The method table: a method defined outside the package (one config class, one layer class, one `register` call)
runs through attach -> save -> load -> merge -> unmerge like a built-in one; two methods never share a layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.config import AdapterConfig
from adapterkit.methods.base import AdapterWrapper, AttachContext
from helpers import assert_state_equal, assert_unchanged, build, input_ids, logits, perturb, snapshot


@dataclass
class RowScaleConfig(AdapterConfig):
    """Toy method: W' = diag(1 + v) W, one trained scale per output row."""

    init_scale: float = 0.0
    peft_type: str = "ROWSCALE"

    PEFT_TYPE: ClassVar[str] = "ROWSCALE"
    FIELD_TYPES: ClassVar[dict[str, str]] = {**AdapterConfig.FIELD_TYPES, "init_scale": "number"}


class RowScaleLinear(AdapterWrapper):
    method = "ROWSCALE"
    containers = ("row_scale",)

    def __init__(self, base_layer: nn.Module, view=None) -> None:
        super().__init__(base_layer, view)
        self.row_scale = self._container(nn.ParameterDict)
        self._set_plain(_live_names=())

    def add_adapter(self, name: str, cfg: RowScaleConfig, path: str, ctx: AttachContext | None = None) -> None:
        _, out_features = self.view.features(self.base_layer)
        self.row_scale[name] = nn.Parameter(torch.full((out_features,), float(cfg.init_scale), **self._factory(ctx)))
        self.records[name] = None

    def _refresh(self) -> None:
        self._set_plain(_live_names=self._live())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        out = F.linear(x, base.weight)
        for name in self._live_names:
            out = out * (1 + self.row_scale[name])
        return out if base.bias is None else out + base.bias

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.row_scale[name].detach().float()[:, None] * self.view.float_weight(self.base_layer)

    def max_delta_bound(self, name: str) -> float:
        return float(self.row_scale[name].detach().abs().max() * self.base_layer.weight.detach().abs().max())

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"row_scale": self.row_scale[name]}


@pytest.fixture
def row_scale():
    method = ak.register(ak.Method("ROWSCALE", RowScaleConfig, {"linear": RowScaleLinear}))
    yield method
    ak.METHODS.pop("ROWSCALE")


def test_registered_toy_method_runs_the_whole_life_cycle(row_scale, tmp_path) -> None:
    ids = input_ids()
    model = build("llama")
    plain = logits(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ak.attach(model, RowScaleConfig(target_modules=["q_proj", "down_proj"]))
    torch.testing.assert_close(logits(model, ids), plain, atol=1e-6, rtol=0)  # v = 0: a no-op
    assert all(p.requires_grad == ("row_scale" in n) for n, p in model.named_parameters())
    perturb([p for n, p in model.named_parameters() if "row_scale" in n], scale=0.3)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, plain, atol=1e-3)

    ak.save(model, tmp_path)
    assert '"peft_type": "ROWSCALE"' in (tmp_path / "adapter_config.json").read_text()
    fresh = build("llama")
    report = ak.load(fresh, tmp_path)
    assert report.ok and report.base_check == "same base"
    assert len(report.applied) == 4  # two layers x q_proj, down_proj
    torch.testing.assert_close(logits(fresh, ids), adapted, atol=0, rtol=0)

    ak.merge(fresh)
    torch.testing.assert_close(logits(fresh, ids), adapted, atol=1e-5, rtol=0)
    ak.unmerge(fresh)
    torch.testing.assert_close(logits(fresh, ids), adapted, atol=0, rtol=0)
    ak.unload(fresh)
    assert_state_equal(fresh.state_dict(), original)


def test_two_methods_on_one_layer_is_a_clear_error(row_scale) -> None:
    model = ak.attach(build("llama"), ak.LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ak.ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj.*LORA.*ROWSCALE"):
        ak.attach(model, RowScaleConfig(target_modules=["q_proj"]), name="second")
    assert_unchanged(model, before)


def test_method_without_a_layer_for_the_target_kind_names_the_kinds(row_scale) -> None:
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ak.TargetError, match="embed_tokens.*ROWSCALE applies to linear"):
        ak.attach(model, RowScaleConfig(target_modules=["embed_tokens"]))
    assert_unchanged(model, before)


def test_unknown_peft_type_in_a_file_names_the_supported_ones(tmp_path) -> None:
    model = ak.attach(build("llama"), ak.LoraConfig(r=2, target_modules=["q_proj"]))
    ak.save(model, tmp_path)
    text = (tmp_path / "adapter_config.json").read_text().replace('"LORA"', '"ROWSCALE"')
    (tmp_path / "adapter_config.json").write_text(text)
    fresh = build("llama")
    before = snapshot(fresh)
    with pytest.raises(ak.AdapterLoadError, match="ROWSCALE.*not supported.*LORA"):
        ak.load(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_attach_refuses_what_is_not_a_config() -> None:
    with pytest.raises(ak.ConfigError, match="expected an adapter config.*dict"):
        ak.attach(build("llama"), {"r": 8})
