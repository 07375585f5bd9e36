"""(IA)³ (Liu et al., 2022; PEFT's `IA3Config`): a learned vector rescales a layer's output, or its input for
feed-forward layers. Config, and layers around nn.Linear, transformers Conv1D and nn.Conv2d.

    other layers:        y = l ⊙ (W x + b)          l: `ia3_l` (out, 1) linear, (1, out, 1, 1) conv
    feed-forward layers: y = W (l ⊙ x) + b          l: `ia3_l` (1, in) linear, (1, in, 1, 1) conv

Merging is multiplicative (rows or columns of W scaled by l; for output scaling the bias too), so unmerge puts the
original weight and bias objects back rather than dividing (PEFT divides, with a 1e-8 fudge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import AdapterConfig, check_pattern
from ..errors import ConfigError
from .base import AdapterWrapper, AttachContext

# PEFT's defaults for (IA)³ when target_modules / feedforward_modules are not given, by `config.model_type`.
IA3_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "llama4": ["down_proj"], "mistral": ["down_proj"],
    "mixtral": ["w2"], "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"], "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}


@dataclass
class IA3Config(AdapterConfig):
    """(IA)³ with PEFT's JSON keys and defaults. PEFT's IA3Config has no layers_to_transform / layers_pattern."""

    feedforward_modules: list[str] | str | None = None  # modules whose *input* is scaled (subset of target_modules)
    fan_in_fan_out: bool = False  # base stores weight as (in, out) (HF Conv1D); set automatically for Conv1D
    init_ia3_weights: bool = True  # True: vectors start at 1 (a no-op); False: random normal
    peft_type: str = "IA3"

    PEFT_TYPE: ClassVar[str] = "IA3"
    DEFAULT_TARGETS: ClassVar[dict[str, list[str]]] = IA3_TARGETS
    FIELD_TYPES: ClassVar[dict[str, str]] = {
        **AdapterConfig.FIELD_TYPES,
        "feedforward_modules": "str_or_list?",
        "fan_in_fan_out": "bool",
        "init_ia3_weights": "bool",
    }
    OMIT_WHEN_EMPTY: ClassVar[frozenset[str]] = AdapterConfig.OMIT_WHEN_EMPTY | {
        "layers_to_transform", "layers_pattern"
    }

    def validate(self) -> None:
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        super().validate()
        if self.layers_to_transform is not None or self.layers_pattern is not None:
            raise ConfigError(
                "IA3Config: layers_to_transform / layers_pattern are not (IA)³ options in PEFT, which would ignore "
                "them; choose the layers with target_modules (a regex or full module paths) instead."
            )
        ff = self.feedforward_modules
        if isinstance(ff, str):
            check_pattern(self.name, "feedforward_modules", ff)
        # When both are lists, every feed-forward name must name targets: one of the target names (PEFT's subset
        # rule) or a trailing part of some (PEFT writes "all-linear" as full paths with feedforward ["down_proj"],
        # a file PEFT itself then refuses to reload; adapterkit reads it).
        if isinstance(ff, list) and isinstance(self.target_modules, list):
            targets = self.target_modules
            extra = sorted(f for f in ff if not any(t == f or t.endswith("." + f) for t in targets))
            if extra:
                raise ConfigError(
                    f"IA3Config: feedforward_modules must be a subset of target_modules; {extra[:5]} "
                    f"{'names' if len(extra) == 1 else 'name'} no target module. Add them to target_modules."
                )

    @classmethod
    def _normalise(cls, kwargs: dict[str, Any]) -> None:
        super()._normalise(kwargs)
        if isinstance(kwargs.get("feedforward_modules"), (set, tuple)):
            kwargs["feedforward_modules"] = sorted(kwargs["feedforward_modules"])

    # -- targeting ------------------------------------------------------------------------------------------
    def resolve_for_model(self, model_type: str | None, paths: list[str]) -> "IA3Config":
        """Fill feedforward_modules from PEFT's per-model default when unset (targets already resolved).

        The default names are narrowed to the target names that carry them, so the saved file passes PEFT's own
        subset check on reload; when narrowing would change which modules count as feed-forward, the default is
        kept as PEFT writes it. `paths`: the model's module paths.
        """
        if self.feedforward_modules is not None:
            return self
        if model_type not in IA3_FEEDFORWARD:
            raise ConfigError(
                f"IA3Config: feedforward_modules is not set and there is no default for model_type={model_type!r}; "
                "pass feedforward_modules=[...] (a subset of target_modules, or [] for none)."
            )
        default = list(IA3_FEEDFORWARD[model_type])
        targets = self.target_modules
        if isinstance(targets, list):
            narrowed = [t for t in targets if any(t.endswith(f) for f in default)]
            wanted = set(targets)
            chosen = [p for p in paths if p and (p in wanted or any(p.endswith("." + t) for t in targets))]
            if all(_ends_with_any(p, default) == _ends_with_any(p, narrowed) for p in chosen):
                default = narrowed
        return self.replace(feedforward_modules=default)

    def is_feedforward(self, module_path: str) -> bool:
        """PEFT's rule: a regex fullmatch, or the path ends with one of the names (plain string suffix)."""
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return check_pattern(self.name, "feedforward_modules", ff).fullmatch(module_path) is not None
        return _ends_with_any(module_path, ff)


def _ends_with_any(path: str, names: list[str]) -> bool:
    return any(path.endswith(n) for n in names)


