"""The method table: which `peft_type` has which config class and which layer wrapper per base-layer kind.

Everything that depends on the method (reading a config, `attach`, targeting, `load`, the CLI) asks this table; no
other file names a method. Adding a method is one file in this folder plus one `register(Method(...))` line below.

    method = method_for(config)               # by the config's class
    method = METHODS["LORA"]                  # by peft_type
    wrapper_class = method.layer_for(kind)    # kind: a base-layer view's kind ("linear", "conv1d", "embedding", ...)
    config = config_from_dict(json_dict)      # the right config class for the file's peft_type
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import AdapterConfig, read_json
from ..errors import ConfigError
from .adalora import AdaLoraConfig, AdaLoraLinear
from .adalora import summary as adalora_summary
from .base import AdapterWrapper
from .ia3 import IA3Config, IA3Conv2d, IA3Linear
from .ia3_bnb import IA3BnbLinear
from .lora import LoraEmbedding, LoraLinear
from . import loha, lokr
from .loha import LoHaConfig, LoHaLayer
from .lokr import LoKrConfig, LoKrLayer
from .lora_config import LoraConfig
from .lora_param import LoraParam
from .oft import OFTConfig, OFTConv2d, OFTEmbedding, OFTLinear
from .prompt_tuning import PromptTuningConfig
from .prompt_tuning import plan as prompt_tuning_plan
from .prompt_tuning import summary as prompt_tuning_summary
from .vera import VeraConfig, VeraLinear


@dataclass(frozen=True)
class Method:
    """One adapter method.

    peft_type: the `peft_type` of its files. config: its config class. layers: base-layer kind -> wrapper class.
    summary: optional `(config, tensors) -> list of (label, text)` rows for `adapterkit inspect`.
    plan: for a method that targets no layers by the config's targeting fields (prompt tuning): `(model, config) ->
        (config, [(path, module, wrapper class)])`, used by `attach` instead of the target search.
    """

    peft_type: str
    config: type[AdapterConfig]
    layers: dict[str, type[AdapterWrapper]]
    summary: Callable[[Any, dict], list[tuple[str, str]]] | None = field(default=None, compare=False)
    plan: Callable[[Any, Any], tuple[Any, list]] | None = field(default=None, compare=False)

    def layer_for(self, kind: str) -> type[AdapterWrapper] | None:
        return self.layers.get(kind)

    def kinds(self) -> str:
        return ", ".join(sorted(self.layers))


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method in the table; returns it."""
    METHODS[method.peft_type] = method
    return method


def unregister(peft_type: str) -> None:
    METHODS.pop(peft_type, None)


def method_for(config: Any) -> Method:
    """The method of a config object; ConfigError for anything that is not a registered method's config."""
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    for method in METHODS.values():
        if isinstance(config, method.config):
            return method
    raise ConfigError(
        f"expected an adapter config ({', '.join(m.config.__name__ for m in METHODS.values())}), "
        f"got {type(config).__name__}."
    )


def config_from_dict(data: Any) -> AdapterConfig:
    """The config object for an `adapter_config.json` content, by its `peft_type` (PEFT's default: LORA)."""
    if not isinstance(data, dict):
        raise ConfigError(f"an adapter config must be a JSON object, got {type(data).__name__}.")
    peft_type = data.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise ConfigError(f"peft_type must be a string, got {peft_type!r}.")
    method = METHODS.get(peft_type.upper())
    if method is None:
        raise ConfigError(
            f"peft_type {peft_type[:40]!r} is not supported by this version of adapterkit "
            f"(supported: {', '.join(sorted(METHODS))})."
        )
    return method.config.from_dict(data)


def config_from_file(path: str | Path) -> AdapterConfig:
    return config_from_dict(read_json(path))


# -- the table -----------------------------------------------------------------------------------------------------
register(Method("LORA", LoraConfig, {"linear": LoraLinear, "conv1d": LoraLinear, "embedding": LoraEmbedding,
                                     # quantized linears (quantized.py): LoRA and DoRA over the dequantized weight
                                     "bnb4bit": LoraLinear, "bnb8bit": LoraLinear, "torchao": LoraLinear,
                                     "parameter": LoraParam}))
register(Method("LOHA", LoHaConfig, {"linear": LoHaLayer, "conv2d": LoHaLayer}, summary=loha.summary))
register(Method("LOKR", LoKrConfig, {"linear": LoKrLayer, "conv2d": LoKrLayer}, summary=lokr.summary))
register(Method("IA3", IA3Config, {"linear": IA3Linear, "conv1d": IA3Linear, "conv2d": IA3Conv2d,
                                   "bnb4bit": IA3BnbLinear, "bnb8bit": IA3BnbLinear}))
register(Method("VERA", VeraConfig, {"linear": VeraLinear, "conv1d": VeraLinear}))
register(Method("OFT", OFTConfig, {"linear": OFTLinear, "conv2d": OFTConv2d, "embedding": OFTEmbedding}))
register(Method("ADALORA", AdaLoraConfig, {"linear": AdaLoraLinear, "conv1d": AdaLoraLinear,
                                           "bnb4bit": AdaLoraLinear, "bnb8bit": AdaLoraLinear},
                summary=adalora_summary))
register(Method("PROMPT_TUNING", PromptTuningConfig, {}, plan=prompt_tuning_plan, summary=prompt_tuning_summary))
