"""`LoraConfig`: LoRA's (and DoRA's) configuration, with PEFT's JSON keys, defaults and value rules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import MAX_ALPHA, MAX_LIST_ITEMS, MAX_RANK, AdapterConfig, check_pattern_dict
from ..errors import ConfigError
from .lora_init import is_residual_init

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")  # and "pissa_niter_<N>" (lora_init.py)


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al., 2021): W x + (alpha / r) * B A x, with A (r, in) and B (out, r); DoRA with use_dora=True.

    Field names, meanings and defaults are PEFT's, so `adapter_config.json` is interchangeable.
    """

    r: int = 8  # rank of the update
    lora_alpha: float = 8  # scaling numerator: scale = lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter's input (training only)
    fan_in_fan_out: bool = False  # base stores weight as (in, out) (HF Conv1D); set automatically for Conv1D
    bias: str = "none"  # only "none" is supported: base biases stay frozen
    use_rslora: bool = False  # rank-stabilised scaling lora_alpha / sqrt(r)
    init_lora_weights: bool | str = True  # True: B = 0 (no-op at start); "gaussian"; False: random non-zero B
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-module rank overrides (regex keys)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-module alpha overrides (regex keys)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None  # rows of the embedding to train
    use_dora: bool = False  # weight-decomposed LoRA (Liu et al., 2024): a trained magnitude per output row
    lora_bias: bool = False  # a trainable bias on lora_B: not implemented yet, refused when True
    target_parameters: list[str] | None = None  # bare parameters to adapt, e.g. fused MoE experts (lora_param.py)
    ensure_weight_tying: bool = False  # accepted for compatibility: adapterkit always keeps ties consistent
    peft_type: str = "LORA"

    PEFT_TYPE: ClassVar[str] = "LORA"
    PATTERN_DICT_KEYS: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")
    FIELD_TYPES: ClassVar[dict[str, str]] = {
        **AdapterConfig.FIELD_TYPES,
        "r": "int",
        "lora_alpha": "number",
        "lora_dropout": "number",
        "fan_in_fan_out": "bool",
        "bias": "str",
        "use_rslora": "bool",
        "init_lora_weights": "any",  # checked against INIT_CHOICES below
        "rank_pattern": "dict",
        "alpha_pattern": "dict",
        "trainable_token_indices": "any",  # list or dict, checked below
        "use_dora": "bool",
        "lora_bias": "bool",
        "ensure_weight_tying": "bool",
        "target_parameters": "str_list?",
    }
    UNSUPPORTED_WHEN_SET: ClassVar[dict[str, Any]] = {
        "layer_replication": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "monteclora_config": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        "megatron_config": None,
    }
    PASSTHROUGH_KEYS: ClassVar[frozenset[str]] = AdapterConfig.PASSTHROUGH_KEYS | {"qalora_group_size"}
    OMIT_WHEN_EMPTY: ClassVar[frozenset[str]] = AdapterConfig.OMIT_WHEN_EMPTY | {
        "trainable_token_indices", "ensure_weight_tying", "lora_bias", "target_parameters"
    }

    def validate(self) -> None:
        super().validate()
        if self.r <= 0 or self.r > MAX_RANK:
            raise ConfigError(f"r must be a positive integer up to {MAX_RANK}, got {self.r!r}.")
        if not abs(self.lora_alpha) <= MAX_ALPHA:
            raise ConfigError(f"lora_alpha must be a number from -{MAX_ALPHA:g} to {MAX_ALPHA:g}, got {self.lora_alpha!r}.")
        if not (0.0 <= self.lora_dropout < 1.0):
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias != "none":
            raise ConfigError(
                f"bias={self.bias!r} is not supported yet: adapterkit keeps base biases frozen (bias='none'). "
                "Use modules_to_save for the modules whose bias should train."
            )
        if self.lora_bias:
            raise ConfigError(
                "lora_bias=True is a PEFT feature adapterkit does not support yet; loading or training without it "
                "would give different outputs. Use plain LoRA (set it to False)."
            )
        if not any(self.init_lora_weights is c or (isinstance(c, str) and self.init_lora_weights == c)
                   for c in INIT_CHOICES) and not is_residual_init(self.init_lora_weights):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; choose one of True, False, "
                "'gaussian', 'pissa', 'pissa_niter_<N>' (N iterations, 1-9999) or 'olora'."
            )
        check_pattern_dict(self.name, "rank_pattern", self.rank_pattern, lambda v: isinstance(v, int) and not isinstance(v, bool)
                        and 0 < v <= MAX_RANK, f"a positive integer up to {MAX_RANK}")
        check_pattern_dict(self.name, "alpha_pattern", self.alpha_pattern, lambda v: isinstance(v, (int, float))
                        and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= MAX_ALPHA,
                        f"a number from -{MAX_ALPHA:g} to {MAX_ALPHA:g}")
        if self.trainable_token_indices is not None:
            _check_token_indices(self.trainable_token_indices)
        if self.target_parameters:
            if len(self.target_parameters) > MAX_LIST_ITEMS:
                raise ConfigError(f"target_parameters has {len(self.target_parameters):,} entries; at most "
                                  f"{MAX_LIST_ITEMS:,} are accepted.")
            for key, bad in (("lora_dropout", self.lora_dropout != 0), ("use_dora", self.use_dora),
                             ("init_lora_weights", is_residual_init(self.init_lora_weights))):
                if bad:
                    raise ConfigError(f"target_parameters cannot be combined with {key}={getattr(self, key)!r} (the "
                                      "delta is added to the parameter, so there is no input to drop out, no "
                                      "weight to decompose or to initialise from); leave it at its default.")

    # -- what layers read -------------------------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        return int(self.pattern_value(self.rank_pattern, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return self.pattern_value(self.alpha_pattern, module_path, self.lora_alpha)

    def scaling_for(self, module_path: str) -> float:
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _check_token_indices(value: Any) -> None:
    """`trainable_token_indices`: a list of row indices (the input embedding) or {module name: list of indices}."""
    if not isinstance(value, (list, tuple, dict)):
        raise ConfigError(
            f"trainable_token_indices must be a list of token ids or a dict of module name -> list, got {value!r}."
        )
    groups = value.items() if isinstance(value, dict) else [("", value)]
    for key, indices in groups:
        where = f"trainable_token_indices[{key!r}]" if key else "trainable_token_indices"
        if not isinstance(key, str) or not isinstance(indices, (list, tuple)) or not indices:
            raise ConfigError(
                f"{where} must be a non-empty list of token ids (or a dict of module name -> list), got {indices!r}."
            )
        if len(indices) > MAX_LIST_ITEMS:
            raise ConfigError(f"{where} lists {len(indices):,} token ids; at most {MAX_LIST_ITEMS:,} are accepted.")
        bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if bad:
            raise ConfigError(f"{where} must hold non-negative integer token ids; got {bad[:5]!r}.")
        if len(set(indices)) != len(indices):
            raise ConfigError(f"{where} lists a token id twice; list each id once.")
