"""`adapterkit merge`: fold an adapter into its base and write a plain transformers model directory.

The result loads with `AutoModelForCausalLM.from_pretrained(OUT)` alone. Before finishing, the written directory is
reloaded with plain transformers and its logits compared with the base+adapter model's on a probe prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import CliError, console, human_size, load_base, model_spec_for_adapter, torch_dtype

PROBE = "Tell me about the Zephyrine Q7 kettle."


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)


def merge_command(
    adapter: Path = typer.Argument(..., metavar="DIR", help="Adapter directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the merged model."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's recorded base)."),
    dtype: str = typer.Option("float32", "--dtype", help="dtype of the written weights: float32, bfloat16, float16."),
    check: bool = typer.Option(True, "--check/--no-check", help="Reload the result and compare logits."),
) -> None:
    """Merge the adapter in DIR into its base model and save a standalone model (safetensors, config, tokenizer)."""
    import torch

    import adapterkit as ak

    from ..checkpoint import read_adapter
    from ..training_data import encode_prompt

    target_dtype = torch_dtype(dtype)
    folder, cfg, _, _ = read_adapter(adapter)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CliError(f"{out} exists and is not a model directory; choose an empty or new --out")
    base, tokenizer, resolved = load_base(model_spec_for_adapter(cfg.base_model_name_or_path, model))
    if (folder / "tokenizer_config.json").is_file():  # vocabulary changed in training: its tokenizer wins
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    report = ak.load(base, folder)
    if not report.ok:
        raise CliError(report.summary())

    probe = torch.tensor([encode_prompt(tokenizer, PROBE)])  # (1, T)
    with torch.no_grad():
        reference = base(input_ids=probe).logits.float()  # (1, T, V): base + adapter, unmerged
    ak.unload(base, merge=True)
    with torch.no_grad():
        merged_diff = (base(input_ids=probe).logits.float() - reference).abs().max().item()
    base.to(target_dtype)
    base.config.name_or_path = resolved.name_or_path
    out.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    console.print(f"merged {folder} into {resolved.name_or_path} -> {out}/ ({dtype}, {human_size(size)}, "
                  f"embeddings {'tied' if tied else 'untied'})")
    console.print(f"in-memory merged vs adapter: max |Δlogit| {merged_diff:.2e}")
    if not check:
        return

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=target_dtype, local_files_only=True).eval()
    with torch.no_grad():
        diff = (reloaded(input_ids=probe).logits.float() - reference).abs().max().item()
    emb, head = reloaded.get_input_embeddings(), reloaded.get_output_embeddings()
    reloaded_tied = head is not None and emb.weight is head.weight
    # float32 reproduces the adapter up to summation order; a narrower dtype rounds every weight.
    tolerance = 1e-3 if target_dtype == torch.float32 else 0.5
    status = "ok" if diff <= tolerance and reloaded_tied == tied else "MISMATCH"
    console.print(f"reloaded with AutoModelForCausalLM.from_pretrained: max |Δlogit| vs adapter {diff:.2e} "
                  f"({'tied' if reloaded_tied else 'untied'}) {status}")
    if status != "ok":
        raise CliError(f"the merged model in {out} does not reproduce the adapter (max |Δlogit| {diff:.3g}, tied "
                       f"{reloaded_tied} vs {tied}); please report this")
