"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form, W x + s / (ranknum + 1e-5) * B (E ⊙ A) x, whose singular values E
are pruned during training to a budget of `target_r` per layer on average. Config, layers and the rank allocator.

    cfg = ak.AdaLoraConfig(init_r=12, target_r=4, tinit=10, tfinal=20, total_step=200, target_modules=[...])
    ak.attach(model, cfg)
    allocator = ak.RankAllocator(model)        # adalora_schedule.py        # also adds orth_reg_weight * ||AAᵀ - I|| + ||BᵀB - I|| to outputs.loss
    for step in range(200):
        model(**batch).loss.backward(); opt.step()
        allocator.step(step)                   # after optimizer.step, before zero_grad (PEFT's update_and_allocate)
        opt.zero_grad()
    ak.save(model, "out/")                     # rows of pruned triplets dropped; the masks saved as rank_pattern

PEFT's file layout: `lora_A` (r, in), `lora_B` (out, r), `lora_E` (r, 1) (no `.weight`), `ranknum` not saved (it stays
init_r); `rank_pattern` = {"<module>.lora_E": [kept, ...]} (init_r booleans) tells a loader each layer's rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_LIST_ITEMS
from ..errors import ConfigError
from .base import AdapterWrapper, AttachContext
from .lora import product_bound
from .lora_config import LoraConfig


@dataclass
class AdaLoraConfig(LoraConfig):
    """PEFT's AdaLoraConfig keys and defaults (a LoraConfig whose `r` is unused: layers start at `init_r`)."""

    target_r: int = 8  # average rank per layer at the end of the budget schedule
    init_r: int = 12  # rank every layer starts with
    tinit: int = 0  # steps before pruning starts
    tfinal: int = 0  # steps at the end with the final ranks fixed
    deltaT: int = 1  # steps between two allocations
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of the uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality regulariser
    total_step: int | None = None  # training steps (required)
    peft_type: str = "ADALORA"

    PEFT_TYPE: ClassVar[str] = "ADALORA"
    FIELD_TYPES: ClassVar[dict[str, str]] = {
        **LoraConfig.FIELD_TYPES, "target_r": "int", "init_r": "int", "tinit": "int", "tfinal": "int",
        "deltaT": "int", "beta1": "number", "beta2": "number", "orth_reg_weight": "number", "total_step": "int?",
    }

    def validate(self) -> None:
        masks, self.rank_pattern = self.rank_pattern, {}  # AdaLoRA's rank_pattern holds masks, not ranks
        try:
            super().validate()
        finally:
            self.rank_pattern = masks
        if self.use_dora or self.target_parameters:
            raise ConfigError("AdaLoRA does not support use_dora or target_parameters.")
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError(f"AdaLoRA needs total_step > 0 (the training steps), got {self.total_step!r}.")
        if not 0 < self.target_r <= self.init_r:
            raise ConfigError(f"AdaLoRA needs 0 < target_r <= init_r, got target_r={self.target_r}, "
                              f"init_r={self.init_r}.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no pruning phase in "
                              f"total_step={self.total_step}; lower them or raise total_step.")
        for key in ("beta1", "beta2"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"{key} must be in (0, 1), got {getattr(self, key)!r}.")
        if self.orth_reg_weight < 0 or self.deltaT < 1:
            raise ConfigError(f"orth_reg_weight must be >= 0 and deltaT >= 1, got {self.orth_reg_weight!r}, "
                              f"{self.deltaT!r}.")
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"AdaLoRA's rank_pattern must be a mapping {{'<module>.lora_E': [kept, ...]}}, got "
                              f"{type(self.rank_pattern).__name__} {self.rank_pattern!r:.80}.")
        if len(self.rank_pattern) > MAX_LIST_ITEMS:
            raise ConfigError(f"AdaLoRA's rank_pattern has {len(self.rank_pattern):,} entries; at most "
                              f"{MAX_LIST_ITEMS:,} are accepted.")
        for key, mask in self.rank_pattern.items():
            if not isinstance(key, str) or not isinstance(mask, list) or len(mask) > self.init_r \
                    or not all(isinstance(v, bool) for v in mask):
                raise ConfigError(f"rank_pattern[{key!r}] must be a list of at most init_r={self.init_r} booleans "
                                  "(kept singular values), as AdaLoRA saves it.")

    def mask_for(self, module_path: str) -> list[bool] | None:
        return self.rank_pattern.get(f"{module_path}.lora_E")


