"""Helpers the sub-commands share: the console, loading a base model for an adapter, greedy chat generation."""

from __future__ import annotations

import contextlib
import io
import time

from rich.console import Console

from .extras import install_hint

console = Console(highlight=False, soft_wrap=True)

DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes; torch is imported lazily to keep --help fast


class CliError(Exception):
    """An error whose message is shown to the user as is."""


def pyplot(what: str):
    """matplotlib.pyplot on the file-only Agg backend, or None after a one-line note that `what` was skipped.

    Plots are the one part of the command that works without matplotlib (a part of the `cli` extra).
    """
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise

        console.print(f"{what} skipped: matplotlib is not installed ({install_hint('matplotlib')})", markup=False)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise CliError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def model_spec_for_adapter(recorded: str | None, override: str | None) -> str | None:
    """The base model to load for an adapter: `--model` if given, else what the adapter records.

    The embedded default model is recorded under its upstream hub id; that id maps back to the embedded copy.
    """
    if override:
        return override
    if not recorded:
        return None  # the embedded default
    from ..base_models import EMBEDDED_MODELS

    for name, entry in EMBEDDED_MODELS.items():
        if recorded == entry.hub_id:
            return name
    return recorded


def load_base(spec: str | None, dtype=None, *, quiet: bool = False):
    """(model, tokenizer, resolved) for a model spec; announces the first-run GGUF conversion."""
    from .. import base_models as models

    name = (spec or models.DEFAULT_MODEL).lower()
    converting = name in models.EMBEDDED_MODELS and not (models.cache_dir() / "models" / name / "config.json").is_file()
    if converting or name.endswith(".gguf"):
        _require_gguf()
    if converting and not quiet:
        console.print(f"converting the embedded {name} model to safetensors (first run only, ~30-60 s)...")
    start = time.perf_counter()
    # The GGUF reader draws its own progress bar on stderr; the line above says what is happening instead.
    with contextlib.redirect_stderr(io.StringIO()) if converting else contextlib.nullcontext():
        model, tokenizer, resolved = models.load_model(spec, dtype or torch_dtype("float32"))
    if converting and not quiet:
        console.print(f"converted and cached in {models.cache_dir() / 'models' / name} ({time.perf_counter() - start:.0f} s)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, resolved


def _require_gguf() -> None:
    # transformers reads GGUF files only with the gguf package; without it, it raises a bare ImportError.
    try:
        import gguf  # noqa: F401
    except ImportError:

        raise CliError(f"reading a GGUF model needs the gguf package, which is not installed: "
                       f"{install_hint('gguf')}") from None


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy reply to a user prompt, formatted with the tokenizer's chat template (as in training)."""
    import torch

    from ..training_data import encode_prompt

    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=model.device)  # (1, T)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
