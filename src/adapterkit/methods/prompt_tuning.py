"""Prompt tuning (Lester et al., 2021): `num_virtual_tokens` trained embeddings put in front of every input, on the
user's own model. Config, the holder of the embeddings, and the forward pre-hook that prepends them.

No layer changes its computation, so the method has no layer table: its `plan` names the input embedding, where the
holder (`PromptHolder`, a wrapper whose forward is the embedding's own) keeps `prompt_embeddings` (n, dim), and the
holder registers a forward pre-hook on the model. On a call without a filled KV cache the hook turns `input_ids`
into `inputs_embeds` with the prompt in front, and prepends n labels of -100; on every call it prepends n ones to a
2-D `attention_mask` and drops `position_ids` / `cache_position` (the model recounts them from the inputs and the
cache, which holds the virtual tokens), as PEFT does. Logits therefore have n more positions, as PEFT's; `generate`
returns only real tokens. PEFT's file: one tensor `prompt_embeddings` (no module prefix).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError, TargetError
from .base import AdapterWrapper, AttachContext

INITS = ("RANDOM", "TEXT")
IGNORE_INDEX = -100


@dataclass
class PromptTuningConfig(AdapterConfig):
    """PEFT's PromptTuningConfig keys and defaults (causal LMs: one transformer submodule)."""

    num_virtual_tokens: int | None = None  # prompt length (required)
    token_dim: int | None = None  # hidden size (filled from the model)
    num_transformer_submodules: int | None = None  # 1 for decoder-only models (filled)
    num_attention_heads: int | None = None  # recorded for PEFT (filled)
    num_layers: int | None = None  # recorded for PEFT (filled)
    prompt_tuning_init: str = "RANDOM"  # "RANDOM" (normal(0, 1)) or "TEXT" (embeddings of prompt_tuning_init_text)
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None  # where TEXT init finds the tokenizer (default: the model's path)
    tokenizer_kwargs: dict | None = None
    peft_type: str = "PROMPT_TUNING"

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"
    FIELD_TYPES: ClassVar[dict[str, str]] = {
        **AdapterConfig.FIELD_TYPES, "num_virtual_tokens": "int?", "token_dim": "int?",
        "num_transformer_submodules": "int?", "num_attention_heads": "int?", "num_layers": "int?",
        "prompt_tuning_init": "str", "prompt_tuning_init_text": "str?", "tokenizer_name_or_path": "str?",
        "tokenizer_kwargs": "any",
    }
    OMIT_WHEN_EMPTY: ClassVar[frozenset[str]] = AdapterConfig.OMIT_WHEN_EMPTY | {
        "target_modules", "modules_to_save", "layers_to_transform", "layers_pattern"}

    def validate(self) -> None:
        super().validate()
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= 4096:
            raise ConfigError(f"num_virtual_tokens must be an integer in 1..4096, got {n!r}.")
        if str(self.prompt_tuning_init).upper() not in INITS:
            raise ConfigError(f"prompt_tuning_init={self.prompt_tuning_init!r} is not supported; choose 'RANDOM' or "
                              "'TEXT'.")
        if str(self.prompt_tuning_init).upper() == "TEXT" and not self.prompt_tuning_init_text:
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text.")
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError("prompt tuning is supported on decoder-only models (num_transformer_submodules=1), got "
                              f"{self.num_transformer_submodules!r}.")
        if self.target_modules or self.modules_to_save:
            raise ConfigError("prompt tuning adapts no module: leave target_modules and modules_to_save unset.")