@dataclass
class AdaLoraRecord:
    r: int  # rows of A / E (init_r, or the kept rank of a loaded adapter)
    scaling: float  # lora_alpha (r when alpha is 0), divided by ranknum + 1e-5 in the forward
    ranknum: float  # init_r: PEFT keeps it after pruning
    dropout: float = 0.0
    mask: tuple[bool, ...] | None = None  # the allocator's kept triplets (None: all rows kept)

    @property
    def factor(self) -> float:
        return self.scaling / (self.ranknum + 1e-5)


class AdaLoraLinear(AdapterWrapper):
    """AdaLoRA around nn.Linear or transformers' Conv1D (weight (in, out): the delta is transposed on merge)."""

    method = "ADALORA"
    containers = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module, view=None) -> None:
        super().__init__(base_layer, view)
        self._set_plain(_active=())
        self.lora_A = self._container(nn.ParameterDict)  # (r, in)
        self.lora_B = self._container(nn.ParameterDict)  # (out, r)
        self.lora_E = self._container(nn.ParameterDict)  # (r, 1)

    def add_adapter(self, name: str, cfg: AdaLoraConfig, path: str, ctx: AttachContext | None = None) -> None:
        mask = cfg.mask_for(path)
        r = sum(mask) if mask is not None else cfg.init_r
        factory = self._factory(ctx)
        a = torch.empty(r, self.in_features, **factory)
        e = torch.empty(r, 1, **factory)
        b = torch.empty(self.out_features, r, **factory)
        if ctx is None or ctx.init:
            if cfg.init_lora_weights is False:  # PEFT: all three random normal
                a.normal_(), e.normal_(), b.normal_()
            else:
                a.normal_(0.0, 0.02), e.zero_(), b.normal_(0.0, 0.02)
        self.lora_A[name], self.lora_E[name], self.lora_B[name] = nn.Parameter(a), nn.Parameter(e), nn.Parameter(b)
        alpha = cfg.lora_alpha
        self.records[name] = AdaLoraRecord(r=r, scaling=alpha if alpha > 0 else float(r), ranknum=float(cfg.init_r),
                                           dropout=float(cfg.lora_dropout))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._modules["lora_A"]._parameters[name], self._modules["lora_E"]._parameters[name],
                self._modules["lora_B"]._parameters[name])

    def _refresh(self) -> None:
        self._set_plain(_active=tuple((n, self.records[n].dropout, self.records[n].factor) for n in self._live()))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name, p, factor in self._active:
            a, e, b = self.factors(name)
            h = x.to(a.dtype)
            if p and self.training:
                h = F.dropout(h, p, True)
            out = out + ((h @ (a * e).T @ b.T) * factor).to(out.dtype)  # (..., r) -> (..., out)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        a, e, b = (t.detach().float() for t in self.factors(name))
        delta = b @ (a * e) * self.records[name].factor  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def max_delta_bound(self, name: str) -> float:
        a, e, b = self.factors(name)
        return product_bound(a * e, b, self.records[name].factor)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        a, e, b = self.factors(name)
        mask = self.records[name].mask
        if mask is not None and len(mask) == a.shape[0] and not all(mask):  # drop pruned triplets (copies)
            keep = torch.tensor(mask, device=a.device)
            a, e, b = a.detach()[keep], e.detach()[keep], b.detach()[:, keep]
        return {"lora_A": a, "lora_B": b, "lora_E": e}


def summary(cfg: AdaLoraConfig, tensors: dict) -> list[tuple[str, str]]:
    """`adapterkit inspect` rows: the schedule and the kept rank per layer."""
    rows = [("method", f"ADALORA (init_r={cfg.init_r}, target_r={cfg.target_r}, alpha={cfg.lora_alpha:g}, "
                       f"total_step={cfg.total_step}, dropout={cfg.lora_dropout:g})")]
    if cfg.rank_pattern:
        kept = sorted(sum(m) for m in cfg.rank_pattern.values())
        rows.append(("kept ranks", f"{sum(kept)} of {cfg.init_r * len(kept)} over {len(kept)} layers "
                                   f"(min {kept[0]}, max {kept[-1]})"))
    return rows
