"""`adapterkit verify`: does an adapter fit a base model? Structure, vocabulary and weight signatures.

Loads the base and the adapter in this process only (nothing is written); the first line is the verdict, the lines
below the details. Exit code 0 only when the adapter fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, load_base, model_spec_for_adapter


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_command)


def verify_command(
    adapter: Path = typer.Argument(..., metavar="DIR", help="Adapter directory."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model to check against (default: the "
                                        "one the adapter records)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every module and tensor, not only problems."),
) -> None:
    """Check that the adapter in DIR fits the base model; exit 0 only when it does."""
    import adapterkit as ak

    from ..checkpoint import read_adapter
    from ..errors import AdapterLoadError

    folder, cfg, tensors, metadata = read_adapter(adapter)
    base, _tokenizer, resolved = load_base(model_spec_for_adapter(cfg.base_model_name_or_path, model), quiet=True)

    problems: list[str] = []
    details: list[str] = []
    check = _fingerprint_check(metadata, base)
    vocab_line = _vocab_line(metadata, base)
    if check is not None:
        from ..checkpoint import fingerprint as F

        if check.verdict == F.DIFFERENT_MODEL:
            problems.append(f"structure: {check.describe()}")
        elif check.verdict == F.DIFFERENT_WEIGHTS:
            problems.append(f"weights: {check.describe()}")
        details.append(f"fingerprint: {check if verbose else _brief_check(check)}")
    else:
        details.append("fingerprint: none in the file (PEFT-made adapter?); weights not verified")

    try:
        report = ak.load(base, folder)
    except AdapterLoadError as exc:
        problems.append(f"load: {' '.join(str(exc).split())}")
        report = None
    if report is not None:
        if not report.ok:
            problems.append(f"load: {report.summary()}")
        details.append(f"load report: {report if verbose else _brief_report(report)}")
        ak.delete(base, report.adapter_name)  # leave the base as it was: nothing of this check persists

    weights_word = "not verified"
    if check is not None:
        weights_word = check.verdict
    name = resolved.name_or_path
    if problems:
        console.print(f"does not fit: {folder} vs {name}: " + "; ".join(problems))
    else:
        console.print(f"fits: {folder} on {name} (structure ok, {len(tensors)} tensors applied, {vocab_line}, "
                      f"weights: {weights_word})")
    for line in details:
        console.print(line)
    if problems:
        raise typer.Exit(1)


def _fingerprint_check(metadata: dict, base):
    try:
        from ..checkpoint.fingerprint import compare, from_metadata
    except ImportError:
        return None
    fp = from_metadata(metadata)
    return None if fp is None else compare(fp, base)


def _vocab_line(metadata: dict, base) -> str:
    now = base.get_input_embeddings().weight.shape[0] if hasattr(base, "get_input_embeddings") else None
    recorded = None
    try:
        from ..vocab import read_sizes

        sizes = read_sizes(metadata)
        if sizes and sizes.get("input"):
            recorded = sizes["input"][0]
    except (ImportError, AttributeError):
        pass
    if recorded is None:
        return f"vocab {now}"
    return f"vocab {now}" if recorded == now else f"vocab {recorded} (base {now}, resized on load)"


def _brief_check(check) -> str:
    """The verdict, a count per module status, and only the modules that are not identical."""
    from collections import Counter

    counts = Counter(m.status for m in check.modules)
    lines = [f"{check.describe()} ({', '.join(f'{n} {status}' for status, n in sorted(counts.items()))})"]
    lines += [f"  {m}" for m in check.modules if m.status != "identical"]
    lines += [f"  structure: {s}" for s in check.structural]
    lines += [f"  note: {n}" for n in check.notes]
    return "\n".join(lines)


def _brief_report(report) -> str:
    from ..checkpoint.report import APPLIED

    lines = [report.summary()]
    lines += [f"  {o.key}: {o.action}" + (f" ({o.note})" if o.note else "") for o in report.outcomes
              if o.action != APPLIED]
    lines += [f"  MISSING {key}" for key in report.missing]
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)
