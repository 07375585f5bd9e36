"""Export for llama.cpp: a GGUF LoRA adapter (general.type=adapter, adapter.type=lora, adapter.lora.alpha).

Tensors are named with llama.cpp's own map (gguf's TensorNameMap: `model.layers.0.self_attn.q_proj` ->
`blk.0.attn_q.weight`, + `.lora_a` / `.lora_b`), float32, laid out as llama.cpp's convert_lora_to_gguf.py writes them:
- Llama-family q_proj / k_proj: rows of lora_b permuted the way the converter permutes the base weight for RoPE;
- token embedding: lora_a stored transposed, (num_embeddings, r);
- llama.cpp scales each layer by alpha / r (r from the tensor), so every other scaling (rsLoRA's alpha / √r,
  rank_pattern, alpha_pattern, SVD-converted layers) is baked into lora_b — the upstream converter loses it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import fingerprint
from ..checkpoint.io import make_parent
from ..errors import AdapterSaveError, ConfigError
from .layers import Adapter, Layer

# HF model_type -> (gguf MODEL_ARCH name, whether llama.cpp's converter permutes q/k rows). Only architectures whose
# output was compared tensor for tensor with llama.cpp's converter are listed.
ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
FILE_NAME = "adapter_model.gguf"


def base_config(adapter: Adapter, base: Any) -> dict:
    """model_type, layer and head counts, tie flag: from `base` (a model, a config, a directory with config.json)
    or, for adapterkit-made files, from the fingerprint in the file."""
    if base is not None:
        config = getattr(base, "config", base)
        if isinstance(base, (str, Path)):
            path = Path(base) / "config.json"
            if not path.is_file():
                raise ConfigError(f"base {base} has no config.json; pass the base model's directory or the model.")
            return json.loads(path.read_text())
        if hasattr(config, "to_dict"):
            return config.to_dict()
        raise ConfigError(f"base must be a model, a transformers config or a directory, got {type(base).__name__}.")
    fp = fingerprint.from_metadata(adapter.metadata)
    if fp and isinstance(fp.get("config"), dict) and fp["config"].get("model_type"):
        out = dict(fp["config"])
        out["tie_word_embeddings"] = any("lm_head.weight" in group for group in fp.get("ties", []))
        return out
    raise ConfigError(
        f"{adapter.folder} records no base model structure (made by PEFT?); GGUF names depend on it: pass base= "
        "(the base model, or its directory holding config.json)."
    )


def _permute(b: torch.Tensor, n_head: int, n_kv: int | None) -> torch.Tensor:
    """llama.cpp's RoPE row order for q/k weights, applied to lora_b (out, r): heads' halves interleaved."""
    if n_kv is not None and n_kv != n_head:
        n_head = n_kv
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def gguf_tensors(adapter: Adapter, config: dict) -> tuple[str, float, dict[str, np.ndarray]]:
    """(architecture name, alpha, {gguf tensor name: float32 array}) for the adapter."""
    import gguf

    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ConfigError(
            f"GGUF export supports {', '.join(sorted(ARCHS))} bases; this base is {model_type!r}, whose llama.cpp "
            "tensor layout has not been checked against llama.cpp's converter."
        )
    arch_name, permute = ARCHS[model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_blocks = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(arch, n_blocks)
    cfg = adapter.config
    alpha = float(getattr(cfg, "lora_alpha", 0) or 0) if not adapter.svd_errors else 0.0
    if alpha <= 0:  # SVD-converted or no usable alpha: alpha = r so llama.cpp's alpha / r is 1 for the common rank
        alpha = float(max(layer.rank for layer in adapter.layers))
    out: dict[str, np.ndarray] = {}
    for layer in adapter.layers:
        if layer.path.endswith("lm_head") and config.get("tie_word_embeddings"):
            raise ConfigError(
                f"{layer.path} is tied to the token embedding in this base, and llama.cpp has no separate output "
                "tensor to adapt; merge the adapter instead, or train without lm_head."
            )
        mapped = names.get_name(layer.path + ".weight", try_suffixes=(".weight",))
        if mapped is None:
            raise ConfigError(f"{layer.path} has no llama.cpp tensor name for {arch_name.lower()}; it cannot be exported.")
        a, b = _factors(layer, alpha)
        if permute and layer.path.endswith("q_proj"):
            b = _permute(b, n_head, n_head)
        elif permute and layer.path.endswith("k_proj"):
            b = _permute(b, n_head, n_kv)
        if layer.kind == "embedding":
            a = a.T  # llama.cpp looks token rows up in lora_a: (num_embeddings, r)
        out[mapped + ".lora_a"] = a.contiguous().numpy()
        out[mapped + ".lora_b"] = b.contiguous().numpy()
    return gguf.MODEL_ARCH_NAMES[arch], alpha, out


def _factors(layer: Layer, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (A, B) with B scaled so llama.cpp's alpha / r gives this layer's own scaling."""
    a, b = layer.a.float(), layer.b.float()
    factor = layer.scaling * layer.rank / alpha
    if factor != 1.0:
        b = b * factor
    return a, b


def write_gguf(adapter: Adapter, out: str | Path, base: Any = None) -> tuple[Path, list[str]]:
    """Write the adapter as a GGUF LoRA file; `out` a directory (gets adapter_model.gguf) or a .gguf path."""
    import gguf

    if isinstance(base, nn.Module) and not hasattr(base, "config"):
        raise ConfigError("base has no transformers config; pass the base model's directory instead.")
    config = base_config(adapter, base)
    arch, alpha, tensors = gguf_tensors(adapter, config)
    out = Path(out)
    path = out if out.suffix == ".gguf" else out / FILE_NAME
    if path.is_dir() or (path.is_symlink() and not path.exists()):
        raise AdapterSaveError(f"{path} is a directory or a dangling link, not a file to write; nothing was written. "
                               f"Give a .gguf file path, or a folder to write {FILE_NAME} into.")
    make_parent(path)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter.folder.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    notes = list(adapter.notes)
    if any(layer.scaling * layer.rank / alpha != 1.0 for layer in adapter.layers):
        notes.append("scalings other than alpha / r (rsLoRA, patterns, SVD) baked into lora_b")
    return path, notes
