"""Initialisations that move part of the base weight into the adapter: PiSSA (top singular vectors) and OLoRA (QR).

Both set A0, B0 from the base weight W and replace W by the residual W_res = W - s * B0 A0, so the model's function is
unchanged at the start. The computation is PEFT's (same ops in the same order, float32), so a PEFT model and ours
built from one base get the same residual and factors:

    PiSSA:  W (out, in) = V S Uh;  A0 = diag(sqrt(S_r / s)) Uh_r (r, in),  B0 = V_r diag(sqrt(S_r / s)) (out, r)
            "pissa_niter_N": V_r, S_r, U_r from torch.svd_lowrank(W, r, niter=N) (randomised, not reproducible)
    OLoRA:  W = Q R;  A0 = R[:r] (r, in),  B0 = Q[:, :r] (out, r)

A0 and B0 are kept (r * (in + out) numbers per layer) so that a trained adapter can be saved as a plain LoRA of rank 2r
for the ORIGINAL base: W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0].
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import ConfigError

# Header metadata of an adapter saved on its residual base: {"init": ..., "original": {path: weight signature}}.
RESIDUAL_METADATA_KEY = "adapterkit.base_modified"
_NITER = re.compile(r"pissa_niter_([1-9][0-9]{0,3})")


def is_residual_init(init: Any) -> bool:
    """Does this `init_lora_weights` value change the base weights (PiSSA / OLoRA)?"""
    return isinstance(init, str) and (init in ("pissa", "olora") or _NITER.fullmatch(init) is not None)


def method_name(init: str) -> str:
    return "OLoRA" if init == "olora" else "PiSSA"


def _factors(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r)) in float32 from a float32 weight (out, in)."""
    if init == "olora":
        q, upper = torch.linalg.qr(weight)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    niter = _NITER.fullmatch(init)
    if niter is None:
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r], uh[:r]
    else:
        vr, sr, ur = torch.svd_lowrank(weight, r, niter=int(niter.group(1)))
        uhr = ur.t()
    sr = sr / scaling
    return torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))


def init_residual(layer: Any, name: str, init: str) -> None:
    """Set adapter `name`'s factors of a LoRA linear layer from its base weight and replace that weight by the
    residual (in place, in the base weight's dtype). The initial factors are kept in the record."""
    base = layer.base_layer
    what = method_name(init)
    if layer.view.quantized(base):
        raise ConfigError(
            f"{what} initialisation needs a float base weight, got a quantized {type(base).__name__}. Attach it to "
            "the float model, then quantize the residual model."
        )
    if init == "olora" and layer.fan_in_fan_out:
        raise ConfigError("OLoRA initialisation is not supported on Conv1D layers (weight stored (in, out)).")
    record = layer.records[name]
    stored = base.weight
    if stored.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"{what} initialisation needs a float32/16 or bfloat16 base weight, got {stored.dtype}.")
    weight = layer.view.float_weight(base).clone()  # float32, stored layout
    weight = weight.T if layer.fan_in_fan_out else weight  # (out, in)
    if record.r > min(weight.shape):
        raise ConfigError(f"{what} needs r <= min(out, in) = {min(weight.shape)}, got r={record.r}.")
    a0, b0 = _factors(weight, record.r, record.scaling, init)
    residual = weight - record.scaling * b0 @ a0  # (s * B0) @ A0, as PEFT groups it
    residual = residual.T if layer.fan_in_fan_out else residual
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    with torch.no_grad():
        lora_a.copy_(a0)
        lora_b.copy_(b0)
        stored.copy_(residual.to(stored.dtype))
    record.initial = (lora_a.detach().clone(), lora_b.detach().clone())


def initial_delta(layer: Any, name: str) -> torch.Tensor:
    """s * B0 A0 (float32) in the base weight's stored layout: what the initialisation took out of the base."""
    a0, b0 = layer.records[name].initial
    delta = layer.records[name].scaling * b0.float() @ a0.float()  # (out, in)
    return delta.T if layer.fan_in_fan_out else delta


def residual_layers(wrappers: dict[str, Any], name: str) -> dict[str, Any]:
    """The layers (by path) where adapter `name` was initialised from (and changed) the base weight."""
    out = {}
    for path, layer in wrappers.items():
        record = layer.records.get(name)
        if record is not None and getattr(record, "initial", None) is not None:
            out[path] = layer
    return out


def plain_lora_factors(layer: Any, name: str) -> dict[str, torch.Tensor]:
    """PEFT suffix -> CPU tensor of the rank-2r plain LoRA for the original base: A' = [A ; A0], B' = [B | -B0]."""
    a0, b0 = layer.records[name].initial
    a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
    return {"lora_A.weight": torch.cat([a, a0.to(a.dtype)], dim=0).cpu().contiguous(),
            "lora_B.weight": torch.cat([b, -b0.to(b.dtype)], dim=1).cpu().contiguous()}


def plain_lora_config(cfg: Any) -> Any:
    """The config of the converted adapter: rank doubled, alpha scaled so that every layer keeps its scaling."""
    if cfg.use_rslora and (cfg.rank_pattern or cfg.alpha_pattern):
        raise ConfigError("converting a PiSSA/OLoRA adapter with use_rslora and rank/alpha patterns is not supported.")
    factor = 2 ** 0.5 if cfg.use_rslora else 2  # alpha / sqrt(2r) = (alpha / sqrt r) / sqrt 2
    return cfg.replace(
        init_lora_weights=True, r=cfg.r * 2, lora_alpha=cfg.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in cfg.alpha_pattern.items()},
    )
