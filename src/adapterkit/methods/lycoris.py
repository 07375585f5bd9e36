"""What LoHa and LoKr (PEFT's "LyCORIS" family) share: the config fields, and a layer wrapper whose adapters each
build a dense weight update ΔW (out, in) or (out, in/groups, kh, kw) from factors, for nn.Linear and nn.Conv2d.

Both add `s · ΔW x` to the base output with s = alpha / r, and share PEFT's two training-time dropouts:
- module_dropout p: the whole adapter is skipped for one forward with probability p (training only);
- rank_dropout p: each *output row* of ΔW is kept with probability 1-p (training only; LoHa, and LoKr with
  rank_dropout_scale, divide the kept rows by the kept fraction). Applied to the adapter's output channels, which is
  the same as masking rows of ΔW.
A method's file (loha.py, lokr.py) supplies the factors, ΔW, and optionally a cheaper structured forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_RANK, AdapterConfig, check_pattern_dict
from ..errors import ConfigError, TargetError
from .base import AdapterWrapper, AttachContext
from .summary import problem_rows


@dataclass
class LycorisConfig(AdapterConfig):
    """The fields LoHa and LoKr have in common, with PEFT's names and defaults."""

    r: int = 8  # rank of each factor pair
    alpha: float = 8  # scale s = alpha / r
    rank_dropout: float = 0.0  # drop output rows of ΔW while training
    module_dropout: float = 0.0  # skip the whole adapter for a forward while training
    use_effective_conv2d: bool = False  # Conv2d with kernel > 1x1: factor the kernel with a (r, r, kh, kw) core
    init_weights: bool = True  # True: ΔW = 0 at start; False: random non-zero factors
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-module rank overrides (regex keys)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-module alpha overrides (regex keys)

    INIT_CHOICES: ClassVar[tuple[Any, ...]] = (True, False)
    PATTERN_DICT_KEYS: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")
    FIELD_TYPES: ClassVar[dict[str, str]] = {
        **AdapterConfig.FIELD_TYPES,
        "r": "int",
        "alpha": "number",
        "rank_dropout": "number",
        "module_dropout": "number",
        "use_effective_conv2d": "bool",
        "init_weights": "any",  # checked against INIT_CHOICES below
        "rank_pattern": "dict",
        "alpha_pattern": "dict",
    }

    def validate(self) -> None:
        super().validate()
        if self.r <= 0 or self.r > MAX_RANK:
            raise ConfigError(f"{self.name}: r must be a positive integer up to {MAX_RANK}, got {self.r!r}.")
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if not (0.0 <= value < 1.0):
                raise ConfigError(f"{self.name}: {key} must be in [0, 1), got {value!r}.")
        if not any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c)
                   for c in self.INIT_CHOICES):
            raise ConfigError(f"{self.name}: init_weights={self.init_weights!r} is not supported; choose one of "
                              f"{', '.join(repr(c) for c in self.INIT_CHOICES)}.")
        check_pattern_dict(self.name, "rank_pattern", self.rank_pattern, lambda v: isinstance(v, int) and not isinstance(v, bool)
                             and 0 < v <= MAX_RANK, f"a positive integer up to {MAX_RANK}")
        check_pattern_dict(self.name, "alpha_pattern", self.alpha_pattern, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                             and math.isfinite(v), "a finite number")

    # -- what layers read -------------------------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        return int(self.pattern_value(self.rank_pattern, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return self.pattern_value(self.alpha_pattern, module_path, self.alpha)

    def scaling_for(self, module_path: str) -> float:
        return self.alpha_for(module_path) / self.rank_for(module_path)


@dataclass
class LycorisRecord:
    """One adapter on one layer. `layout`: the method's choice of factors for this layer (which tensors exist)."""

    r: int
    scaling: float
    rank_dropout: float
    module_dropout: float
    rescale_rank_dropout: bool  # divide kept rows by the kept fraction
    layout: Any = None
    attrs: tuple[str, ...] = ()  # the containers holding this adapter's tensors
    structured: bool = False  # use the method's structured forward instead of forming ΔW (linear layers)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """PEFT's kaiming_uniform(a=sqrt(5)) init: uniform(±1/sqrt(fan_in)), fan_in = size(1) · receptive field."""
    fan_in = t.shape[1] * (t[0][0].numel() if t.dim() > 2 else 1)
    bound = 1 / math.sqrt(fan_in)
    return t.uniform_(-bound, bound)


