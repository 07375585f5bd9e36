"""VeRA (Kopiczko et al., 2024; PEFT's `VeraConfig`): frozen random projections shared by every layer of an adapter,
and two trained vectors per layer. Config, the shared projections, and the layer around nn.Linear / Conv1D.

    y = W x + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x)))     A `vera_A` (r, max in), B `vera_B` (max out, r), frozen
                                                         λ_d `vera_lambda_d` (r,), λ_b `vera_lambda_b` (out,)

A and B are sized for the largest targeted layer and drawn from `torch.Generator().manual_seed(projection_prng_key)`
with PEFT's kaiming-uniform calls (A first, then B), so a file saved without them (save_projection=False) rebuilds
the same ones. One layer of the adapter owns them (registered there, in the model's state dict once); the adapter's
other layers hold a plain reference to that same module. In the file they are `base_model.vera_A` / `base_model.vera_B`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DEFAULT_TARGETS, MAX_RANK, AdapterConfig
from ..errors import ConfigError
from .base import AdapterWrapper, AttachContext
from .lora import product_bound

# File keys of the shared projections: they belong to the adapter, not to one module.
VERA_A_KEY = "base_model.vera_A"
VERA_B_KEY = "base_model.vera_B"
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class VeraConfig(AdapterConfig):
    """VeRA with PEFT's JSON keys and defaults."""

    r: int = 256  # rank of the shared projections (VeRA wants far larger ranks than LoRA)
    projection_prng_key: int = 0  # seed of the projections
    save_projection: bool = True  # write vera_A / vera_B into the file (else rebuilt from the seed)
    vera_dropout: float = 0.0  # dropout on the adapter's input (training only)
    d_initial: float = 0.1  # starting value of every λ_d entry
    fan_in_fan_out: bool = False  # base stores weight as (in, out) (HF Conv1D); set automatically for Conv1D
    bias: str = "none"  # only "none": base biases stay frozen
    init_weights: bool = True  # True: λ_b = 0 (a no-op), λ_d = d_initial; False: λ_b = 1, λ_d random normal
    peft_type: str = "VERA"

    PEFT_TYPE: ClassVar[str] = "VERA"
    DEFAULT_TARGETS: ClassVar[dict[str, list[str]]] = {**DEFAULT_TARGETS, "phi": ["q_proj", "v_proj"]}
    FIELD_TYPES: ClassVar[dict[str, str]] = {
        **AdapterConfig.FIELD_TYPES,
        "r": "int",
        "projection_prng_key": "int",
        "save_projection": "bool",
        "vera_dropout": "number",
        "d_initial": "number",
        "fan_in_fan_out": "bool",
        "bias": "str",
        "init_weights": "bool",
    }

    def validate(self) -> None:
        super().validate()
        if self.r <= 0 or self.r > MAX_RANK:
            raise ConfigError(f"VeraConfig: r must be a positive integer up to {MAX_RANK}, got {self.r!r}.")
        if not (0.0 <= self.vera_dropout < 1.0):
            raise ConfigError(f"VeraConfig: vera_dropout must be in [0, 1), got {self.vera_dropout!r}.")
        if not (_SEED_RANGE[0] <= self.projection_prng_key <= _SEED_RANGE[1]):
            raise ConfigError(
                f"VeraConfig: projection_prng_key must fit a 64-bit seed, got {self.projection_prng_key!r}."
            )
        if self.bias != "none":
            raise ConfigError(
                f"VeraConfig: bias={self.bias!r} is not supported yet: adapterkit keeps base biases frozen "
                "(bias='none'). Use modules_to_save for the modules whose bias should train."
            )


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's draw: uniform(±sqrt(3)·sqrt(2)/sqrt(fan_in)), fan_in = shape[1], from `generator` (float32, CPU)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections(nn.Module):
    """`vera_A` (r, in) and `vera_B` (out, r) of one adapter, grown to cover every layer that uses them.

    Growing redraws both from the seed, so the result depends only on (seed, r, largest in, largest out), as in PEFT.
    """

    def __init__(self, r: int, seed: int, persistent: bool, factory: dict, training: bool) -> None:
        super().__init__()
        self.__dict__.update(r=r, seed=seed, factory=factory, n_in=0, n_out=0, training=training)
        self.register_buffer("vera_A", torch.empty(r, 0, **factory), persistent=persistent)
        self.register_buffer("vera_B", torch.empty(0, r, **factory), persistent=persistent)

    def cover(self, n_in: int, n_out: int) -> None:
        if n_in <= self.n_in and n_out <= self.n_out:
            return
        self.__dict__.update(n_in=max(n_in, self.n_in), n_out=max(n_out, self.n_out))
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        a = _kaiming_uniform((self.r, self.n_in), generator)
        b = _kaiming_uniform((self.n_out, self.r), generator)
        device = self.vera_A.device  # where the model is now (the factory's device may be stale after .to())
        self._buffers["vera_A"] = a.to(device=device, dtype=self.vera_A.dtype)
        self._buffers["vera_B"] = b.to(device=device, dtype=self.vera_B.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.n_in}, out={self.n_out}, seed={self.seed}"