def plan(model: nn.Module, cfg: PromptTuningConfig):
    """(config with the model's sizes filled in, [(input embedding path, module, PromptHolder)])."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    path = next((p for p, m in model.named_modules() if m is embed or getattr(m, "base_layer", None) is embed), None)
    if embed is None or path is None or not isinstance(embed, nn.Embedding):
        raise TargetError(f"prompt tuning needs a model with an nn.Embedding input embedding (get_input_embeddings); "
                          f"{type(model).__name__} has none.")
    mcfg = getattr(model, "config", None)
    text = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    if getattr(text, "is_encoder_decoder", False):
        raise TargetError("prompt tuning is supported on decoder-only models; this one is an encoder-decoder.")
    if cfg.prompt_tuning_init.upper() == "TEXT":
        source = cfg.tokenizer_name_or_path or getattr(mcfg, "_name_or_path", None)
        if not source or not os.path.isdir(source):  # checked before the model is touched
            raise ConfigError(f"prompt_tuning_init='TEXT' needs a local tokenizer directory; tokenizer_name_or_path="
                              f"{source!r} is not one (adapterkit does not download).")
        cfg = cfg.replace(tokenizer_name_or_path=source)
    cfg = cfg.replace(token_dim=embed.embedding_dim, num_transformer_submodules=1,
                      num_attention_heads=cfg.num_attention_heads or getattr(text, "num_attention_heads", None),
                      num_layers=cfg.num_layers or getattr(text, "num_hidden_layers", None))
    return cfg, [(path, model.get_submodule(path), PromptHolder)]


@dataclass
class PromptRecord:
    n: int  # virtual tokens


class PromptHolder(AdapterWrapper):
    """The input embedding, unchanged, holding each adapter's `prompt_embeddings` (n, dim); owns the model hook."""

    method = "PROMPT_TUNING"
    containers = ("prompt_embeddings",)

    def __init__(self, base_layer: nn.Embedding, view=None) -> None:
        super().__init__(base_layer, view)
        self.prompt_embeddings = self._container(nn.ParameterDict)
        self._set_plain(_live_prompt=None, _hook=None)

    def add_adapter(self, name: str, cfg: PromptTuningConfig, path: str, ctx: AttachContext | None = None) -> None:
        model = ctx.shared.get("model") if ctx is not None else None
        if model is None:
            raise TargetError("prompt tuning is attached with adapterkit.attach (it hooks the model's forward).")
        n, dim = cfg.num_virtual_tokens, self.base_layer.embedding_dim
        factory = self._factory(ctx)
        factory["dtype"] = ctx.dtype or torch.float32  # PEFT keeps prompt embeddings in float32
        if ctx is not None and not ctx.init:
            weight = torch.empty(n, dim, **factory)
        elif cfg.prompt_tuning_init.upper() == "TEXT":
            weight = self._text_init(model, cfg, n).to(**factory)
        else:
            weight = torch.randn(n, dim, **factory)  # nn.Embedding's own init
        self.prompt_embeddings[name] = nn.Parameter(weight)
        self.records[name] = PromptRecord(n=n)
        if self._hook is None:
            self._set_plain(_hook=model.register_forward_pre_hook(self._prepend, with_kwargs=True))

    def _text_init(self, model: nn.Module, cfg: PromptTuningConfig, n: int) -> torch.Tensor:
        from transformers import AutoTokenizer  # optional dependency: only for TEXT init

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path, **{k: v for k, v in (cfg.tokenizer_kwargs or {}).items()
                                                             if k != "trust_remote_code"})
        ids = tokenizer(cfg.prompt_tuning_init_text)["input_ids"]
        ids = (ids * math.ceil(n / len(ids)))[:n]  # truncated, or repeated to fill n (PEFT's rule)
        with torch.no_grad():
            return self.base_layer(torch.tensor(ids, device=self.base_layer.weight.device)).detach().float()

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        if not self.records and self._hook is not None:
            self._hook.remove()
            self._set_plain(_hook=None)

    def _refresh(self) -> None:
        live = self._live()
        self._set_plain(_live_prompt=live[0] if live else None)  # one prompt at a time: the first active one

    def forward(self, *args, **kwargs):
        return self.base_layer(*args, **kwargs)

    def _prepend(self, module: nn.Module, args: tuple, kwargs: dict):
        name = self._live_prompt
        if name is None:
            return None
        if args:  # model(input_ids, ...) positionally
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        prompt = self._modules["prompt_embeddings"]._parameters[name]  # (n, dim)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        batch = (ids if ids is not None else embeds).shape[0]
        n = prompt.shape[0]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 generate passes `cache`
        prefill = cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (B, n + T)
        kwargs["position_ids"] = None
        kwargs.pop("cache_position", None)
        if prefill:
            if embeds is None:
                embeds = self.base_layer(ids)  # (B, T, dim)
            kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
            kwargs["input_ids"] = None
            labels = kwargs.get("labels")
            if labels is not None:
                kwargs["labels"] = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
        return args, kwargs

    # -- no weight changes: nothing to merge ------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        return torch.zeros_like(self.base_layer.weight, dtype=torch.float32)

    def max_delta_bound(self, name: str) -> float:
        return 0.0

    def merge(self, names: tuple[str, ...], keep_original: bool = True, shared: bool = True) -> None:
        if any(n in self.records for n in names):
            raise ConfigError("a prompt-tuning adapter cannot be merged into the weights; it prepends embeddings.")

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {}

    def adapter_level_tensors(self, name: str) -> dict[str, torch.Tensor]:
        # PEFT's key has no module path: the prompt belongs to the whole model.
        return {"prompt_embeddings": self._modules["prompt_embeddings"]._parameters[name]}

    @property
    def num_virtual_tokens(self) -> Any:
        return {n: r.n for n, r in self.records.items()}


def summary(cfg: PromptTuningConfig, tensors: dict) -> list[tuple[str, str]]:
    """`adapterkit inspect` rows."""
    init = cfg.prompt_tuning_init + (f" {cfg.prompt_tuning_init_text!r}" if cfg.prompt_tuning_init_text else "")
    return [("method", f"PROMPT_TUNING ({cfg.num_virtual_tokens} virtual tokens of {cfg.token_dim}, init {init})")]