def product_bound(a: torch.Tensor, b: torch.Tensor) -> float:
    """Upper bound on every entry of a @ b (a (m, r), b (r, n)): |sum_k a_ik b_kj| <= ||a_i,:|| ||b_:,j||."""
    a, b = a.detach().float(), b.detach().float()
    return float(a.norm(dim=1).max() * b.norm(dim=0).max())


class LycorisLayer(AdapterWrapper):
    """Base of the LoHa/LoKr wrappers around nn.Linear (kind "linear") and nn.Conv2d (kind "conv2d").

    Subclasses set `method` and `containers` (PEFT's ParameterDict names) and implement `_create` (the empty tensors
    of one adapter by container name, and the layout the record keeps), `_init`, `_rescales`, `_weight` (ΔW / s from
    the tensors, differentiable, in the base weight's layout) and `_bound`; optionally `_structured_out`, a forward
    that never forms ΔW, with `_prefers_structured` saying when it is cheaper.
    """

    def __init__(self, base_layer: nn.Module, view=None) -> None:
        super().__init__(base_layer, view)
        kind = self.view.kind
        if kind not in ("linear", "conv2d"):
            raise TargetError(f"{self.method} applies to nn.Linear and nn.Conv2d layers, not {type(base_layer).__name__}.")
        in_features, out_features = self.view.features(base_layer)
        if kind == "conv2d":
            if base_layer.padding_mode != "zeros":
                raise TargetError(
                    f"{self.method} on a Conv2d with padding_mode={base_layer.padding_mode!r} is not supported: PEFT "
                    "applies the update with zero padding, which would give other outputs than this layer computes."
                )
            shape = (out_features, in_features // base_layer.groups, *base_layer.kernel_size)
        else:
            shape = (out_features, in_features)
        self._set_plain(
            kind=kind,
            in_features=in_features,
            out_features=out_features,
            weight_shape=shape,  # ΔW's shape: the base weight's
            _active=(),  # hot path: ((name, record), ...) of the live adapters
        )
        for attr in self.containers:
            setattr(self, attr, self._container(nn.ParameterDict))

    # -- building -------------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, cfg: LycorisConfig, path: str, ctx: AttachContext | None = None) -> None:
        r = cfg.rank_for(path)
        init = cfg.init_weights if ctx is None or ctx.init else None
        factory = self._factory(ctx)
        tensors, layout = self._create(r, cfg, factory)
        if init is not None:
            with torch.no_grad():
                self._init(tensors, layout, init)
        for attr, tensor in tensors.items():
            self._modules[attr][name] = nn.Parameter(tensor)
        self.records[name] = LycorisRecord(
            r=r, scaling=cfg.scaling_for(path), rank_dropout=float(cfg.rank_dropout),
            module_dropout=float(cfg.module_dropout), rescale_rank_dropout=self._rescales(cfg), layout=layout,
            attrs=tuple(a for a in self.containers if a in tensors),
            structured=self.kind == "linear" and self._prefers_structured(r, layout),
        )

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The live tensors of adapter `name`, by container name (read at call time, never cached)."""
        rec = self.records.get(name)
        modules = self._modules
        return {attr: modules[attr]._parameters[name] for attr in rec.attrs} if rec is not None else {}

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return self._tensors(name)  # PEFT's key suffix is the container name itself (no ".weight")

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self._tensors(name).values())

    def _refresh(self) -> None:
        self._set_plain(_active=tuple((n, self.records[n]) for n in self._live()))

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        modules = self._modules
        training = self.training
        for name, rec in self._active:
            if training and rec.module_dropout and float(torch.rand(1)) <= rec.module_dropout:
                continue  # PEFT applies the adapter when a uniform draw exceeds module_dropout
            tensors = {attr: modules[attr]._parameters[name] for attr in rec.attrs}
            h = x.to(next(iter(tensors.values())).dtype)
            if rec.structured:
                delta = self._structured_out(h, tensors, rec) * rec.scaling  # (..., out)
            else:
                weight = self._weight(tensors, rec) * rec.scaling  # base layout
                delta = F.linear(h, weight) if self.kind == "linear" else self._conv(h, weight)
            if training and rec.rank_dropout:
                delta = delta * self._row_mask(rec, delta)
            out = out + delta.to(out.dtype)
        return out

    def _conv(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.conv2d(h, weight, None, base.stride, base.padding, base.dilation, base.groups)  # (N, out, H', W')

    def _row_mask(self, rec: LycorisRecord, delta: torch.Tensor) -> torch.Tensor:
        """Keep each output row with probability 1 - rank_dropout; shaped to broadcast over `delta`."""
        keep = (torch.rand(self.out_features) > rec.rank_dropout).to(device=delta.device, dtype=delta.dtype)
        if rec.rescale_rank_dropout:
            keep = keep / keep.mean().clamp_min(1e-12)  # none kept: stays zero
        return keep if self.kind == "linear" else keep[:, None, None]  # (out,) or (out, 1, 1) for (N, out, H, W)

    # -- merge ----------------------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        tensors = {k: v.detach().float() for k, v in self._tensors(name).items()}
        rec = self.records[name]
        return self._weight(tensors, rec) * rec.scaling  # float32, the base weight's layout

    def max_delta_bound(self, name: str) -> float:
        rec = self.records[name]
        bound = self._bound(self._tensors(name), rec) * abs(rec.scaling)
        return bound if bound == bound else float("inf")  # NaN: let the exact check name it

    # -- what a method implements ---------------------------------------------------------------------------------
    def _create(self, r: int, cfg: LycorisConfig, factory: dict) -> tuple[dict[str, torch.Tensor], Any]:
        raise NotImplementedError

    def _init(self, tensors: dict[str, torch.Tensor], layout: Any, init: Any) -> None:
        raise NotImplementedError

    def _rescales(self, cfg: LycorisConfig) -> bool:
        raise NotImplementedError

    def _weight(self, tensors: dict[str, torch.Tensor], rec: LycorisRecord) -> torch.Tensor:
        raise NotImplementedError

    def _bound(self, tensors: dict[str, torch.Tensor], rec: LycorisRecord) -> float:
        return float("inf")

    def _prefers_structured(self, r: int, layout: Any) -> bool:
        return False

    def _structured_out(self, h: torch.Tensor, tensors: dict[str, torch.Tensor], rec: LycorisRecord) -> torch.Tensor:
        raise NotImplementedError


# -- `adapterkit inspect` -------------------------------------------------------------------------------------------
def by_module(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """File tensors {key: tensor} grouped as {module path: {container name: tensor}}, for names starting `prefix`."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        path, _, suffix = key.rpartition(".")
        if suffix.startswith(prefix):
            out.setdefault(path.removeprefix("base_model.model."), {})[suffix] = value
    return out


def summary_rows(cfg: LycorisConfig, norms: dict[str, float], extra: str = "",
                 problems: list[str] = ()) -> list[tuple[str, str]]:
    """The method line (key hyperparameters) and the size of the update, ||ΔW||_F per module, for inspect."""
    rows = [("method", f"{cfg.peft_type} (r={cfg.r}, alpha={cfg.alpha:g}, scale={cfg.alpha / cfg.r:g}, "
                       f"rank_dropout={cfg.rank_dropout:g}, module_dropout={cfg.module_dropout:g}"
                       f"{', effective conv2d' if cfg.use_effective_conv2d else ''}{extra})")]
    if norms:
        total = math.sqrt(sum(v * v for v in norms.values()))
        top = sorted(norms.items(), key=lambda kv: -kv[1])[:3]
        rows.append(("||ΔW|| total", f"{total:.4g} (largest: " + ", ".join(f"{p} {v:.3g}" for p, v in top) + ")"))
    return rows + problem_rows(list(problems))