@dataclass
class VeraRecord:
    """One VeRA adapter on one layer."""

    r: int
    dropout: float
    owner: bool  # this layer registers (and saves) the adapter's projections
    save_projection: bool


class VeraLinear(AdapterWrapper):
    """VeRA around nn.Linear or Conv1D (weight (in, out): the delta is transposed on merge).

    λ vectors are read from their ParameterDicts at call time (never a cached Parameter), and the projections from
    their module, so tensors replaced by `.to()`, `load_state_dict(assign=True)` or FSDP2 are the ones used.
    """

    method = "VERA"
    containers = ("vera_lambda_b", "vera_lambda_d", "vera_projections")

    def __init__(self, base_layer: nn.Module, view=None) -> None:
        super().__init__(base_layer, view)
        self._set_plain(
            _shared={},  # adapter name -> its Projections (owned here or by another layer)
            _active_vera=(),  # hot path: ((name, Projections, dropout p), ...) for the live adapters
        )
        self.vera_lambda_b = self._container(nn.ParameterDict)
        self.vera_lambda_d = self._container(nn.ParameterDict)
        self.vera_projections = self._container(nn.ModuleDict)  # only on the owning layer

    def add_adapter(self, name: str, cfg: VeraConfig, path: str, ctx: AttachContext | None = None) -> None:
        factory = self._factory(ctx)
        scratch = ctx.shared if ctx is not None else {}
        projections = scratch.get("vera_projections")
        owner = projections is None
        if owner:
            projections = Projections(cfg.r, cfg.projection_prng_key, cfg.save_projection, factory, False)
            scratch["vera_projections"] = projections
        projections.cover(self.in_features, self.out_features)
        if ctx is not None and not ctx.init:
            lambda_b = torch.empty(self.out_features, **factory)  # a strict load fills them
            lambda_d = torch.empty(cfg.r, **factory)
        elif cfg.init_weights:
            lambda_b = torch.zeros(self.out_features, **factory)
            lambda_d = torch.full((cfg.r,), float(cfg.d_initial), **factory)
        else:
            lambda_b = torch.ones(self.out_features, **factory)
            lambda_d = torch.randn(cfg.r, **factory)
        self.vera_lambda_b[name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[name] = nn.Parameter(lambda_d)
        if owner:
            self.vera_projections[name] = projections
        self._shared[name] = projections
        self.records[name] = VeraRecord(
            r=cfg.r, dropout=float(cfg.vera_dropout), owner=owner, save_projection=cfg.save_projection
        )

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self._shared.pop(name, None)

    def _refresh(self) -> None:
        self._set_plain(_active_vera=tuple((n, self._shared[n], self.records[n].dropout) for n in self._live()))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        lambdas_b = self._modules["vera_lambda_b"]._parameters
        lambdas_d = self._modules["vera_lambda_d"]._parameters
        n_in, n_out = self.in_features, self.out_features
        for name, projections, p in self._active_vera:
            lambda_b, lambda_d = lambdas_b[name], lambdas_d[name]
            a = projections.vera_A[:, :n_in]  # (r, in)
            b = projections.vera_B[:n_out, :]  # (out, r)
            h = x.to(lambda_d.dtype)
            if p and self.training:
                h = F.dropout(h, p, True)
            out = out + (lambda_b * F.linear(lambda_d * F.linear(h, a), b)).to(out.dtype)  # (..., r) -> (..., out)
        return out

    def _scaled_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ_d ⊙ A (r, in), λ_b ⊙ B (out, r)) in float32, detached."""
        projections = self._shared[name]
        a = projections.vera_A[:, : self.in_features].float()
        b = projections.vera_B[: self.out_features, :].float()
        lambda_d = self.vera_lambda_d[name].detach().float()
        lambda_b = self.vera_lambda_b[name].detach().float()
        return lambda_d[:, None] * a, lambda_b[:, None] * b

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self._scaled_factors(name)
        delta = b @ a  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def add_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self._scaled_factors(name)
        return torch.addmm(weight, a.T, b.T) if self.fan_in_fan_out else torch.addmm(weight, b, a)

    def add_delta_(self, weight: torch.Tensor, name: str) -> None:
        a, b = self._scaled_factors(name)
        if self.fan_in_fan_out:
            weight.addmm_(a.T, b.T)
        else:
            weight.addmm_(b, a)

    def max_delta_bound(self, name: str) -> float:
        a, b = self._scaled_factors(name)
        return product_bound(a, b, 1.0)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b[name], "vera_lambda_d": self.vera_lambda_d[name]}

    def adapter_level_tensors(self, name: str) -> dict[str, torch.Tensor]:
        record = self.records[name]
        if not (record.owner and record.save_projection):
            return {}
        projections = self.vera_projections[name]
        return {VERA_A_KEY: projections.vera_A, VERA_B_KEY: projections.vera_B}
