"""Weight signatures: a few hundred entries of a weight, sampled at fixed positions, that survive casts and quantization.

`SAMPLE` entries (64 runs of 4 consecutive entries) at fixed pseudo-random offsets (a splitmix64 hash of the run
number, so the same positions at save and load for one shape, on any platform), kept as float16 after division by
the weight's RMS; plus robust statistics: the RMS of `STATS_SAMPLE` entries (64 runs of 64) and the median |w| of the
sample. Runs, because the cost is cache misses, not arithmetic. Everything is computed in float32, so a bf16 / fp16
copy of the base gives the same signature up to rounding. Cost: 20-60 ms for the 210 linear layers of a 135M model on
a busy 2-core CPU (bench/fingerprint_cost.py).
"""

from __future__ import annotations

import base64
import math
from functools import lru_cache

import numpy as np
import torch

from ..distributed import full

SAMPLE = 256  # entries kept per weight for the correlation test
STATS_SAMPLE = 4096  # entries the RMS statistic is computed from
_RUNS = (4, 64)  # consecutive entries per sampled position: (correlation sample, statistics sample)


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
    A sharded (FSDP2) weight is gathered first, so every rank signs the whole weight (a collective).
    """
    w = full(weight)
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


def _unpack(sig: dict) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(sig["sample"]), dtype=np.float16).astype(np.float32)
    return values * sig["rms"] if sig["rms"] > 0 else values

