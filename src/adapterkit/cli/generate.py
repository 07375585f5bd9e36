"""`adapterkit generate`: greedy, chat-template-aware replies from a base model, optionally with an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import CliError, console, generate, load_base, model_spec_for_adapter


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)


def generate_command(
    prompts: list[str] = typer.Argument(..., metavar="PROMPT...", help="One or more user prompts."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's recorded "
                                        "base, else the embedded SmolLM2-135M-Instruct)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="Adapter directory to apply."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Tokens to generate per prompt."),
    compare: bool = typer.Option(False, "--compare", help="Print the base model's reply beside the adapter's."),
) -> None:
    """Generate a greedy reply to each PROMPT (with --compare: base vs adapter)."""
    import adapterkit as ak

    if compare and adapter is None:
        raise CliError("--compare needs --adapter DIR (it compares the base model with the adapter)")
    recorded = None
    if adapter is not None:
        from ..checkpoint import read_adapter

        _, cfg, _, _ = read_adapter(adapter)
        recorded = cfg.base_model_name_or_path
    base, tokenizer, _ = load_base(model_spec_for_adapter(recorded, model))
    if adapter is not None:
        report = ak.load(base, adapter)
        if not report.ok:
            raise CliError(report.summary())

    for prompt in prompts:
        console.print(f"[bold]> {prompt}[/]")
        if compare:
            with ak.disabled(base):
                console.print(f"  base:    {generate(base, tokenizer, prompt, max_new_tokens)}")
            console.print(f"  adapter: {generate(base, tokenizer, prompt, max_new_tokens)}")
        else:
            console.print(f"  {generate(base, tokenizer, prompt, max_new_tokens)}")