@dataclass
class IA3Record:
    """One (IA)³ adapter on one layer."""

    feedforward: bool  # scales the layer's input (else its output and bias)


class IA3Linear(AdapterWrapper):
    """(IA)³ around nn.Linear or Conv1D (weight (in, out), so the scaled axis swaps on merge).

    The forward reads `ia3_l` from its ParameterDict at call time (never a cached Parameter), so parameters replaced
    by `load_state_dict(assign=True)` or FSDP2 are the ones used.
    """

    method = "IA3"
    containers = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, view=None) -> None:
        super().__init__(base_layer, view)
        self._set_plain(
            # Hot path: names of live adapters that scale the input / the output.
            _scale_in=(),
            _scale_out=(),
            _unmerged_bias=None,  # the bias object as it was before an output-scaling merge
        )
        self.ia3_l = self._container(nn.ParameterDict)

    # vector shapes PEFT stores, and how they broadcast over activations
    def _vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features) if feedforward else (self.out_features, 1)

    _activation_shape: ClassVar[tuple[int, ...]] = (-1,)  # (..., features)

    def add_adapter(self, name: str, cfg: IA3Config, path: str, ctx: AttachContext | None = None) -> None:
        feedforward = cfg.is_feedforward(path)
        shape = self._vector_shape(feedforward)
        factory = self._factory(ctx)
        if ctx is not None and not ctx.init:
            vector = torch.empty(shape, **factory)  # a strict load fills it
        elif cfg.init_ia3_weights:
            vector = torch.ones(shape, **factory)
        else:
            vector = torch.randn(shape, **factory)
        self.ia3_l[name] = nn.Parameter(vector)
        self.records[name] = IA3Record(feedforward=feedforward)

    def _refresh(self) -> None:
        live = self._live()
        self._set_plain(
            _scale_in=tuple(n for n in live if self.records[n].feedforward),
            _scale_out=tuple(n for n in live if not self.records[n].feedforward),
        )

    def _product(self, names: tuple[str, ...]) -> torch.Tensor:
        params = self._modules["ia3_l"]._parameters
        scale = params[names[0]]
        for name in names[1:]:
            scale = scale * params[name]
        return scale.reshape(self._activation_shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._scale_in:
            scale = self._product(self._scale_in)
            x = (x.to(scale.dtype) * scale).to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        if self._scale_out:
            scale = self._product(self._scale_out)
            out = (out.to(scale.dtype) * scale).to(out.dtype)
        return out

    # -- merge: W scaled along one axis -----------------------------------------------------------------------
    def _weight_scale(self, name: str) -> torch.Tensor:
        """ia3_l of `name` as a float32 tensor broadcasting over the stored weight."""
        vector = self.ia3_l[name].detach().float().flatten()
        scales_rows = self.records[name].feedforward == self.fan_in_fan_out  # rows: out (linear) or in (Conv1D)
        return vector[:, None] if scales_rows else vector[None, :]

    def add_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return weight * self._weight_scale(name)

    def add_delta_(self, weight: torch.Tensor, name: str) -> None:
        weight.mul_(self._weight_scale(name))

    def delta_weight(self, name: str) -> torch.Tensor:
        weight = self.view.float_weight(self.base_layer)
        return weight * (self._weight_scale(name) - 1)

    def max_delta_bound(self, name: str) -> float:
        vector = self.ia3_l[name].detach().float()
        if not torch.isfinite(vector).all():
            return math.inf
        weight = self.view.float_weight(self.base_layer)
        return float(weight.abs().max() * (vector - 1).abs().max())

    def merge(self, names: tuple[str, ...], keep_original: bool = True, shared: bool = True) -> None:
        scaling_out = tuple(n for n in names if n not in self.merged_names and not self.records[n].feedforward)
        super().merge(names, keep_original=keep_original, shared=shared)
        base = self.base_layer
        bias = getattr(base, "bias", None)
        if not scaling_out or bias is None:
            return
        if self._unmerged_bias is None and keep_original:
            self._unmerged_bias = bias  # a Parameter: registered on the wrapper while merged, so .to() moves it
        merged = bias.detach().float()
        for name in scaling_out:
            merged = merged * self.ia3_l[name].detach().float().flatten()
        base.bias = nn.Parameter(merged.to(bias.dtype), requires_grad=bias.requires_grad)

    def unmerge(self) -> None:
        super().unmerge()
        if self._unmerged_bias is not None:
            self.base_layer.bias = self._unmerged_bias
            self._unmerged_bias = None

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}


class IA3Conv2d(IA3Linear):
    """(IA)³ around nn.Conv2d: `ia3_l` (1, channels, 1, 1) scales input or output channels."""

    _activation_shape: ClassVar[tuple[int, ...]] = (1, -1, 1, 1)  # (batch, channels, h, w)

    def _vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features if feedforward else self.out_features, 1, 1)

    def _weight_scale(self, name: str) -> torch.Tensor:
        """Over the weight (out, in / groups, kh, kw): output channels, or each group's own input channels."""
        vector = self.ia3_l[name].detach().float().flatten()
        base = self.base_layer
        if not self.records[name].feedforward:
            return vector.view(-1, 1, 1, 1)
        groups = base.groups
        per_in, per_out = base.in_channels // groups, base.out_channels // groups
        # Output channel o belongs to group o // per_out and sees that group's inputs.
        grouped = vector.view(groups, 1, per_in).expand(groups, per_out, per_in)
        return grouped.reshape(base.out_channels, per_in, 1, 1)
