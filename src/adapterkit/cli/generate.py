"""`adapterkit generate`: greedy, chat-template-aware replies from a base model, with no, one or several adapters.

With several `--adapter` options every prompt is answered by every adapter in one mixed batch (routed: each batch
row runs with its own adapter; `--compare` adds the base model's rows to the same batch).
"""

from __future__ import annotations

import re
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
    adapter: Optional[list[Path]] = typer.Option(None, "--adapter", "-a", help="Adapter directory to apply; repeat "
                                                 "it to answer each prompt with each adapter in one mixed batch."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Tokens to generate per prompt."),
    compare: bool = typer.Option(False, "--compare", help="Print the base model's reply beside the adapter's."),
) -> None:
    """Generate a greedy reply to each PROMPT (with --compare: base vs adapter; several --adapter: one batch)."""
    import adapterkit as ak

    adapters = list(adapter or [])
    if compare and not adapters:
        raise CliError("--compare needs --adapter DIR (it compares the base model with the adapter)")
    recorded = _recorded_base(adapters, model)
    base, tokenizer, _ = load_base(model_spec_for_adapter(recorded, model))
    names = _names(adapters)
    for name, path in zip(names, adapters):
        report = ak.load(base, path, name=name)
        if not report.ok:
            raise CliError(report.summary())

    if len(adapters) > 1:
        _mixed(base, tokenizer, prompts, names, adapters, compare, max_new_tokens)
        return
    for prompt in prompts:
        console.print(f"[bold]> {prompt}[/]")
        if compare:
            with ak.disabled(base):
                console.print(f"  base:    {generate(base, tokenizer, prompt, max_new_tokens)}")
            console.print(f"  adapter: {generate(base, tokenizer, prompt, max_new_tokens)}")
        else:
            console.print(f"  {generate(base, tokenizer, prompt, max_new_tokens)}")


def _recorded_base(adapters: list[Path], override: Optional[str]) -> Optional[str]:
    """The base the adapters record (they must agree unless --model says which base to use)."""
    from ..checkpoint import read_adapter

    recorded = {read_adapter(path)[1].base_model_name_or_path for path in adapters}
    if len(recorded) > 1 and not override:
        raise CliError(f"the adapters record different base models ({', '.join(sorted(map(str, recorded)))}); "
                       "pass --model to choose the base they share")
    return next(iter(recorded), None)


def _names(adapters: list[Path]) -> list[str]:
    """Unique adapter names from the folder names (letters, digits, '_' and '-' only)."""
    names = []
    for i, path in enumerate(adapters):
        stem = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).name)[:100] or "adapter"
        names.append(stem if stem not in names and stem != "default" else f"{stem}-{i}")
    return names


def _mixed(base, tokenizer, prompts, names, paths, compare: bool, max_new_tokens: int) -> None:
    """All (prompt, adapter) pairs as rows of one left-padded batch, generated once with per-row routing."""
    import torch

    import adapterkit as ak

    from ..training_data import encode_prompt

    choices = ([None] if compare else []) + list(names)
    labels = dict(zip(names, (str(p) for p in paths)))
    rows = [(prompt, choice) for prompt in prompts for choice in choices]
    encoded = [encode_prompt(tokenizer, prompt) for prompt, _ in rows]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=base.device)  # (rows, T), left-padded
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=base.device)
    with torch.no_grad(), ak.routed(base, [choice for _, choice in rows]):
        out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad)  # num_beams=1: output row i is input row i
    replies = [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    for i, prompt in enumerate(prompts):
        console.print(f"[bold]> {prompt}[/]")
        for j, choice in enumerate(choices):
            label = "base" if choice is None else labels[choice]
            console.print(f"  {label}: {replies[i * len(choices) + j]}")
