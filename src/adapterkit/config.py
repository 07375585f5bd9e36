"""Adapter method configurations: dataclasses with PEFT's JSON keys and defaults.

`LoraConfig` reads and writes `adapter_config.json` exactly as PEFT names its fields, keeps keys from newer PEFT
versions it does not know (and reports them), and refuses features it does not implement instead of ignoring them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# Keys PEFT may write whose feature adapterkit does not implement. A file that uses one (value differs from PEFT's
# default) is refused: loading it while ignoring the feature would give silently different outputs.
_UNSUPPORTED_WHEN_SET: dict[str, Any] = {
    "layer_replication": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "megatron_config": None,
}

# PEFT keys that carry no behaviour for adapterkit; they are accepted with any value and written back unchanged.
_PASSTHROUGH_KEYS = {"megatron_core", "qalora_group_size", "auto_mapping", "peft_version", "runtime_config"}

# Default `target_modules` per `config.model_type` when the user gives none (the same choices PEFT makes).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
}

INIT_CHOICES = (True, False, "gaussian")


@dataclass
class LoraConfig:
    """LoRA (Hu et al., 2021): W x + (alpha / r) * B A x, with A (r, in) and B (out, r).

    Field names, meanings and defaults are PEFT's, so `adapter_config.json` is interchangeable.
    """

    r: int = 8  # rank of the update
    lora_alpha: float = 8  # scaling numerator: scale = lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter's input (training only)
    target_modules: list[str] | str | None = None  # list: exact path or ".name" suffix; str: regex fullmatch
    exclude_modules: list[str] | str | None = None  # same matching rules, applied first
    fan_in_fan_out: bool = False  # base stores weight as (in, out) (HF Conv1D); set automatically for Conv1D
    bias: str = "none"  # only "none" is supported: base biases stay frozen
    use_rslora: bool = False  # rank-stabilised scaling lora_alpha / sqrt(r)
    modules_to_save: list[str] | None = None  # whole modules trained and saved as full copies
    init_lora_weights: bool | str = True  # True: B = 0 (no-op at start); "gaussian"; False: random non-zero B
    layers_to_transform: list[int] | int | None = None  # only these layer indices
    layers_pattern: list[str] | str | None = None  # name of the layer list, e.g. "layers" or "h"
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-module rank overrides (regex keys)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-module alpha overrides (regex keys)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None  # rows of the embedding to train
    use_dora: bool = False  # weight-decomposed LoRA: not implemented yet, refused when True
    lora_bias: bool = False  # a trainable bias on lora_B: not implemented yet, refused when True
    ensure_weight_tying: bool = False  # accepted for compatibility: adapterkit always keeps ties consistent
    task_type: str | None = None
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    # Keys of a newer PEFT that adapterkit does not know: kept, written back, and reported on load.
    unknown_keys: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Known PEFT keys that carry nothing for adapterkit, preserved verbatim.
    passthrough: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        if str(self.peft_type).upper() != "LORA":
            raise ConfigError(f"LoraConfig got peft_type={self.peft_type!r}; expected 'LORA'.")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}.")
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias != "none":
            raise ConfigError(
                f"bias={self.bias!r} is not supported yet: adapterkit keeps base biases frozen (bias='none'). "
                "Use modules_to_save for the modules whose bias should train."
            )
        for name in ("use_dora", "lora_bias"):
            if getattr(self, name):
                raise ConfigError(
                    f"{name}=True is a PEFT feature adapterkit does not support yet; "
                    "loading or training without it would give different outputs. Use plain LoRA (set it to False)."
                )
        if self.init_lora_weights not in INIT_CHOICES:
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; choose one of True, False, 'gaussian'."
            )
        for pattern_name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, pattern_name)
            if not isinstance(value, dict):
                raise ConfigError(f"{pattern_name} must be a dict of module pattern -> value, got {value!r}.")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}.")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is only used together with layers_to_transform; set both or neither.")
        if self.trainable_token_indices is not None:
            _check_token_indices(self.trainable_token_indices)

    # -- scaling ----------------------------------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return _pattern_value(self.alpha_pattern, module_path, self.lora_alpha)

    def scaling_for(self, module_path: str) -> float:
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content. Optional newer keys are only written when set, so older PEFTs read it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("unknown_keys", "passthrough"):
                continue
            value = getattr(self, f.name)
            if f.name in ("exclude_modules", "trainable_token_indices", "ensure_weight_tying", "lora_bias") and not value:
                continue
            if isinstance(value, (set, tuple)):
                value = sorted(value)
            out[f.name] = value
        out.update(self.passthrough)
        out.update(self.unknown_keys)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"an adapter config must be a JSON object, got {type(data).__name__}.")
        peft_type = str(data.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise ConfigError(
                f"peft_type {peft_type!r} is not supported by this version of adapterkit (supported: 'LORA')."
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"unknown_keys", "passthrough"}
        kwargs: dict[str, Any] = {}
        unknown: dict[str, Any] = {}
        passthrough: dict[str, Any] = {}
        for key, value in data.items():
            if key in _UNSUPPORTED_WHEN_SET:
                if value not in (_UNSUPPORTED_WHEN_SET[key], None, {}, [], False):
                    raise ConfigError(
                        f"this adapter uses {key}={value!r}, a PEFT feature adapterkit does not support yet; "
                        "loading it without that feature would give different outputs."
                    )
                continue
            if key in _PASSTHROUGH_KEYS:
                passthrough[key] = value
            elif key in names:
                kwargs[key] = value
            else:
                unknown[key] = value
        if isinstance(kwargs.get("target_modules"), (set, tuple)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        kwargs["peft_type"] = "LORA"
        for key in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(key) is None:
                kwargs[key] = {}
        cfg = cls(**kwargs)
        cfg.unknown_keys = unknown
        cfg.passthrough = passthrough
        return cfg

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LoraConfig":
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "LoraConfig":
        new = dataclasses.replace(self, **changes)
        new.unknown_keys = dict(self.unknown_keys)
        new.passthrough = dict(self.passthrough)
        return new


def _check_token_indices(value: Any) -> None:
    """`trainable_token_indices`: a list of row indices (the input embedding) or {module name: list of indices}."""
    groups = value.items() if isinstance(value, dict) else [("", value)]
    for key, indices in groups:
        where = f"trainable_token_indices[{key!r}]" if key else "trainable_token_indices"
        if not isinstance(key, str) or not isinstance(indices, (list, tuple)) or not indices:
            raise ConfigError(
                f"{where} must be a non-empty list of token ids (or a dict of module name -> list), got {indices!r}."
            )
        bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if bad:
            raise ConfigError(f"{where} must hold non-negative integer token ids; got {bad[:5]!r}.")
        if len(set(indices)) != len(indices):
            raise ConfigError(f"{where} lists a token id twice; list each id once.")


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern rule: the first key K with `(.*\\.)?(K)$` matching the module path wins."""
    if not patterns:
        return default
    import re

    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


CONFIG_CLASSES: dict[str, type] = {"LORA": LoraConfig}
