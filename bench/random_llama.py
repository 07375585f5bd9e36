"""The benchmarks' models: a randomly initialised LlamaForCausalLM of a given shape, built directly in its dtype and
on its device (no float32 copy on the host first), frozen."""

from __future__ import annotations

import torch


def random_llama(shape: dict, dtype: torch.dtype, device, *, seed: int = 0, max_positions: int = 4096,
                 use_cache: bool | None = False):
    """LlamaForCausalLM(LlamaConfig(**shape)) with sdpa attention, seeded, every parameter frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    extra = {} if use_cache is None else {"use_cache": use_cache}
    cfg = LlamaConfig(**shape, max_position_embeddings=max_positions, attn_implementation="sdpa", **extra)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).requires_grad_(False)
