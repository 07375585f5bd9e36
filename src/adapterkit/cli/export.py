"""`adapterkit export`: rewrite an adapter for a serving engine (vLLM / LoRAX, or llama.cpp's GGUF)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import CliError, console, load_base


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


def export_command(
    adapter: Path = typer.Argument(..., metavar="DIR", help="Adapter directory (PEFT format)."),
    to: str = typer.Option(..., "--to", help="Target engine: vllm (also LoRAX) or gguf (llama.cpp)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (vllm) or directory / .gguf file (gguf)."),
    base: Optional[str] = typer.Option(None, "--base", "-m", help="Base model: needed for --convert svd, and for "
                                       "GGUF names when the adapter records no base (a PEFT-made file)."),
    convert: Optional[str] = typer.Option(None, "--convert", help="svd: approximate what plain LoRA cannot express "
                                          "(DoRA, other methods, too high a rank) by truncated SVD; errors printed."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Rank of the SVD conversion (default: the adapter's r)."),
) -> None:
    """Export adapter DIR for vLLM/LoRAX or llama.cpp; refuses (saying why) what the engine would load wrongly."""
    import adapterkit as ak

    if to not in ("vllm", "gguf"):
        raise CliError(f"--to must be vllm or gguf, got {to!r}")
    if convert not in (None, "svd"):
        raise CliError(f"--convert must be svd, got {convert!r}")
    base_arg = None
    if base is not None:
        if convert is None and (Path(base) / "config.json").is_file():
            base_arg = base  # GGUF naming needs only the config
        else:
            base_arg, _, _ = load_base(base)
    report = ak.export(adapter, out, to=to, base=base_arg, convert=convert, rank=rank)
    console.print(report.summary())
