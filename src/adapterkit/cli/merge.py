"""`adapterkit merge`: fold an adapter into its base and write a plain transformers model directory.

The result loads with `AutoModelForCausalLM.from_pretrained(OUT)` alone. Before finishing, the written directory is
reloaded with plain transformers and its logits compared with the base+adapter model's on a probe prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..quantized import QUANT_KINDS
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
    quantize: Optional[str] = typer.Option(None, "--quantize", help="QLoRA adapter: quantize the base as in training "
                                           "(nf4, fp4, int8; default: what training.json records), merge into its "
                                           "dequantized weights and write them in --dtype (nothing is requantized)."),
) -> None:
    """Merge the adapter in DIR into its base model and save a standalone model (safetensors, config, tokenizer)."""
    import torch

    import adapterkit as ak

    from ..checkpoint import read_adapter
    from ..checkpoint.io import output_folder_problem
    from ..training_data import encode_prompt

    target_dtype = torch_dtype(dtype)
    folder, cfg, _, _ = read_adapter(adapter)
    quantize = (quantize or _trained_quantization(folder) or "").lower() or None
    if quantize is not None and quantize not in QUANT_KINDS:
        raise CliError(f"unknown --quantize {quantize!r}; choose one of {', '.join(QUANT_KINDS)}")
    problem = output_folder_problem(out)
    if problem is not None:
        raise CliError(f"--out: {problem}")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CliError(f"{out} exists and is not a model directory; choose an empty or new --out")
    base, tokenizer, resolved = load_base(model_spec_for_adapter(cfg.base_model_name_or_path, model))
    if (folder / "tokenizer_config.json").is_file():  # vocabulary changed in training: its tokenizer wins
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if quantize is not None:
        try:
            ak.quantize_model(base, quantize)
        except ak.ConfigError as err:
            raise CliError(str(err)) from err
    report = ak.load(base, folder)
    if not report.ok:
        raise CliError(report.summary())

    probe = torch.tensor([encode_prompt(tokenizer, PROBE)])  # (1, T)
    with torch.no_grad():
        reference = base(input_ids=probe).logits.float()  # (1, T, V): base + adapter, unmerged
    # A quantized base is dequantized to float32 and merged there: the written weights are the ones the adapter was
    # trained against, plus its update, never requantized.
    ak.unload(base, merge=True, dtype=torch.float32 if quantize else None)
    with torch.no_grad():
        merged_diff = (base(input_ids=probe).logits.float() - reference).abs().max().item()
    base.to(target_dtype)
    base.config.name_or_path = resolved.name_or_path
    out.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    console.print(f"merged {folder} into {resolved.name_or_path}{f' ({quantize}, dequantized)' if quantize else ''} "
                  f"-> {out}/ ({dtype}, {human_size(size)}, embeddings {'tied' if tied else 'untied'})")
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


def _trained_quantization(folder: Path) -> Optional[str]:
    """The --quantize that `adapterkit train` recorded in training.json, if any."""
    import json

    log = folder / "training.json"
    try:
        value = json.loads(log.read_text(encoding="utf-8")).get("config", {}).get("quantize") if log.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
