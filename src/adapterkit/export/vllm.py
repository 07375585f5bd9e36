"""Export for vLLM and LoRAX: a PEFT directory of plain LoRA with one rank from vLLM's `max_lora_rank` choices.

vLLM reads PEFT's key names, refuses modules_to_save and DoRA, applies one scaling (lora_alpha / r, or / √r with
rsLoRA) to every module and ignores rank_pattern / alpha_pattern. So the export pads every layer with zeros to one
allowed rank R (exact) and, when layers' scalings differ, folds each layer's scaling into its B with lora_alpha = R.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint.format import WEIGHTS_NAME, file_key
from ..checkpoint.io import atomic_directory
from ..errors import ConfigError
from ..methods.lora_config import LoraConfig
from .layers import Adapter, Layer

# vLLM's documented `--max-lora-rank` choices (vllm.config.lora.MaxLoRARanks; newer versions also accept 1).
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def target_rank(layers: list[Layer]) -> int:
    top = max(layer.rank for layer in layers)
    for r in VLLM_RANKS:
        if r >= top:
            return r
    raise ConfigError(
        f"the adapter has rank {top}, above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}; pass convert='svd' "
        f"with rank={VLLM_RANKS[-1]} (or lower) to truncate it."
    )


def _pad(layer: Layer, rank: int, factor: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) padded with zeros to `rank`, B multiplied by `factor` (skipped when 1: bit-exact)."""
    a, b = layer.a, layer.b
    if factor != 1.0:
        b = (b.float() * factor)
    extra = rank - layer.rank
    if extra:
        a = torch.cat([a, a.new_zeros(extra, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def write_vllm(adapter: Adapter, out_dir: str | Path) -> list[str]:
    """Write the adapter for vLLM into `out_dir`; returns notes on what changed."""
    layers = adapter.layers
    if not layers:
        raise ConfigError(f"{adapter.folder}: the adapter has no LoRA layer to export.")
    rank = target_rank(layers)
    scalings = {layer.scaling for layer in layers}
    ranks = {layer.rank for layer in layers}
    source = adapter.config if isinstance(adapter.config, LoraConfig) else None
    dtype = adapter.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float32
    notes = list(adapter.notes)
    unchanged = (source is not None and ranks == {rank} and not source.rank_pattern and not source.alpha_pattern
                 and not adapter.svd_errors)
    if unchanged:
        alpha, rslora, factors = source.lora_alpha, source.use_rslora, {layer.path: 1.0 for layer in layers}
    elif len(scalings) == 1:
        s = scalings.pop()
        alpha, rslora, factors = s * rank, False, {layer.path: 1.0 for layer in layers}  # alpha / R == s
        notes.append(f"rank padded with zeros to {rank} (exact); lora_alpha set to {alpha:g} so alpha / r keeps "
                     f"the scaling {s:g}")
    else:
        alpha, rslora = float(rank), False
        factors = {layer.path: layer.scaling for layer in layers}  # scaling folded into B; alpha / r = 1
        notes.append(f"rank padded with zeros to {rank}; per-layer scalings folded into lora_B (lora_alpha = r)")

    tensors = {}
    for layer in layers:
        a, b = _pad(layer, rank, factors[layer.path], dtype)
        names = ("lora_A.weight", "lora_B.weight") if layer.kind == "linear" else ("lora_embedding_A", "lora_embedding_B")
        tensors[file_key(layer.path, names[0])] = a
        tensors[file_key(layer.path, names[1])] = b
    base_cfg = source or LoraConfig(target_modules=["placeholder"])
    cfg = base_cfg.replace(
        r=rank, lora_alpha=alpha, use_rslora=rslora, rank_pattern={}, alpha_pattern={}, use_dora=False,
        modules_to_save=None, trainable_token_indices=None, lora_dropout=0.0 if source is None else source.lora_dropout,
        target_modules=sorted({layer.path.rsplit(".", 1)[-1] for layer in layers}), inference_mode=True,
        base_model_name_or_path=getattr(adapter.config, "base_model_name_or_path", None),
        task_type=getattr(adapter.config, "task_type", None),
    )
    cfg.unknown_keys = {}  # keys of other methods or tools: not vLLM's business
    with atomic_directory(out_dir) as tmp:
        cfg.save(tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return notes
