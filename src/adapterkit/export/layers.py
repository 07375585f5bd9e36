"""An adapter directory as a list of plain LoRA layers: exactly from the file, or by truncated SVD of each update.

A plain LoRA file converts without the base. DoRA and other methods change the weight in ways plain LoRA cannot
express; with `convert="svd"` and a base model each layer's update is computed on the base and approximated at the
adapter's rank (the relative error per layer is reported). modules_to_save and trainable tokens are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.format import KEY_PREFIX
from ..checkpoint.load import load, read_adapter
from ..config import AdapterConfig
from ..errors import ConfigError
from ..methods.lora import LoraEmbedding, LoraLinear
from ..methods.lora_config import LoraConfig
from ..state import adapter_state
from ..verbs import delete
from .svd import truncated_lora

_SUFFIXES = {"lora_A.weight": ("linear", "a"), "lora_B.weight": ("linear", "b"),
             "lora_embedding_A": ("embedding", "a"), "lora_embedding_B": ("embedding", "b")}


@dataclass
class Layer:
    """One module's update s·B·A. Linear: a (r, in), b (out, r). Embedding (PEFT's layout): a (r, num), b (dim, r)."""

    path: str
    kind: str  # "linear" | "embedding"
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Adapter:
    """What an exporter writes: the source config, its layers, and notes on what the conversion changed."""

    folder: Path
    config: AdapterConfig
    layers: list[Layer]
    metadata: dict
    svd_errors: dict[str, float] = field(default_factory=dict)  # module path -> relative error (SVD only)
    notes: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32  # the file's tensor dtype (exports keep it)
    overall_error: float | None = None  # ‖Δ − Δ̂‖ / ‖Δ‖ over all converted layers (None: nothing approximated)


def read_lora(adapter_dir: str | os.PathLike, base: nn.Module | None = None, convert: str | None = None,
              rank: int | None = None) -> Adapter:
    """The adapter at `adapter_dir` as plain LoRA layers (see the module docstring)."""
    if convert not in (None, "svd"):
        raise ConfigError(f"convert must be None or 'svd', got {convert!r}.")
    folder, cfg, tensors, metadata = read_adapter(adapter_dir)
    reason = _not_plain(cfg, tensors)
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    if reason is None:
        return Adapter(folder, cfg, _plain_layers(folder, cfg, tensors), metadata, dtype=dtype)
    if convert != "svd":
        raise ConfigError(
            f"{folder}: {reason}, which plain LoRA cannot express exactly. Pass convert='svd' (and the base model) "
            "to approximate each layer's update by a truncated SVD at the adapter's rank; the relative error per "
            "layer is reported."
        )
    if base is None:
        raise ConfigError(f"{folder}: {reason}; converting it by SVD needs the base model (base=...) to compute "
                          "each layer's update.")
    adapter = _svd_layers(folder, cfg, metadata, base, rank or int(getattr(cfg, "r", 0) or 16), reason)
    adapter.dtype = dtype
    return adapter


def _not_plain(cfg: AdapterConfig, tensors: dict) -> str | None:
    if type(cfg) is not LoraConfig:
        return f"it is a {cfg.peft_type} adapter"
    if cfg.modules_to_save:
        return "it has modules_to_save (full module copies)"
    if cfg.trainable_token_indices is not None:
        return "it has trainable tokens (replaced embedding rows)"
    if cfg.use_dora or any(k.endswith("lora_magnitude_vector") for k in tensors):
        return "it is DoRA (each row of the merged weight is renormalised)"
    return None


def _plain_layers(folder: Path, cfg: LoraConfig, tensors: dict) -> list[Layer]:
    parts: dict[str, dict] = {}
    for key, value in tensors.items():
        inner = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
        match = None if inner is None else next((s for s in _SUFFIXES if inner.endswith("." + s)), None)
        if match is None:
            raise ConfigError(f"{folder}: {key} is not a LoRA factor (lora_A / lora_B / lora_embedding_A / _B).")
        kind, which = _SUFFIXES[match]
        path = inner[: -len(match) - 1]
        entry = parts.setdefault(path, {"kind": kind})
        if entry["kind"] != kind:
            raise ConfigError(f"{folder}: {path} has both linear and embedding LoRA factors.")
        entry[which] = value
    layers = []
    for path in sorted(parts):
        entry = parts[path]
        if "a" not in entry or "b" not in entry:
            raise ConfigError(f"{folder}: {path} has only one of its two LoRA factors.")
        a, b = entry["a"], entry["b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(f"{folder}: {path} factors {tuple(a.shape)} / {tuple(b.shape)} do not multiply.")
        if cfg.rank_for(path) != a.shape[0]:
            raise ConfigError(f"{folder}: {path} has rank {a.shape[0]}, the config says {cfg.rank_for(path)}.")
        layers.append(Layer(path, entry["kind"], a, b, cfg.scaling_for(path)))
    return layers


def _svd_layers(folder: Path, cfg: AdapterConfig, metadata: dict, base: nn.Module, rank: int, reason: str) -> Adapter:
    name = "_export"
    state = adapter_state(base)
    if state is not None and name in state.configs:
        raise ConfigError(f"the base model already has an adapter named {name!r}; pass a plain base model.")
    load(base, folder, name=name)
    try:
        state = adapter_state(base)
        layers, errors = [], {}
        total_sq = err_sq = 0.0
        for path, wrapper in state.wrappers.items():
            if name not in wrapper.adapter_names:
                continue
            if wrapper.method in ("modules_to_save", "trainable_tokens"):
                raise ConfigError(
                    f"{folder}: {path} is a {wrapper.method} layer (not a low-rank update); engines that read plain "
                    "LoRA cannot serve it. Retrain without it, or merge the adapter into the base instead."
                )
            record = wrapper.records[name]
            if isinstance(wrapper, (LoraLinear, LoraEmbedding)) and not record.use_dora:
                kind = "embedding" if isinstance(wrapper, LoraEmbedding) else "linear"
                a, b = wrapper.factors(name) if kind == "embedding" else (
                    wrapper.lora_A[name].weight, wrapper.lora_B[name].weight)
                layers.append(Layer(path, kind, a.detach().clone(), b.detach().clone(), record.scaling))
                continue
            delta = wrapper.delta_weight(name)  # float32 in the base weight's layout
            kind = "embedding" if wrapper.view.kind == "embedding" else "linear"
            if kind == "embedding" or wrapper.view.fan_in_fan_out:
                delta = delta.T  # embedding: B A = Δᵀ (dim, num); Conv1D: stored (in, out)
            a, b, error = truncated_lora(delta, rank)
            errors[path] = error
            norm_sq = float(delta.norm()) ** 2
            total_sq += norm_sq
            err_sq += (error**2) * norm_sq
            layers.append(Layer(path, kind, a, b, 1.0))
    finally:
        delete(base, name)
    overall = (err_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    return Adapter(folder, cfg, layers, metadata, errors,
                   [f"{reason}: converted to plain LoRA of rank {rank} by truncated SVD"], overall_error=overall)


def truncate(adapter: Adapter, rank: int) -> None:
    """Layers above `rank` replaced in place by the truncated SVD of their update s·B·A (errors recorded)."""
    total_sq = err_sq = 0.0
    for i, layer in enumerate(adapter.layers):
        if layer.rank <= rank:
            continue
        delta = (layer.b.float() @ layer.a.float()) * layer.scaling  # (out, in), or (dim, num) for an embedding
        a, b, error = truncated_lora(delta, rank)
        adapter.layers[i] = Layer(layer.path, layer.kind, a, b, 1.0)
        adapter.svd_errors[layer.path] = error
        norm_sq = float(delta.norm()) ** 2
        total_sq, err_sq = total_sq + norm_sq, err_sq + (error**2) * norm_sq
    if total_sq:
        adapter.notes.append(f"layers above rank {rank} truncated by SVD")
        adapter.overall_error = (err_sq / total_sq) ** 0.5
