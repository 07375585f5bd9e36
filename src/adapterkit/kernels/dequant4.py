"""The training path's 4-bit dequantizer: a bitsandbytes 4-bit weight in its compute dtype, one Triton launch a call.

`Dequant4(codes, absmax, blocksize, quant_type, shape, dtype)` is a zero-argument callable returning the (out, in)
weight, as `lora_linear` and the siblings' grouped node take a packed base's weight: called in forward and again in
backward, so no float copy outlives its GEMM. `joint_dequantizer([d_1, …])` is one callable for sibling layers
(one input width, one dtype, one quant type and blocksize) returning their weights stacked, (Σ out_i, in), from one
launch. The values are bitsandbytes' own, bit for bit (`_triton_dequant4.py`); `quantized.py` decides where this
runs (CUDA, standard layout, the weight stored in its compute dtype) and uses bitsandbytes' op elsewhere.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch

from .direct_launch import FastLaunch
from .optional_triton import kernels

_ENV = "ADAPTERKIT_DEQUANT"  # "bitsandbytes": never this kernel (read once, `set_enabled` changes it)
_enabled = os.environ.get(_ENV, "auto").strip().lower() not in ("bitsandbytes", "bnb", "0", "off")
_failed = False  # the kernel failed once here (a Triton that cannot compile it): bitsandbytes' op from then on
_tables: dict[tuple[str, int], torch.Tensor] = {}  # (quant type, device index) -> bitsandbytes' 16 values, float32


def set_enabled(enabled: bool) -> None:
    """Use the Triton dequantizer where it applies (the default) or always bitsandbytes' op
    (`ADAPTERKIT_DEQUANT=bitsandbytes` sets the latter for a whole process)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    """Not turned off, and the kernel has not failed here."""
    return _enabled and not _failed


def available(device: torch.device | int | str) -> bool:
    """Whether `Dequant4` runs for tensors on `device`: CUDA with a usable Triton, not turned off, never failed."""
    return enabled() and torch.device(device).type == "cuda" and kernels("_triton_dequant4") is not None


def _fail(exc: Exception) -> None:
    global _failed
    _failed = True
    warnings.warn(f"4-bit dequantize kernel failed ({type(exc).__name__}: {exc}); using bitsandbytes' op.",
                  RuntimeWarning, stacklevel=3)


