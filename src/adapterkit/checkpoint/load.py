"""`load`: attach an adapter from a PEFT-format directory and fill its weights, strictly, with a full report.

Everything is checked before any value is copied; on any error the adapter is removed again and the model is left
exactly as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterLoadError, ConfigError
from ..model import adapter_state, attach, delete, set_active
from . import report as R
from .format import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, adapter_tensors, base_parameter_for
from .io import read_tensors

_MAX_LISTED = 8


def locate(path: str | os.PathLike, name: str = "default") -> Path:
    """The folder holding `adapter_config.json` for adapter `name` under `path` (or `path` itself)."""
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, CONFIG_NAME):
        path = path.parent
    if not path.exists():
        raise AdapterLoadError(f"no adapter at {path}: the directory does not exist.")
    if not path.is_dir():
        raise AdapterLoadError(f"{path} is a file; pass the adapter directory (holding {CONFIG_NAME}).")
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / name / CONFIG_NAME).is_file():
        return path / name
    present = sorted(p.name for p in path.iterdir())[:_MAX_LISTED]
    raise AdapterLoadError(
        f"no {CONFIG_NAME} in {path} (it holds: {', '.join(present) or 'nothing'}); "
        "this is not a PEFT/adapterkit adapter directory."
    )


def read_adapter(path: str | os.PathLike, name: str = "default") -> tuple[Path, LoraConfig, dict, dict]:
    """(folder, config, tensors by file key, safetensors header metadata) of an adapter on disk."""
    folder = locate(path, name)
    try:
        cfg = LoraConfig.from_file(folder / CONFIG_NAME)
    except (ConfigError, TypeError) as exc:
        raise AdapterLoadError(f"{folder / CONFIG_NAME}: {exc}") from exc
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        weights = folder / LEGACY_WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterLoadError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter is incomplete.")
    tensors, metadata = read_tensors(weights)
    return folder, cfg, tensors, metadata


def load(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    strict: bool = True,
    trainable: bool = False,
    activate: bool = True,
    allow_base_overwrite: bool = False,
) -> R.LoadReport:
    """Attach adapter `name` from `path` onto `model` and fill every adapter parameter from the file.

    strict: every adapter parameter must get a value and every file tensor must be accounted for.
    allow_base_overwrite: apply file tensors that would change base weights (refused by default).
    Raises AdapterLoadError (the model unchanged) on any mismatch; returns a LoadReport otherwise.
    """
    folder, cfg, tensors, _metadata = read_adapter(path, name)
    state = adapter_state(model)
    if state is not None and name in state.configs:
        raise AdapterLoadError(f"an adapter named {name!r} is already attached; delete it or load under another name.")
    cfg = cfg.replace(inference_mode=not trainable)
    try:
        attach(model, cfg, name)
    except ConfigError as exc:
        raise AdapterLoadError(f"adapter {folder} does not fit {type(model).__name__}: {exc}") from exc

    try:
        report, plan = _plan(model, folder, name, tensors, allow_base_overwrite)
        _check(report, strict)
    except BaseException:
        delete(model, name)
        raise
    with torch.no_grad():
        for live, value in plan:
            live.copy_(value)
    report.unknown_config_keys = sorted(cfg.unknown_keys)
    report.notes.append("base not verified: the file carries no base fingerprint")
    if activate:
        set_active(model, name)
    return report


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
        same = tuple(base_tensor.shape) == shape and torch.equal(base_tensor.detach().cpu(), value.to(base_tensor.dtype))
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
