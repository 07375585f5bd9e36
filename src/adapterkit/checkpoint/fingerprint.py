"""Base-model fingerprint: what an adapter was trained on, recorded at save and checked at load.

The fingerprint is a small JSON document stored in the safetensors header metadata under `METADATA_KEY` (PEFT and
other readers ignore metadata, so the file stays a valid PEFT adapter). It holds:

- `class`, `config`: the model class and its structural config keys (`STRUCTURAL_KEYS`: sizes, layers, heads, vocab);
- `name_or_path`, `revision`: where the base came from, when transformers knows it;
- `embeddings`: input / output embedding shapes; `ties`: groups of parameter paths that share one tensor (identity);
- `modules`: for every module the adapter targets, the shape and a **weight signature** of its *base* weight
  (the original weight when merged, never a modules_to_save copy).

How a weight is signed lives in signature.py, what is read off the model in base_record.py, and how a recorded
fingerprint is compared with a model (per-module verdicts, thresholds) in base_check.py; this file is the public face.

API:
    fp = compute(model, modules=None)             # dict (JSON-ready); modules: paths to sign (default: adapter targets)
    meta = to_metadata(fp); fp = from_metadata(meta)   # {METADATA_KEY: json string} <-> dict (None if absent;
                                                       #  AdapterLoadError if damaged)
    result = compare(fp, model, weights=True)     # -> BaseCheck
    result.verdict        # SAME | DIFFERENT_WEIGHTS | DIFFERENT_MODEL | NOT_VERIFIED
    result.structural     # list of str: structure differences (absent modules, shapes, config keys)
    result.modules        # list of ModuleCheck(path, status, correlation, rel_diff, scale, note)
    result.notes          # list of str: things noticed that decide nothing (vocabulary size, class name, ...)
    result.describe()     # one line: the verdict with its reason, as `LoadReport.base_check` shows it
    str(result)           # verdict line plus one line per module: what a `verify` command prints
"""

from __future__ import annotations

import json

from torch import nn

from ..config import parse_json
from ..errors import AdapterLoadError, ConfigError
from ..state import adapter_state
from .base_check import (
    DIFFERENT_MODEL,
    DIFFERENT_WEIGHTS,
    FINGERPRINT_VERSION,
    IDENTICAL_REL,
    NOT_VERIFIED,
    SAME,
    SAME_CORR,
    SCALE_RANGE,
    BaseCheck,
    ModuleCheck,
    compare,
    layout_problem,
    not_verified,
)
from .base_record import (
    STRUCTURAL_KEYS,
    base_parameters,
    embedding_shapes,
    module_base_weight,
    plain_modules,
    signable,
    structural_config,
    ties,
)
from .io import MAX_HEADER_BYTES
from .signature import SAMPLE, STATS_SAMPLE, _positions, signatures

METADATA_KEY = "adapterkit.base_fingerprint"
VERSION = FINGERPRINT_VERSION

__all__ = [
    "DIFFERENT_MODEL", "DIFFERENT_WEIGHTS", "IDENTICAL_REL", "METADATA_KEY", "NOT_VERIFIED", "SAME", "SAME_CORR",
    "SAMPLE", "SCALE_RANGE", "STATS_SAMPLE", "STRUCTURAL_KEYS", "BaseCheck", "ModuleCheck", "compare", "compute",
    "from_metadata", "not_verified", "signatures", "to_metadata",
]


def compute(model: nn.Module, modules: list[str] | None = None) -> dict:
    """The fingerprint of `model`'s base. `modules`: plain paths to sign (default: every module an adapter wraps)."""
    if modules is None:
        state = adapter_state(model)
        modules = sorted(state.wrappers) if state is not None else []
    config = getattr(model, "config", None)
    revision = getattr(config, "_commit_hash", None) if config is not None else None
    found = plain_modules(model)
    signed, to_sign = {}, {}
    for path in modules:
        module = found.get(path)
        weight = module_base_weight(module) if module is not None else None
        if not signable(weight):
            signed[path] = {"shape": list(weight.shape) if weight is not None else None}
        else:
            to_sign[path] = weight
    signed.update(zip(to_sign, signatures(list(to_sign.values()))))
    return {
        "version": VERSION,
        "class": type(model).__name__,
        "config": structural_config(model),
        "name_or_path": (getattr(config, "_name_or_path", None) or None) if config is not None else None,
        "revision": revision,
        "embeddings": embedding_shapes(model),
        "ties": ties(base_parameters(model)),
        "modules": signed,
    }


def to_metadata(fp: dict) -> dict[str, str]:
    """safetensors metadata entries (values must be strings)."""
    return {METADATA_KEY: json.dumps(fp, separators=(",", ":"), sort_keys=True)}


def from_metadata(metadata: dict[str, str] | None, where: str = "the weights file") -> dict | None:
    """The fingerprint stored in a file's metadata, or None when the file has none (PEFT-made).

    A fingerprint that is present but damaged (not JSON, another layout, out-of-range values) raises
    AdapterLoadError naming `where` and the entry: skipping it would silently turn the wrong-base check off.
    """
    text = (metadata or {}).get(METADATA_KEY)
    if text is None:
        return None
    try:
        fp = parse_json(text, f"{where}: metadata {METADATA_KEY!r}", MAX_HEADER_BYTES)
    except ConfigError as exc:
        raise AdapterLoadError(f"{exc}. The base fingerprint is damaged; re-save the adapter.") from exc
    problem = layout_problem(fp)
    if problem:
        raise AdapterLoadError(
            f"{where}: the base fingerprint (metadata {METADATA_KEY!r}) is damaged: {problem}. Re-save the adapter, "
            "or pass check_base='off' to load it without checking its base."
        )
    return fp
