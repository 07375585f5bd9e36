"""Comparing a recorded fingerprint with a model: per-module verdicts and the overall one; and the layout a recorded
fingerprint must have before it is compared (`layout_problem`: a damaged one is an error, never skipped).

Per module (thresholds tested in tests/checkpoint/test_fingerprint.py):
- "identical": relative L2 difference of the samples <= `IDENTICAL_REL` (1%; a bf16 cast is ~0.3%);
- "close": correlation >= `SAME_CORR` (0.9) and RMS ratio within `SCALE_RANGE` (0.8..1.25). On the real SmolLM2
  weights a 4-bit absmax round trip gives correlation >= 0.985 (group 64), >= 0.968 (per channel), NF4 >= 0.993;
  an untrained model of the same config |corr| <= 0.16 (256 samples: noise ~0.06); weights trained away from the
  recorded ones (a delta as large as the weight) ~0.7. A fine-tune that moves weights by less than 4-bit
  quantization noise cannot be told from a quantized copy by any sample, and is reported as "close";
- "different": anything else.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import AdapterLoadError
from .base_record import (
    _VOCAB_KEYS,
    base_parameters,
    embedding_shapes,
    module_base_weight,
    plain_modules,
    signable,
    structural_config,
    ties,
)
from .signature import SAMPLE, STATS_SAMPLE, _both, _flat_positions, _gather, _measure, _unpack

FINGERPRINT_VERSION = 1  # the layout `layout_problem` checks

IDENTICAL_REL = 0.01
SAME_CORR = 0.9
SCALE_RANGE = (0.8, 1.25)

SAME = "same base"
DIFFERENT_WEIGHTS = "same architecture, different weights"
DIFFERENT_MODEL = "different model"
NOT_VERIFIED = "not verified"

@dataclass
class ModuleCheck:
    path: str
    status: str  # "identical" | "close" | "different" | "absent" | "shape" | "unsigned"
    correlation: float | None = None
    rel_diff: float | None = None  # ||now - recorded|| / ||recorded|| over the sampled entries
    scale: float | None = None  # RMS now / RMS recorded
    note: str = ""

    def __str__(self) -> str:
        nums = []
        if self.correlation is not None:
            nums.append(f"corr {self.correlation:.4f}")
        if self.rel_diff is not None:
            nums.append(f"rel diff {self.rel_diff:.4f}")
        if self.scale is not None:
            nums.append(f"scale {self.scale:.3f}")
        extra = f" ({self.note})" if self.note else ""
        return f"{self.path}: {self.status}{' [' + ', '.join(nums) + ']' if nums else ''}{extra}"


@dataclass
class BaseCheck:
    verdict: str
    modules: list[ModuleCheck] = field(default_factory=list)
    structural: list[str] = field(default_factory=list)
    weight_differences: list[str] = field(default_factory=list)  # ties and modules whose weights differ
    notes: list[str] = field(default_factory=list)

    def with_status(self, *statuses: str) -> list[ModuleCheck]:
        return [m for m in self.modules if m.status in statuses]

    def describe(self) -> str:
        if self.verdict == DIFFERENT_MODEL:
            return f"{DIFFERENT_MODEL} ({_listing(self.structural)})"
        if self.verdict == DIFFERENT_WEIGHTS:
            return f"{DIFFERENT_WEIGHTS} ({_listing(self.weight_differences)})"
        if self.verdict == NOT_VERIFIED:
            return f"{NOT_VERIFIED} ({_listing(self.notes) or 'no fingerprint in file'})"
        return SAME

    def __str__(self) -> str:
        lines = [self.describe()]
        lines += [f"  {m}" for m in self.modules]
        lines += [f"  structure: {s}" for s in self.structural]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _listing(items: list[str], limit: int = 6) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def not_verified(reason: str = "no fingerprint in file") -> BaseCheck:
    return BaseCheck(NOT_VERIFIED, notes=[reason])


def compare(fp: dict | None, model: nn.Module, *, weights: bool = True) -> BaseCheck:
    """Compare a recorded fingerprint with `model` (plain or with adapters attached). weights=False: structure only."""
    if fp is None:
        return not_verified()
    problem = layout_problem(fp)
    if problem:
        raise AdapterLoadError(f"the base fingerprint is damaged: {problem}.")
    result = BaseCheck(SAME)
    now_config = structural_config(model)
    for key, recorded in sorted(fp.get("config", {}).items()):
        if key not in now_config or now_config[key] == recorded:
            continue
        text = f"config {key}: adapter's base {recorded!r}, this model {now_config[key]!r}"
        (result.notes if key in _VOCAB_KEYS else result.structural).append(text)
    if fp.get("class") and fp["class"] != type(model).__name__:
        result.notes.append(f"model class: adapter's base {fp['class']}, this model {type(model).__name__}")

    found = plain_modules(model)
    absent: list[str] = []
    to_compare: list[tuple[str, dict, torch.Tensor]] = []
    for path, sig in sorted(fp.get("modules", {}).items()):
        module = found.get(path)
        weight = module_base_weight(module) if module is not None else None
        if module is None:
            absent.append(path)
            result.modules.append(ModuleCheck(path, "absent"))
            continue
        if not signable(weight):
            # Quantized storage (packed integers, other shape), meta or absent weight: present, but not comparable.
            result.modules.append(ModuleCheck(path, "unsigned", note="weight not in a float format here; not compared"))
            continue
        rec_shape = sig.get("shape")
        now_shape = tuple(weight.shape)
        if rec_shape is not None and now_shape is not None and list(now_shape) != list(rec_shape):
            if not _vocab_rows_only(rec_shape, now_shape, fp, model):
                result.modules.append(ModuleCheck(path, "shape", note=f"adapter's base {rec_shape}, this model {list(now_shape)}"))
                result.structural.append(f"{path} has shape {list(now_shape)}, the adapter's base had {rec_shape}")
                continue
            result.notes.append(f"{path}: vocabulary rows differ (adapter's base {rec_shape[0]}, this model {now_shape[0]})")
        if not weights:
            continue
        if "sample" not in sig:
            result.modules.append(ModuleCheck(path, "unsigned", note="the adapter's base had no float weight here"))
            continue
        to_compare.append((path, sig, weight))
    result.modules += _compare_weights(to_compare)
    result.modules.sort(key=lambda m: m.path)
    if absent:
        result.structural.insert(0, f"modules absent from this model: {_listing(absent, 8)}" + _hint(absent, found))
    if result.structural:
        # Say which modules this model has beyond the adapter's base (e.g. more layers): same names, other paths.
        leaves = {p.rpartition(".")[2] for p in fp.get("modules", {})}
        extra = [p for p in found if p.rpartition(".")[2] in leaves and p not in fp.get("modules", {})]
        if extra:
            result.structural.append(f"modules of this model the adapter's base did not have: {_listing(extra, 8)}")

    if weights:
        recorded_ties = {tuple(g) for g in fp.get("ties", [])}
        now_ties = {tuple(g) for g in ties(base_parameters(model))}
        for group in sorted(recorded_ties - now_ties):
            result.weight_differences.append(f"tie {' = '.join(group)} of the adapter's base is absent here")
        for group in sorted(now_ties - recorded_ties):
            result.weight_differences.append(f"this model ties {' = '.join(group)}, the adapter's base did not")
        differing = result.with_status("different")
        if differing:
            result.weight_differences.insert(
                0, f"{len(differing)} of {len(fp.get('modules', {}))} modules differ: " + ", ".join(m.path for m in differing[:4])
                + (" ..." if len(differing) > 4 else "")
            )
        close = result.with_status("close")
        if close:
            worst = max(m.rel_diff for m in close)
            result.notes.append(
                f"{len(close)} module(s) match within quantization tolerance (largest relative difference {worst:.3f}): "
                "a quantized copy of the same base, or a very light fine-tune of it"
            )
    if result.structural:
        result.verdict = DIFFERENT_MODEL
    elif result.weight_differences:
        result.verdict = DIFFERENT_WEIGHTS
    elif weights and any(m.status == "unsigned" for m in result.modules) and not any(
        m.status in ("identical", "close") for m in result.modules
    ):
        result.verdict = NOT_VERIFIED
        result.notes.insert(0, "no module weight could be compared (quantized storage?); structure matches")
    return result


def _vocab_rows_only(rec_shape: list[int], now_shape: tuple[int, ...], fp: dict, model: nn.Module) -> bool:
    """A weight whose first dimension is the vocabulary (embedding or head rows) and only that differs."""
    if len(rec_shape) != len(now_shape) or list(rec_shape[1:]) != list(now_shape[1:]):
        return False
    rec_vocab = {fp.get("config", {}).get("vocab_size")} | {s[0] for s in fp.get("embeddings", {}).values() if s}
    now_vocab = {structural_config(model).get("vocab_size")} | {s[0] for s in embedding_shapes(model).values() if s}
    return rec_shape[0] in rec_vocab and now_shape[0] in now_vocab


def _hint(absent: list[str], found: dict[str, nn.Module]) -> str:
    """Name what this model has where the absent modules were expected (e.g. a fused qkv_proj)."""
    parents = {p.rpartition(".")[0] for p in absent}
    there = sorted(
        path for path in found if path.rpartition(".")[0] in parents and path not in absent and "." in path
    )
    if not there:
        return ""
    return f" (this model has there: {', '.join(there[:6])}{' ...' if len(there) > 6 else ''})"


def _compare_weights(items: list[tuple[str, dict, torch.Tensor]]) -> list[ModuleCheck]:
    """Compare recorded signatures with current weights, batched; rows beyond a shorter vocabulary are left out."""
    same = [i for i, (_, sig, w) in enumerate(items) if list(w.shape) == list(sig["shape"])]
    out: dict[int, ModuleCheck] = {}
    if same:
        weights = [items[i][2] for i in same]
        now, rms_now, _ = _measure(weights, [_both(w.numel()) for w in weights])
        recorded = np.stack([_unpack(items[i][1]) for i in same])
        rms_rec = np.array([items[i][1]["rms"] for i in same], dtype=np.float32)
        out.update(zip(same, _verdicts([items[i][0] for i in same], recorded, now, rms_rec, rms_now)))
    for i in sorted(set(range(len(items))) - set(same)):
        path, sig, weight = items[i]
        keep, flat = _flat_positions(sig["shape"], tuple(weight.shape), SAMPLE, 0)
        stats = _gather(weight, _flat_positions(sig["shape"], tuple(weight.shape), STATS_SAMPLE, 1)[1])
        rms_now = np.array([np.sqrt(np.mean(stats.astype(np.float64) ** 2)) if stats.size else 0.0], dtype=np.float32)
        recorded = _unpack(sig)[keep][None]
        out[i] = _verdicts([path], recorded, _gather(weight, flat)[None], np.array([sig["rms"]], np.float32), rms_now)[0]
    return [out[i] for i in range(len(items))]


def _ratio(num: np.ndarray, den: np.ndarray, if_both_zero: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.where(num == 0, if_both_zero, np.inf))


def _verdicts(
    paths: list[str], recorded: np.ndarray, now: np.ndarray, rms_rec: np.ndarray, rms_now: np.ndarray
) -> list[ModuleCheck]:
    """recorded, now: (M, K) sampled entries; rms_*: (M,). One ModuleCheck per row."""
    rel = _ratio(np.linalg.norm(now - recorded, axis=1), np.linalg.norm(recorded, axis=1), 0.0)
    scale = _ratio(rms_now, rms_rec, 1.0)
    a = recorded - recorded.mean(1, keepdims=True)
    b = now - now.mean(1, keepdims=True)
    corr = np.nan_to_num(_ratio((a * b).sum(1), np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 0.0), posinf=0.0)
    checks = []
    for path, c, r, sc in zip(paths, corr.tolist(), rel.tolist(), scale.tolist()):
        if r <= IDENTICAL_REL:
            status = "identical"
        elif c >= SAME_CORR and SCALE_RANGE[0] <= sc <= SCALE_RANGE[1]:
            status = "close"
        else:
            status = "different"
        checks.append(ModuleCheck(path, status, c, r, sc))
    return checks


# -- layout of a recorded fingerprint (what `compare` may rely on) ------------------------------------------------
_MAX_DIM = 2**40  # one dimension of a weight
_SAMPLE_B64 = 4 * math.ceil(SAMPLE * 2 / 3)  # base64 length of SAMPLE float16 values


def _is_int(v: object, low: int = 0, high: int = _MAX_DIM) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_shape(v: object, low: int = 0) -> bool:
    return isinstance(v, list) and len(v) <= 8 and all(_is_int(d, low) for d in v) and math.prod(v) <= _MAX_DIM


def _is_finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _text(v: object, optional: bool = True) -> bool:
    return (v is None and optional) or (isinstance(v, str) and len(v) <= 4096)


def layout_problem(fp: object) -> str:
    """What is wrong with a parsed fingerprint, or "" when it has the layout `compute` writes."""
    if not isinstance(fp, dict):
        return f"a JSON {type(fp).__name__}, expected an object"
    version = fp.get("version")
    if version != FINGERPRINT_VERSION or isinstance(version, bool):
        return f"'version' is {str(version)[:20]!r}; this adapterkit reads version {FINGERPRINT_VERSION}"
    for key in ("class", "name_or_path", "revision"):
        if not _text(fp.get(key)):
            return f"{key!r} must be a string or null"
    config = fp.get("config", {})
    if not isinstance(config, dict) or not all(
        isinstance(v, (str, bool)) and len(str(v)) <= 4096 or _is_int(v, -_MAX_DIM) for v in config.values()
    ):
        return "'config' must map keys to integers, strings or booleans"
    embeddings = fp.get("embeddings", {})
    if not isinstance(embeddings, dict) or not all(k in ("input", "output") and _is_shape(v)
                                                   for k, v in embeddings.items()):
        return "'embeddings' must map 'input' / 'output' to shapes (lists of sizes)"
    ties_ = fp.get("ties", [])
    if not isinstance(ties_, list) or not all(
        isinstance(g, list) and all(_text(p, optional=False) for p in g) for g in ties_
    ):
        return "'ties' must be a list of lists of parameter paths"
    modules = fp.get("modules", {})
    if not isinstance(modules, dict):
        return "'modules' must map module paths to signatures"
    for path, sig in modules.items():
        shown = path[:80]
        if not isinstance(sig, dict):
            return f"modules[{shown!r}] must be an object"
        shape = sig.get("shape")
        if not (shape is None or _is_shape(shape)):
            return f"modules[{shown!r}].shape must be a list of sizes or null, got {str(shape)[:60]}"
        if "sample" not in sig:
            continue
        sample = sig["sample"]
        if not _is_shape(shape, low=1) or not isinstance(sample, str) or len(sample) != _SAMPLE_B64:
            return f"modules[{shown!r}].sample must be {SAMPLE} base64 float16 values of a weight with a shape"
        try:
            raw = base64.b64decode(sample, validate=True)
        except (binascii.Error, ValueError):
            return f"modules[{shown!r}].sample is not base64"
        if len(raw) != SAMPLE * 2 or not np.isfinite(np.frombuffer(raw, dtype=np.float16)).all():
            return f"modules[{shown!r}].sample must hold {SAMPLE} finite float16 values"
        if not (_is_finite(sig.get("rms")) and _is_finite(sig.get("med_abs", 0))):
            return f"modules[{shown!r}].rms / med_abs must be finite non-negative numbers"
    return ""
