"""`export`: an adapter directory rewritten for a serving engine — vLLM / LoRAX (PEFT layout) or llama.cpp (GGUF).

    report = ak.export("out/", "for-vllm/", to="vllm")
    report = ak.export("dora/", "for-vllm/", to="vllm", base=model, convert="svd")   # lossy: errors reported
    report = ak.export("out/", "adapter.gguf", to="gguf")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from .gguf import write_gguf
from .layers import read_lora, truncate
from .vllm import write_vllm

TARGETS = ("vllm", "gguf")


@dataclass
class ExportReport:
    """What was written and what the conversion changed. svd_errors: module path -> relative error (lossy only)."""

    path: Path
    target: str
    layers: int
    notes: list[str] = field(default_factory=list)
    svd_errors: dict[str, float] = field(default_factory=dict)
    overall_error: float | None = None

    @property
    def exact(self) -> bool:
        return not self.svd_errors

    def summary(self) -> str:
        lines = [f"wrote {self.path} for {self.target}: {self.layers} LoRA layers"]
        lines += [f"  note: {n}" for n in self.notes]
        for path, error in self.svd_errors.items():
            lines.append(f"  svd  {path}: relative error {error:.3e}")
        if self.overall_error is not None:
            lines.append(f"  svd  overall relative error {self.overall_error:.3e}")
        return "\n".join(lines)


def _base_model(base: Any) -> nn.Module | None:
    if base is None or isinstance(base, nn.Module):
        return base
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base))


def export(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    to: str = "vllm",
    base: Any = None,
    *,
    convert: str | None = None,
    rank: int | None = None,
) -> ExportReport:
    """Rewrite the adapter at `adapter_dir` for engine `to` ("vllm" or "gguf") into `out_dir`.

    base: the base model (an nn.Module or a model directory); needed to convert non-plain adapters, and for GGUF
        names when the file records no base structure. convert="svd": approximate updates plain LoRA cannot express
        (DoRA, other methods) by truncated SVD at `rank` (default the adapter's r), and cut plain layers above
        `rank` the same way; refused without it.
    Raises ConfigError, naming why, for anything the engine would load wrongly.
    """
    if to not in TARGETS:
        raise ConfigError(f"to must be one of {', '.join(TARGETS)}, got {to!r}.")
    model = _base_model(base) if convert == "svd" else (base if isinstance(base, nn.Module) else None)
    adapter = read_lora(adapter_dir, model, convert, rank)
    if not adapter.layers:
        raise ConfigError(f"{adapter.folder}: the adapter has no LoRA layer to export.")
    if convert == "svd" and rank is not None and not adapter.svd_errors:
        truncate(adapter, rank)  # a plain adapter of too high a rank
    if to == "vllm":
        notes = write_vllm(adapter, out_dir)
        path = Path(out_dir)
    else:
        path, notes = write_gguf(adapter, out_dir, model if model is not None else base)
    return ExportReport(path, to, len(adapter.layers), notes, adapter.svd_errors, adapter.overall_error)