def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' 16 dequantized code values for `quant_type` ("nf4" / "fp4") on `device`, float32: its own
    dequantize op run once on all sixteen codes with absmax 1, so every value is exactly what its kernel uses."""
    device = torch.device(device)
    key = (quant_type, -1 if device.index is None else device.index)
    table = _tables.get(key)
    if table is None:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        codes = torch.tensor([[(2 * i << 4) | (2 * i + 1)] for i in range(8)], dtype=torch.uint8, device=device)
        ones = torch.ones(1, dtype=torch.float32, device=device)
        with torch.inference_mode(False), torch.no_grad():
            table = torch.ops.bitsandbytes.dequantize_4bit.default(codes, ones, 64, quant_type, (16,), torch.float32)
        table = _tables[key] = table.reshape(16).contiguous()
    return table


class _Launch:
    """One kernel launch over fixed weights: its arguments but the output, its grid, and its launch."""

    __slots__ = ("run", "grid", "args", "device")

    def __init__(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor, int]], blocksize: int, table: torch.Tensor):
        mod = kernels("_triton_dequant4")
        self.run = FastLaunch(mod.launch_for(len(parts), blocksize))
        self.grid = mod.grid_for(tuple(n for _, _, n in parts))
        self.args = mod.kernel_args(table, tuple(parts))  # everything after the output
        self.device = table.get_device()

    def into(self, out: torch.Tensor) -> torch.Tensor:
        device = self.device
        if 0 <= device != torch.cuda.current_device():  # Triton launches on the current device, not the inputs'
            with torch.cuda.device(device):
                return self.into(out)
        self.run(self.grid, (out, *self.args), not out.data_ptr() & 15)  # the fixed operands keep their alignment
        return out


class Dequant4:
    """A standard-layout bitsandbytes 4-bit weight as a zero-argument callable returning it, (out, in) in `dtype`.

    codes: the packed data (any storage dtype; two codes per byte, high nibble first); absmax: float32 per block
    (double quantization undone); shape: (out, in). The caller checks `available(codes.device)`. Should the kernel
    fail (one warning), this and every later call return bitsandbytes' op's values instead, which are the same.
    `source` and `ptr` are its owner's (what it was built from, to tell when it is stale). Pickled or copied, it
    becomes None: its launch holds compiled kernels, and its owner builds a new one when it finds none."""

    __slots__ = ("codes", "absmax", "blocksize", "quant_type", "shape", "dtype", "numel", "table", "_launch", "source",
                 "ptr")

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape,
                 dtype: torch.dtype) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.numel = self.shape[0] * self.shape[1]
        self.codes = codes.reshape(-1).view(torch.uint8)[: (self.numel + 1) // 2]
        self.absmax = absmax.reshape(-1)
        if self.absmax.dtype != torch.float32 or self.absmax.numel() * blocksize < self.numel:
            raise ValueError(f"absmax must be float32 with one value per block of {blocksize}")
        self.blocksize, self.quant_type, self.dtype = blocksize, quant_type, dtype
        self.table = code_table(quant_type, codes.device)
        self._launch: _Launch | None = None
        self.source = self.ptr = None

    def __reduce__(self):
        return _none, ()

    def part(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.codes, self.absmax, self.numel

    def __call__(self) -> torch.Tensor:
        if not _failed:
            try:
                launch = self._launch
                if launch is None:
                    launch = self._launch = _Launch((self.part(),), self.blocksize, self.table)
                return launch.into(torch.empty(self.shape, dtype=self.dtype, device=self.codes.device))
            except Exception as exc:  # bitsandbytes' op is always there, with the same values
                _fail(exc)
        return self.by_bitsandbytes()

    def by_bitsandbytes(self) -> torch.Tensor:
        return torch.ops.bitsandbytes.dequantize_4bit.default(self.codes, self.absmax, self.blocksize,
                                                              self.quant_type, self.shape, self.dtype)


class JointDequant4:
    """Sibling weights of one input width as one zero-argument callable returning them stacked, (Σ out_i, in), from
    one launch; `rows` gives each member's (start, out_i) in it. Pickled or copied, it becomes None."""

    __slots__ = ("members", "shape", "rows", "dtype", "device", "_launch")

    def __init__(self, members: Sequence[Dequant4]) -> None:
        first = members[0]
        self.members = tuple(members)
        out = [d.shape[0] for d in members]
        self.shape = (sum(out), first.shape[1])
        starts = [sum(out[:i]) for i in range(len(out))]
        self.rows = tuple(zip(starts, out))
        self.dtype, self.device = first.dtype, first.codes.device
        self._launch: _Launch | None = None

    def __reduce__(self):
        return _none, ()

    def __call__(self) -> torch.Tensor:
        if not _failed:
            try:
                launch = self._launch
                if launch is None:
                    first = self.members[0]
                    launch = self._launch = _Launch([d.part() for d in self.members], first.blocksize, first.table)
                return launch.into(torch.empty(self.shape, dtype=self.dtype, device=self.device))
            except Exception as exc:  # bitsandbytes' op, a call per member
                _fail(exc)
        return torch.cat([d.by_bitsandbytes() for d in self.members])


def _none() -> None:
    return None


def joint_dequantizer(weights: Sequence) -> JointDequant4 | None:
    """One launch for all of `weights` where they can share one: each a `Dequant4`, two to MAX_SEGMENTS of them, with
    one input width, dtype, device, quant type and blocksize. Else None (each is called on its own)."""
    if _failed or not 2 <= len(weights) or not all(type(w) is Dequant4 for w in weights):
        return None
    mod = kernels("_triton_dequant4")
    first = weights[0]
    if mod is None or len(weights) > mod.MAX_SEGMENTS:
        return None
    if any(w.shape[1] != first.shape[1] or w.dtype is not first.dtype or w.codes.device != first.codes.device
           or w.quant_type != first.quant_type or w.blocksize != first.blocksize for w in weights[1:]):
        return None
    return JointDequant4(weights)
