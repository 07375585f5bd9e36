"""Base-model fingerprint: what an adapter was trained on, recorded at save and checked at load.

The fingerprint is a small JSON document stored in the safetensors header metadata under `METADATA_KEY` (PEFT and
other readers ignore metadata, so the file stays a valid PEFT adapter). It holds:

- `class`, `config`: the model class and its structural config keys (`STRUCTURAL_KEYS`: sizes, layers, heads, vocab);
- `name_or_path`, `revision`: where the base came from, when transformers knows it;
- `embeddings`: input / output embedding shapes; `ties`: groups of parameter paths that share one tensor (identity);
- `modules`: for every module the adapter targets, the shape and a **weight signature** of its *base* weight
  (the original weight when merged, never a modules_to_save copy).

Weight signature (cheap: 20-60 ms for the 210 linear layers of a 135M model on a busy 2-core CPU; see
bench/fingerprint_cost.py):
`SAMPLE` entries (64 runs of 4 consecutive entries) at fixed pseudo-random offsets (a splitmix64 hash of the run
number, so the same positions at save and load for one shape, on any platform), kept as float16 after division by
the weight's RMS; plus robust statistics: the RMS of `STATS_SAMPLE` entries (64 runs of 64) and the median |w| of the
sample. Runs, because the cost is cache misses, not arithmetic. Everything is computed in float32, so a bf16 / fp16
copy of the base gives the same signature up to rounding. A weight of a vocabulary-sized first dimension that only
differs in rows (tokens added) is compared over the rows both have.

Comparison, per module (thresholds tested in tests/checkpoint/test_fingerprint.py):
- "identical": relative L2 difference of the samples <= `IDENTICAL_REL` (1%; a bf16 cast is ~0.3%);
- "close": correlation >= `SAME_CORR` (0.9) and RMS ratio within `SCALE_RANGE` (0.8..1.25). On the real SmolLM2
  weights a 4-bit absmax round trip gives correlation >= 0.985 (group 64), >= 0.968 (per channel), NF4 >= 0.993;
  an untrained model of the same config |corr| <= 0.16 (256 samples: noise ~0.06); weights trained away from the
  recorded ones (a delta as large as the weight) ~0.7. A fine-tune that moves weights by less than 4-bit
  quantization noise cannot be told from a quantized copy by any sample, and is reported as "close";
- "different": anything else.

API:
    fp = compute(model, modules=None)             # dict (JSON-ready); modules: paths to sign (default: adapter targets)
    meta = to_metadata(fp); fp = from_metadata(meta)   # {METADATA_KEY: json string} <-> dict (None if absent)
    result = compare(fp, model, weights=True)     # -> BaseCheck
    result.verdict        # SAME | DIFFERENT_WEIGHTS | DIFFERENT_MODEL | NOT_VERIFIED
    result.structural     # list of str: structure differences (absent modules, shapes, config keys)
    result.modules        # list of ModuleCheck(path, status, correlation, rel_diff, scale, note)
    result.notes          # list of str: things noticed that decide nothing (vocabulary size, class name, ...)
    result.describe()     # one line: the verdict with its reason, as `LoadReport.base_check` shows it
    str(result)           # verdict line plus one line per module: what a `verify` command prints
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import nn

METADATA_KEY = "adapterkit.base_fingerprint"
VERSION = 1
SAMPLE = 256  # entries kept per weight for the correlation test
STATS_SAMPLE = 4096  # entries the RMS statistic is computed from
_RUNS = (4, 64)  # consecutive entries per sampled position: (correlation sample, statistics sample)

IDENTICAL_REL = 0.01
SAME_CORR = 0.9
SCALE_RANGE = (0.8, 1.25)

SAME = "same base"
DIFFERENT_WEIGHTS = "same architecture, different weights"
DIFFERENT_MODEL = "different model"
NOT_VERIFIED = "not verified"

# Config keys that decide parameter shapes or how they are wired; read with getattr so aliases (GPT-2's n_embd for
# hidden_size) resolve. Names, dtypes, rope scaling and position limits are deliberately absent.
STRUCTURAL_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "n_inner",
    "n_positions",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "d_ff",
    "d_kv",
    "encoder_layers",
    "decoder_layers",
)
# Vocabulary size may differ legitimately (tokens added before training, restored by the vocabulary code).
_VOCAB_KEYS = ("vocab_size",)


# -- sampling ------------------------------------------------------------------------------------------------------
def _mix(x: int) -> int:
    """splitmix64: a fixed integer hash, identical on every platform and torch version."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


