"""LoRA on bare parameters (`LoraConfig(target_parameters=[...])`): fused 3-D expert weights of MoE models and any
2-D nn.Parameter that is not an nn.Linear. One wrapper per module, holding every targeted parameter of it.

Per parameter of shape (E, d1, d2) (E experts) the factors are PEFT's: A (r*E, n_in), B (n_out, r*E), expert e
using rows e*r..e*r+r of A and columns e, E+e, 2E+e, ... of B (B reshaped (n_out, r, E)):

    layout (PEFT >= 0.19.1)  experts stored (E, out, in) (transformers' default): n_in = d2, n_out = d1,
                             delta_e = s * B_e A_e;  stored (E, in, out) (`is_transposed`): n_in = d1, n_out = d2,
                             delta_e = (s * B_e A_e)^T
    layout (PEFT < 0.19.1)   the other way round: the two cases swapped (`direct` below flips)
    2-D parameter (out, in)  E = 1, delta = s * B A

The forward computes W + delta for each targeted parameter and runs the module with those tensors in place of its
parameters (torch.func.functional_call), so the module's own code (grouped matmuls, routing) is untouched. PEFT nests
one wrapper per parameter; its keys are reproduced: the first parameter of a module (registration order) sits under
`base_layer.` once per parameter after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..base_layers import BaseView
from ..errors import ConfigError, MergeError
from .base import AdapterWrapper, AttachContext
from .lora import _linear_pair, product_bound
from .lora_config import LoraConfig

NEW_LAYOUT_SINCE = (0, 19, 1)  # PEFT release that swapped n_in / n_out of 3-D expert parameters


class ParameterView(BaseView):
    """A module whose own parameters (not a `weight`) carry the adapter; never chosen by `view_of`."""

    kind = "parameter"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return False

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        return 0, 0

    @staticmethod
    def _first(module: nn.Module) -> torch.Tensor:
        return next(iter(module._parameters.values()))

    @classmethod
    def compute_dtype(cls, module: nn.Module) -> torch.dtype:
        return cls._first(module).dtype

    @classmethod
    def stored_dtype(cls, module: nn.Module) -> torch.dtype:
        return cls._first(module).dtype

    @classmethod
    def device(cls, module: nn.Module) -> torch.device:
        return cls._first(module).device


@dataclass(frozen=True)
class ParamSpec:
    """One targeted parameter: its name on the module, experts, the factors' sizes and the delta's orientation."""

    name: str
    experts: int
    n_in: int
    n_out: int
    direct: bool  # delta_e = s * B_e A_e (else its transpose)
    squeeze: bool  # a 2-D parameter: the delta drops the expert dimension


@dataclass
class LoraParamRecord:
    r: int
    scaling: float
    specs: tuple[ParamSpec, ...]
    old_layout: bool = False


def _version(text: object) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in str(text).split("+")[0].split(".")[:3])
    except ValueError:
        return None


def _spec(module: nn.Module, name: str, old_layout: bool) -> ParamSpec:
    shape = tuple(module._parameters[name].shape)
    if len(shape) == 2:
        return ParamSpec(name, 1, shape[1], shape[0], True, True)
    if len(shape) != 3:
        raise ConfigError(f"target_parameters: {name!r} has shape {list(shape)}; only 2-D and 3-D parameters can "
                          "carry LoRA.")
    direct = not getattr(module, "is_transposed", False)  # (E, out, in)
    if old_layout:
        direct = not direct
    experts, d1, d2 = shape
    return ParamSpec(name, experts, d2, d1, True, False) if direct else ParamSpec(name, experts, d1, d2, False, False)


class LoraParam(AdapterWrapper):
    """LoRA deltas on the targeted parameters of one module (see the module docstring for the layout)."""

    method = "LORA"
    containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, view=None) -> None:
        super().__init__(base_layer, view or ParameterView)
        self.lora_A = self._container(nn.ModuleDict)  # adapter -> ParameterDict {parameter name: (r*E, n_in)}
        self.lora_B = self._container(nn.ModuleDict)  # adapter -> ParameterDict {parameter name: (n_out, r*E)}
        self._set_plain(_active=(), _saved=None)

    def add_adapter(self, name: str, cfg: LoraConfig, path: str, ctx: AttachContext | None = None) -> None:
        names = targeted_names(path, self.base_layer, cfg.target_parameters or ())
        taken = {s.name for r in self.records.values() for s in r.specs}
        if taken and set(names) != taken:
            raise ConfigError(f"{path!r}: every adapter must target the same parameters ({sorted(taken)}), got "
                              f"{names}; PEFT's file layout nests them in one order.")
        version = _version(cfg.passthrough.get("peft_version"))
        old = version is not None and version < NEW_LAYOUT_SINCE
        specs = tuple(_spec(self.base_layer, n, old) for n in names)
        init = cfg.init_lora_weights if ctx is None or ctx.init else None
        factory = self._factory(ctx)
        a_dict, b_dict = nn.ParameterDict(), nn.ParameterDict()
        r = None
        for spec in specs:
            r = cfg.rank_for(f"{path}.{spec.name}")
            a, b = _linear_pair(r * spec.experts, spec.n_in, spec.n_out, init, factory)
            a_dict[spec.name], b_dict[spec.name] = nn.Parameter(a), nn.Parameter(b)
        self.lora_A[name], self.lora_B[name] = a_dict, b_dict
        # One rank and scaling per module (patterns are matched on `<module>.<parameter>`, as PEFT does).
        self.records[name] = LoraParamRecord(r=r, scaling=cfg.scaling_for(f"{path}.{specs[-1].name}"), specs=specs,
                                             old_layout=old)

    def _refresh(self) -> None:
        self._set_plain(_active=tuple(self._live()))

    def param_delta(self, name: str, spec: ParamSpec, detach: bool = False) -> torch.Tensor:
        """s * (per-expert B_e A_e) as a tensor of the parameter's shape, in the factors' dtype."""
        a = self.lora_A[name][spec.name]
        b = self.lora_B[name][spec.name]
        if detach:
            a, b = a.detach(), b.detach()
        experts = spec.experts
        a3 = a.reshape(experts, -1, spec.n_in)  # (E, r, in)
        b3 = b.reshape(spec.n_out, -1, experts).permute(2, 0, 1)  # (E, out, r)
        delta = (b3 @ a3) * self.records[name].scaling  # (E, out, in)
        if not spec.direct:
            delta = delta.transpose(-2, -1)  # (E, in, out)
        return delta[0] if spec.squeeze else delta

    def forward(self, *args, **kwargs):
        live = self._active
        base = self.base_layer
        if not live:
            return base(*args, **kwargs)
        specs = self.records[live[0]].specs
        params = {}
        for spec in specs:
            weight = base._parameters[spec.name]
            for name in live:
                weight = weight + self.param_delta(name, spec).to(weight.dtype)
            params[spec.name] = weight
        return functional_call(base, params, args, kwargs, strict=False)

    def delta_weight(self, name: str) -> torch.Tensor:
        """Every targeted parameter's delta, flattened and concatenated (float32): the module has no single weight."""
        return torch.cat([self.param_delta(name, s, detach=True).float().reshape(-1) for s in self.records[name].specs])

    def max_delta_bound(self, name: str) -> float:
        # Each expert's product sums a subset of the r*E terms, so the whole factors' bound holds for every expert.
        return max(product_bound(self.lora_A[name][s.name], self.lora_B[name][s.name], self.records[name].scaling)
                   for s in self.records[name].specs)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        specs = self.records[name].specs
        out = {}
        for i, spec in enumerate(specs):
            nest = "base_layer." * (len(specs) - 1 - i)
            out[f"{nest}lora_A.weight"] = self.lora_A[name][spec.name]
            out[f"{nest}lora_B.weight"] = self.lora_B[name][spec.name]
        return out

    def load_notes(self, name: str) -> list[str]:
        record = self.records[name]
        if not any(s.experts > 1 for s in record.specs):
            return []
        return [f"target_parameters: PEFT's {'pre-0.19.1' if record.old_layout else '0.19.1+'} layout of 3-D "
                "expert parameters"]

    @property
    def weight(self) -> None:  # no single weight (merge asks whether it is shared with another module)
        return None

    # -- merge: every targeted parameter replaced by W + delta; unmerge puts the very same Parameter objects back ----
    def merge(self, names: tuple[str, ...], keep_original: bool = True, shared: bool = True) -> None:
        names = tuple(n for n in names if n not in self.merged_names)
        if not names:
            return
        base = self.base_layer
        saved = dict(self._saved or {})
        for spec in self.records[names[0]].specs:
            old = base._parameters[spec.name]
            if keep_original and spec.name not in saved:
                saved[spec.name] = old
            merged = old.detach().float()
            for name in names:
                merged = merged + self.param_delta(name, spec, detach=True).float()
            base._parameters[spec.name] = nn.Parameter(merged.to(old.dtype), requires_grad=False)
        self._set_plain(_saved=saved if keep_original else None, merged_names=self.merged_names + names)
        self._refresh()

    def unmerge(self) -> None:
        if not self.merged_names:
            return
        if self._saved is None:
            raise MergeError(f"{type(self.base_layer).__name__} was merged without keeping its original parameters; "
                             "it cannot be unmerged.")
        for pname, param in self._saved.items():
            self.base_layer._parameters[pname] = param
        self._set_plain(_saved=None, merged_names=())
        self._refresh()


def targeted_names(path: str, module: nn.Module, targets) -> list[str]:
    """The module's own parameters (registration order) named by `target_parameters`: the full key
    `<module path>.<parameter>` or a `.`-suffix of it, PEFT's rule."""
    wanted = set(targets)
    out = []
    for pname in module._parameters:
        key = f"{path}.{pname}"
        if key in wanted or any(key.endswith("." + t) for t in wanted):
            out.append(pname)
    return out
