"""`load`: attach an adapter from a PEFT-format directory and fill its weights, strictly, with a full report.

Files are read and checked whole (config, tensors, header metadata) before the model is touched; what needs the model
(shapes after a vocabulary resize) is checked before any value is copied. On any error the model is put back exactly
as it was (checkpoint/undo.py).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import distributed, vocab
from ..config import AdapterConfig
from ..errors import AdapterLoadError, ConfigError
from ..methods import config_from_file, lora_init
from ..state import adapter_state, unwrap
from ..verbs import attach, set_active
from . import fingerprint as F
from . import report as R
from .format import (
    CONFIG_NAME,
    DEFAULT_ADAPTER,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    adapter_tensors,
    base_parameter_for,
    expand_aliases,
)
from .io import read_tensors
from .undo import ModelUndo

_MAX_LISTED = 8


_NAME = re.compile(r"[A-Za-z0-9_\-]{1,128}")
# A recorded vocabulary may grow the model's embedding by at most this many rows (or 4x its rows, if more): a
# damaged record must not make `load` allocate gigabytes.
MAX_ADDED_ROWS = 262_144


@dataclass
class AdapterFiles:
    """An adapter read from disk and checked as far as the files alone allow (no model involved)."""

    folder: Path
    weights: Path
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]  # by file key; aliases of shared tensors expanded
    metadata: dict[str, str]
    sizes: dict | None  # embedding sizes it was trained with (vocab.read_sizes)


def locate(path: str | os.PathLike, name: str = "default") -> Path:
    """The folder holding `adapter_config.json` for adapter `name` under `path` (or `path` itself).

    A name other than "default" is looked up in its own sub-folder (PEFT's layout for a multi-adapter save). When that
    sub-folder exists it is the adapter, exactly: damaged or incomplete, it is an error, never a silent fall-back to
    the top-level adapter. Only when there is no such sub-folder does the top-level adapter load under `name`.
    """
    path = Path(path)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterLoadError(f"adapter name {str(name)[:60]!r} must be 1-128 letters, digits, '_' or '-'.")
    if path.is_file() and path.name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, CONFIG_NAME):
        path = path.parent
    if not path.exists():
        raise AdapterLoadError(f"no adapter at {path}: the directory does not exist.")
    if not path.is_dir():
        raise AdapterLoadError(f"{path} is a file; pass the adapter directory (holding {CONFIG_NAME}).")
    if name != DEFAULT_ADAPTER and os.path.lexists(path / name):
        sub = path / name
        if not sub.is_dir():
            raise AdapterLoadError(
                f"adapter {name!r} at {sub} is not a readable folder (a file, or a link to nothing); it is damaged. "
                "Nothing was loaded."
            )
        _require_config(sub, f"adapter {name!r} in {path}")
        return sub
    _require_config(path, f"{path}")
    return path


def _require_config(folder: Path, what: str) -> None:
    config = folder / CONFIG_NAME
    if config.is_file():
        return
    if os.path.lexists(config):
        raise AdapterLoadError(f"{config} is not a readable file (a link to nothing?); {what} is damaged.")
    present = sorted(p.name for p in folder.iterdir())[:_MAX_LISTED]
    raise AdapterLoadError(
        f"no {CONFIG_NAME} in {folder} (it holds: {', '.join(present) or 'nothing'}); {what} is not a complete "
        "PEFT/adapterkit adapter directory."
    )


def read_adapter(path: str | os.PathLike, name: str = "default") -> tuple[Path, AdapterConfig, dict, dict]:
    """(folder, config, tensors by file key, safetensors header metadata) of an adapter on disk, all checked."""
    files = read_files(path, name)
    return files.folder, files.config, files.tensors, files.metadata


def read_files(path: str | os.PathLike, name: str = "default") -> AdapterFiles:
    """Read and check everything of an adapter that does not need the model: config, tensors, header metadata."""
    folder = locate(path, name)
    config_path = folder / CONFIG_NAME
    try:
        cfg = config_from_file(config_path)
    except (ConfigError, TypeError) as exc:
        text = str(exc)
        raise AdapterLoadError(text if text.startswith(str(config_path)) else f"{config_path}: {text}") from exc
    weights = folder / WEIGHTS_NAME
    if not os.path.lexists(weights):
        weights = folder / LEGACY_WEIGHTS_NAME
    if not weights.is_file():
        if os.path.lexists(weights):
            raise AdapterLoadError(f"{weights} is not a readable file (a link to nothing?); the adapter is damaged.")
        raise AdapterLoadError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter is incomplete.")
    tensors, metadata = read_tensors(weights)
    tensors = expand_aliases(tensors, metadata, str(weights))
    sizes = vocab.read_sizes(metadata, str(weights))
    return AdapterFiles(folder, weights, cfg, tensors, metadata, sizes)


def load(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    strict: bool = True,
    trainable: bool = False,
    activate: bool = True,
    allow_base_overwrite: bool = False,
    check_base: str = "error",
    resize: bool = True,
) -> R.LoadReport:
    """Attach adapter `name` from `path` onto `model` and fill every adapter parameter from the file.

    strict: every adapter parameter must get a value and every file tensor must be accounted for.
    allow_base_overwrite: apply file tensors that would change base weights (refused by default).
    check_base: what to do when the file's base fingerprint says the adapter was trained on other weights of this
        architecture: "error" (default), "warn" (warnings.warn and a report note) or "off". A different structure
        (absent modules, other shapes or config sizes) is an error whatever this says.
    resize: when the file records embeddings of another size (tokens were added before training), resize this
        model's embeddings to match (tying kept; trained rows come from the file). False: raise instead.
    Raises AdapterLoadError on any mismatch or damaged file, the model then exactly as it was (parameters, buffers,
    module tree, ties); returns a LoadReport otherwise.
    """
    model = unwrap(model)  # DDP / torch.compile wrappers: load onto the user's model inside
    if check_base not in _CHECK_BASE:
        raise AdapterLoadError(f"check_base must be one of {_CHECK_BASE}, got {check_base!r}.")
    # 1. Everything the files alone can tell, before the model is touched.
    files = read_files(path, name)
    folder = files.folder
    fp, fp_note = _fingerprint(files, check_base)
    state = adapter_state(model)
    if state is not None and name in state.configs:
        raise AdapterLoadError(f"an adapter named {name!r} is already attached; delete it or load under another name.")
    cfg = files.config.replace(inference_mode=not trainable)
    # 2. What the model tells, still without changing it.
    residual_note = _check_residual_base(model, folder, fp, files.metadata)  # PiSSA / OLoRA residual base
    base_check = _check_base(model, folder, fp, check_base)
    if fp_note:
        base_check.notes.insert(0, fp_note)
    rows = _vocabulary_target(model, files, fp, resize)
    init = getattr(cfg, "init_lora_weights", None)
    # PiSSA / OLoRA: the attach itself never touches the base; a PEFT file (no record of a residual base) gets the
    # residual recomputed from this base after every check passed, as PEFT does when it loads one.
    recompute = lora_init.is_residual_init(init) and lora_init.RESIDUAL_METADATA_KEY not in files.metadata
    # 3. Change the model; any failure puts back exactly what was there.
    undo = ModelUndo(model)
    try:
        rows_before = _resize(model, folder, rows)
        try:
            # Strict: every adapter tensor comes from the file (or the load fails), so initialising them is wasted.
            attach(model, cfg.replace(init_lora_weights=True) if lora_init.is_residual_init(init) else cfg, name,
                   init=not strict)
            adapter_state(model).configs[name] = cfg
        except ConfigError as exc:
            raise AdapterLoadError(f"adapter {folder} does not fit {type(model).__name__}: {exc}") from exc
        report, plan = _plan(model, folder, name, files.tensors, allow_base_overwrite)
        _check(report, strict)
    except BaseException:
        undo.restore(name)
        raise
    if recompute:
        for layer in adapter_state(model).wrappers.values():
            if name in layer.records and "lora_A" in layer._modules:  # LoRA linear layers (PEFT: the same)
                lora_init.init_residual(layer, name, init)
        residual_note = (f"{lora_init.method_name(init)}: the file does not record its residual base (PEFT-made); "
                         "the base weights were replaced by the residual recomputed from this model, as PEFT does"
                         + (" (randomised SVD: not the exact residual trained on)" if init.startswith("pissa_") else ""))
    with torch.no_grad():
        for live, value in plan:
            distributed.assign(live, value)  # a sharded (FSDP2) parameter takes its own part of the file's tensor
    if residual_note:
        report.notes.append(residual_note)
    for layer in adapter_state(model).wrappers.values():  # what a layer says about the file's layout
        if name in layer.records and hasattr(layer, "load_notes"):
            report.notes += [n for n in layer.load_notes(name) if n not in report.notes]
    report.unknown_config_keys = sorted(cfg.unknown_keys)
    report.base_check = base_check.describe()
    if rows_before is not None:
        report.notes.append(
            f"vocabulary: embeddings resized from {rows_before} to {vocab.embedding_sizes(model)['input'][0]} rows "
            "to match the adapter"
        )
    report.notes += [f"base: {n}" for n in base_check.notes]
    if activate:
        set_active(model, name)
    return report


def _fingerprint(files: AdapterFiles, check_base: str) -> tuple[dict | None, str]:
    """The file's base fingerprint (None if it has none) and a note; damaged: an error unless check_base='off'."""
    try:
        fp = F.from_metadata(files.metadata, str(files.weights))
    except AdapterLoadError as exc:
        if check_base != "off":
            raise
        return None, f"the file's base fingerprint is damaged and was ignored (check_base='off'): {exc}"
    recorded = (fp or {}).get("embeddings", {}).get("input")
    trained = (files.sizes or {}).get("input")
    if recorded and trained and list(recorded) != list(trained):
        raise AdapterLoadError(
            f"{files.weights}: the metadata disagree: {F.METADATA_KEY!r} records an input embedding of {recorded}, "
            f"{vocab.VOCAB_METADATA_KEY!r} one of {trained}. The file is damaged; re-save the adapter."
        )
    return fp, ""


def _vocabulary_target(model: nn.Module, files: AdapterFiles, fp: dict | None, resize: bool) -> int | None:
    """The row count the embeddings must be resized to for this adapter, or None; raises when that is refused."""
    folder = files.folder
    recorded = (files.sizes or {}).get("input")
    now = vocab.embedding_sizes(model).get("input")
    if not recorded or not now or recorded[0] == now[0]:
        return None
    if recorded[1] != now[1]:
        return None  # another width: a different model, which the structural checks report
    if not resize:
        raise AdapterLoadError(
            f"adapter {folder} was trained with an embedding of {recorded[0]} rows (vocabulary resized), but this "
            f"model's has {now[0]}. Nothing was changed. Load with resize=True (the default) to resize the model, "
            f"or call model.resize_token_embeddings({recorded[0]}) first."
        )
    limit = now[0] + max(MAX_ADDED_ROWS, 4 * now[0])
    if recorded[0] > limit:
        raise AdapterLoadError(
            f"{files.weights} records an embedding of {recorded[0]:,} rows ({vocab.VOCAB_METADATA_KEY!r}); this "
            f"model's has {now[0]:,}, and adapterkit grows it to at most {limit:,} on load. Nothing was changed. "
            "The file is damaged, or resize the model yourself (model.resize_token_embeddings) before loading."
        )
    state = adapter_state(model)
    if state is not None:
        pair = {id(m) for m in vocab.embeddings(model) if m is not None}
        wrapped = sorted(path for path, w in state.wrappers.items() if id(w) in pair)
        if wrapped:
            raise AdapterLoadError(
                f"adapter {folder} needs the embedding resized from {now[0]} to {recorded[0]} rows, but "
                f"{', '.join(wrapped)} carries adapter(s) {sorted(state.configs)} already. Nothing was changed. "
                "Load this adapter first, or resize the model (model.resize_token_embeddings) before attaching."
            )
    return recorded[0]


def _resize(model: nn.Module, folder: Path, rows: int | None) -> int | None:
    """Resize the embeddings to `rows` (None: leave them); the previous row count, or None if unchanged."""
    if rows is None:
        return None
    before = vocab.embedding_sizes(model)["input"][0]
    try:
        vocab.resize(model, rows)
    except (AttributeError, NotImplementedError, RuntimeError) as exc:
        raise AdapterLoadError(
            f"adapter {folder} needs the embedding resized from {before} to {rows} rows, and this model "
            f"could not be resized ({exc}). Resize it yourself before loading."
        ) from exc
    return before


_CHECK_BASE = ("error", "warn", "off")


def _check_residual_base(model: nn.Module, folder: Path, fp: dict | None, metadata: dict) -> str | None:
    """A PiSSA / OLoRA adapter saved on its residual base: refuse the original base (closer to the recorded
    original weights than to the residual ones). Returns a report note, or None for other adapters."""
    text = metadata.get(lora_init.RESIDUAL_METADATA_KEY)
    if not text or fp is None:
        return None
    try:
        record = json.loads(text)
        original, init = dict(record["original"]), str(record["init"])
    except (ValueError, KeyError, TypeError):
        raise AdapterLoadError(f"adapter {folder}: unreadable {lora_init.RESIDUAL_METADATA_KEY} metadata.") from None
    what = lora_init.method_name(init)
    as_residual = F.compare(fp, model, weights=True)
    as_original = F.compare({**fp, "modules": {**fp.get("modules", {}), **original}}, model, weights=True)
    if as_residual.structural:
        return None  # another structure: _check_base reports it
    residual_rel = [m.rel_diff for m in as_residual.modules if m.path in original and m.rel_diff is not None]
    original_rel = [m.rel_diff for m in as_original.modules if m.path in original and m.rel_diff is not None]
    if residual_rel and sum(original_rel) < sum(residual_rel):
        raise AdapterLoadError(
            f"adapter {folder} was trained with {what} (init_lora_weights={init!r}), which replaced the base weights "
            f"of {len(original)} modules by residuals W - s*B0*A0, but this {type(model).__name__} has the original "
            "weights: the adapter would be applied to the wrong base. Nothing was changed. Load it onto the "
            f"residual base it was trained on, or save the trained adapter with ak.save(model, dir, "
            f"as_plain_lora=True), which writes a plain LoRA adapter for the original base."
        )
    return f"{what}: this model is the residual base the adapter was trained on (base weights modified by {what})"


def _check_base(model: nn.Module, folder: Path, fp: dict | None, check_base: str) -> F.BaseCheck:
    """Compare the file's base fingerprint with `model` before anything is attached; raise on a mismatch."""
    if fp is None:
        return F.not_verified("no fingerprint in file")
    result = F.compare(fp, model, weights=check_base != "off")
    origin = fp.get("name_or_path") or fp.get("class") or "its base"
    if fp.get("revision"):
        origin += f" (revision {fp['revision']})"
    if result.verdict == F.DIFFERENT_MODEL:
        raise AdapterLoadError(
            f"adapter {folder} was trained on a model of another structure ({origin}): "
            f"{'; '.join(result.structural[:_MAX_LISTED])}. Nothing was changed. Load it onto the model it was "
            "trained for."
        )
    if result.verdict == F.DIFFERENT_WEIGHTS:
        message = (
            f"adapter {folder} was trained on a different base (likely another revision or fine-tune) than this "
            f"{type(model).__name__}: {'; '.join(result.weight_differences[:_MAX_LISTED])}. Its base was {origin}."
        )
        if check_base == "error":
            raise AdapterLoadError(
                message + " Nothing was changed. Load it onto that base, or pass check_base='warn' (or 'off') to "
                "load it anyway."
            )
        warnings.warn(message, stacklevel=3)
        result.notes.insert(0, "loaded although the weights differ from the adapter's base (check_base='warn')")
    if check_base == "off":
        result.verdict = F.NOT_VERIFIED
        result.notes.insert(0, "weights not compared: check_base='off'")
    return result


def _plan(
    model: nn.Module, folder: Path, name: str, tensors: dict[str, torch.Tensor], allow_base_overwrite: bool
) -> tuple[R.LoadReport, list[tuple[torch.Tensor, torch.Tensor]]]:
    report = R.LoadReport(path=str(folder), adapter_name=name)
    expected = adapter_tensors(adapter_state(model), name)
    params = dict(model.named_parameters(remove_duplicate=False))
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    mismatched: list[str] = []
    for key in sorted(tensors):
        value = tensors[key]
        shape = tuple(value.shape)
        live = expected.get(key)
        if live is not None:
            if tuple(live.shape) != shape:
                mismatched.append(f"{key}: file {list(shape)}, model expects {list(live.shape)}")
                continue
            plan.append((live, value))
            report.outcomes.append(R.TensorOutcome(key, R.APPLIED, shape, key))
            continue
        base = base_parameter_for(params, key)
        if base is None:
            report.outcomes.append(R.TensorOutcome(key, R.UNEXPECTED, shape))
            continue
        base_path, base_tensor = base
        same = tuple(base_tensor.shape) == shape and torch.equal(
            distributed.full(base_tensor).cpu(), value.to(base_tensor.dtype)
        )
        if same:
            report.outcomes.append(R.TensorOutcome(key, R.IDENTICAL, shape, base_path))
        elif allow_base_overwrite and tuple(base_tensor.shape) == shape:
            plan.append((base_tensor, value))
            report.outcomes.append(R.TensorOutcome(key, R.BASE_APPLIED, shape, base_path))
        else:
            note = "" if tuple(base_tensor.shape) == shape else f"base shape {list(base_tensor.shape)}"
            report.outcomes.append(R.TensorOutcome(key, R.REFUSED, shape, base_path, note))
    if mismatched:
        raise AdapterLoadError(
            f"adapter {folder} has tensors whose shapes do not fit this model (a different base?): "
            + "; ".join(mismatched[:_MAX_LISTED])
            + (f"; and {len(mismatched) - _MAX_LISTED} more" if len(mismatched) > _MAX_LISTED else "")
        )
    report.missing = sorted(set(expected) - set(tensors))
    return report, plan


def _check(report: R.LoadReport, strict: bool) -> None:
    if report.refused:
        raise AdapterLoadError(
            f"adapter {report.path} carries tensors that would overwrite base weights: "
            f"{_listing(report.refused)}. Nothing was changed. If you really want them applied, pass "
            "allow_base_overwrite=True."
        )
    if strict and report.missing:
        raise AdapterLoadError(
            f"adapter {report.path} has no value for {len(report.missing)} adapter parameter(s) of this model: "
            f"{_listing(report.missing)}. The adapter was probably trained on a model with other modules "
            "(e.g. more layers); pass strict=False to load it anyway."
        )
    if strict and report.unexpected:
        raise AdapterLoadError(
            f"adapter {report.path} has {len(report.unexpected)} tensor(s) that match no module of this model: "
            f"{_listing(report.unexpected)}. The adapter was probably trained on a model with other modules "
            "(e.g. more layers or other names); pass strict=False to load what fits."
        )


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")