@lru_cache(maxsize=64)
def _positions(numel: int, count: int, salt: int, run: int) -> np.ndarray:
    """`count` flat positions in [0, numel), in runs of `run` consecutive entries starting at hashed offsets.

    Runs, not single entries: the cost is cache misses, so 64 runs of 64 entries cost about what 64 entries do.
    A small weight gives every entry, repeated to `count`.
    """
    if numel <= count:
        return np.arange(count, dtype=np.int64) % numel
    starts = np.array([_mix(i + salt * 1_000_003) % (numel - run + 1) for i in range(count // run)], dtype=np.int64)
    return np.sort(starts)[:, None] + np.arange(run, dtype=np.int64)[None, :]


def _flat_positions(rec_shape: list[int], now_shape: tuple[int, ...], count: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions chosen for the recorded shape, mapped into a weight whose first dimension may differ (vocabulary).

    Returns (index into the recorded sample, flat index into the current weight) for positions that exist in both.
    """
    pos = _positions(math.prod(rec_shape), count, salt, _RUNS[salt]).reshape(-1)
    if list(now_shape) == list(rec_shape):
        return np.arange(len(pos)), pos
    keep = np.nonzero(pos // math.prod(rec_shape[1:]) < now_shape[0])[0]
    return keep, pos[keep]


@lru_cache(maxsize=64)
def _both(numel: int) -> np.ndarray:
    return np.concatenate([_positions(numel, SAMPLE, 0, _RUNS[0]).reshape(-1), _positions(numel, STATS_SAMPLE, 1, _RUNS[1]).reshape(-1)])


def _gather(weight: torch.Tensor, flat: np.ndarray) -> np.ndarray:
    """weight.flatten()[flat] as float32 numpy.

    numpy on CPU on purpose: a few hundred tiny torch ops each pay thread-pool start-up, which on a busy machine
    costs milliseconds apiece; numpy's `take` costs microseconds. bfloat16 is widened exactly from its bit pattern.
    """
    w = weight.detach()
    w = w.reshape(-1) if w.is_contiguous() else w.contiguous().reshape(-1)
    if w.device.type == "cpu" and w.dtype in (torch.float32, torch.float16, torch.float64):
        return w.numpy().take(flat).astype(np.float32)
    if w.device.type == "cpu" and w.dtype == torch.bfloat16:
        bits = w.view(torch.int16).numpy().take(flat).astype(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return w.index_select(0, torch.from_numpy(flat).to(w.device)).float().cpu().numpy()


def _measure(weights: list[torch.Tensor], positions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched over weights: (sampled entries (M, SAMPLE), RMS (M,), median |sample| (M,)), all float32."""
    rows = np.stack([_gather(w, pos) for w, pos in zip(weights, positions)])  # (M, SAMPLE + STATS_SAMPLE)
    sample, stats = rows[:, :SAMPLE], rows[:, SAMPLE:]
    rms = np.sqrt(np.einsum("ij,ij->i", stats, stats, dtype=np.float64) / max(stats.shape[1], 1)).astype(np.float32)
    return sample, rms, np.median(np.abs(sample), axis=1)


def signatures(weights: list[torch.Tensor]) -> list[dict]:
    """The signature of each weight: shape, RMS-normalised float16 sample (base64), RMS and median |w| (float32)."""
    if not weights:
        return []
    sample, rms, med = _measure(weights, [_both(w.numel()) for w in weights])
    scaled = np.where(rms[:, None] > 0, sample / np.maximum(rms, 1e-30)[:, None], sample)
    packed = np.nan_to_num(scaled.astype(np.float16))  # (M, SAMPLE); overflow (never for real weights) -> fp16 max
    return [
        {"shape": list(w.shape), "rms": r, "med_abs": m, "sample": base64.b64encode(row.tobytes()).decode("ascii")}
        for w, r, m, row in zip(weights, rms.tolist(), med.tolist(), packed)
    ]


def signature(weight: torch.Tensor) -> dict:
    return signatures([weight])[0]


def _unpack(sig: dict) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(sig["sample"]), dtype=np.float16).astype(np.float32)
    return values * sig["rms"] if sig["rms"] > 0 else values


# -- what is recorded ----------------------------------------------------------------------------------------------
def _state(model: nn.Module):
    from ..model import adapter_state

    return adapter_state(model)


def _plain_path(path: str) -> str:
    return path.replace(".base_layer.", ".").replace(".base_layer", "")


def _module_base_weight(module: nn.Module) -> torch.Tensor | None:
    """The base weight of a (possibly wrapped, possibly merged) module, as it was before any merge."""
    from ..methods.base import AdapterWrapper

    if isinstance(module, AdapterWrapper):
        if module.merged_names and module._unmerged_weight is not None:
            return module._unmerged_weight
        weight = getattr(module.base_layer, "weight", None)
        if module.merged_names and weight is not None and hasattr(module, "delta_weight"):
            # Merged without keeping the original: subtract the deltas again (rare; costs one delta per adapter).
            try:
                base = weight.detach().float()
                for name in module.merged_names:
                    base = base - module.delta_weight(name)
                return base
            except NotImplementedError:
                return weight
        return weight
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of the plain model by their plain path; a wrapper stands for the module it wraps."""
    from ..methods.base import AdapterWrapper

    out: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        out[prefix] = module
        inner = module.base_layer if isinstance(module, AdapterWrapper) else module
        for child_name, child in inner.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return out


def _base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base parameters by plain path (adapter parameters left out, merged weights replaced by their originals)."""
    state = _state(model)
    wrappers = state.wrappers if state is not None else {}
    adapter_attrs = {"_unmerged_weight"}
    for wrapper in wrappers.values():
        adapter_attrs.update(wrapper.adapter_containers)
    originals = {
        f"{path}.weight": w._unmerged_weight
        for path, w in wrappers.items()
        if w.merged_names and w._unmerged_weight is not None
    }
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        # An adapter parameter sits under `<wrapper path>.<adapter container>.`; names, not a walk over every
        # adapter's parameters (that walk alone would cost more than the whole signature).
        if not adapter_attrs.isdisjoint(parts) and any(
            part in adapter_attrs and ".".join(parts[:i]) in wrappers for i, part in enumerate(parts)
        ):
            continue
        plain = _plain_path(name)
        out[plain] = originals.get(plain, p)
    return out


def _ties(params: dict[str, torch.Tensor]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for path, p in params.items():
        groups.setdefault(id(p), []).append(path)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def _config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    out = {}
    for key in STRUCTURAL_KEYS:
        try:
            value = getattr(config, key, None)
        except Exception:  # some configs raise on unknown attribute aliases
            value = None
        if isinstance(value, (int, str, bool)):
            out[key] = value
    return out


def _embeddings(model: nn.Module) -> dict:
    out = {}
    for key, getter in (("input", "get_input_embeddings"), ("output", "get_output_embeddings")):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):
            module = None
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            out[key] = list(weight.shape)
    return out


def _signable(weight: torch.Tensor | None) -> bool:
    return weight is not None and weight.dtype.is_floating_point and weight.numel() > 0 and weight.device.type != "meta"


def compute(model: nn.Module, modules: list[str] | None = None) -> dict:
    """The fingerprint of `model`'s base. `modules`: plain paths to sign (default: every module an adapter wraps)."""
    if modules is None:
        state = _state(model)
        modules = sorted(state.wrappers) if state is not None else []
    config = getattr(model, "config", None)
    revision = getattr(config, "_commit_hash", None) if config is not None else None
    found = _plain_modules(model)
    signed, to_sign = {}, {}
    for path in modules:
        module = found.get(path)
        weight = _module_base_weight(module) if module is not None else None
        if not _signable(weight):
            signed[path] = {"shape": list(weight.shape) if weight is not None else None}
        else:
            to_sign[path] = weight
    signed.update(zip(to_sign, signatures(list(to_sign.values()))))
    return {
        "version": VERSION,
        "class": type(model).__name__,
        "config": _config(model),
        "name_or_path": (getattr(config, "_name_or_path", None) or None) if config is not None else None,
        "revision": revision,
        "embeddings": _embeddings(model),
        "ties": _ties(_base_parameters(model)),
        "modules": signed,
    }


def to_metadata(fp: dict) -> dict[str, str]:
    """safetensors metadata entries (values must be strings)."""
    return {METADATA_KEY: json.dumps(fp, separators=(",", ":"), sort_keys=True)}


def from_metadata(metadata: dict[str, str] | None) -> dict | None:
    """The fingerprint stored in a file's metadata, or None when the file has none (PEFT-made) or it is unreadable."""
    text = (metadata or {}).get(METADATA_KEY)
    if not text:
        return None
    try:
        fp = json.loads(text)
    except ValueError:
        return None
    return fp if isinstance(fp, dict) and fp.get("version") == VERSION else None


# -- comparison ----------------------------------------------------------------------------------------------------
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
    result = BaseCheck(SAME)
    now_config = _config(model)
    for key, recorded in sorted(fp.get("config", {}).items()):
        if key not in now_config or now_config[key] == recorded:
            continue
        text = f"config {key}: adapter's base {recorded!r}, this model {now_config[key]!r}"
        (result.notes if key in _VOCAB_KEYS else result.structural).append(text)
    if fp.get("class") and fp["class"] != type(model).__name__:
        result.notes.append(f"model class: adapter's base {fp['class']}, this model {type(model).__name__}")

    found = _plain_modules(model)
    absent: list[str] = []
    to_compare: list[tuple[str, dict, torch.Tensor]] = []
    for path, sig in sorted(fp.get("modules", {}).items()):
        module = found.get(path)
        weight = _module_base_weight(module) if module is not None else None
        if module is None:
            absent.append(path)
            result.modules.append(ModuleCheck(path, "absent"))
            continue
        if not _signable(weight):
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
        now_ties = {tuple(g) for g in _ties(_base_parameters(model))}
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
    now_vocab = {_config(model).get("vocab_size")} | {s[0] for s in _embeddings(model).values() if s}
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
