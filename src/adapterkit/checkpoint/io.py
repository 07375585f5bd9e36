"""Reading and writing adapter files safely: atomic directory replacement and clear errors for damaged files."""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import torch

from ..config import parse_json
from ..errors import AdapterLoadError, ConfigError


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` in one atomic exchange.

    A crash or kill at any point leaves either the previous `target` or the new one, complete (at worst a stray
    `.tmp-*` folder beside it).
    Entries of an existing `target` that the new tree does not contain are carried over (hard links where possible),
    so saving an adapter into a folder that also holds, say, a tokenizer loses nothing.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.is_dir():
            _carry_over(target, tmp)
        _fsync_tree(tmp)
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous tree
        elif target.exists():
            # No atomic exchange here (not Linux, or a filesystem without it): two renames, with a moment in
            # which `target` is absent and the previous tree sits in `.<name>.old-*` beside it.
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _carry_over(old: Path, new: Path) -> None:
    for entry in old.iterdir():
        dest = new / entry.name
        if entry.name.startswith(f".{old.name}.") or dest.exists():
            continue
        if entry.is_dir():
            new_dir = dest
            new_dir.mkdir()
            _carry_over(entry, new_dir)
        else:
            try:
                os.link(entry, dest)
            except OSError:
                shutil.copy2(entry, dest)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


# Bounds on what a weights file may ask for, checked from its first bytes before anything is allocated. No real
# adapter comes near them (a 70B model's all-linear LoRA has ~1,200 tensors and a header of a few hundred KB).
MAX_HEADER_BYTES = 64 * 2**20
MAX_TENSORS = 100_000
MAX_NDIM = 8
# Largest |value| accepted in an adapter tensor: what float16 can hold. Trained adapter values are orders of
# magnitude smaller; anything larger is damage (a flipped exponent bit) and would overflow the model's activations.
MAX_ABS_VALUE = 65504.0
# safetensors dtype names of the float types an adapter's weights may have, and their sizes in bytes.
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
                 "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of an adapter weights file (on CPU) and its header metadata, every one checked.

    Refused with an AdapterLoadError naming the file and the tensor: a header over `MAX_HEADER_BYTES` or with more
    than `MAX_TENSORS` entries, entries whose dtype is not a float type, shapes and offsets that do not add up, and
    values that are not finite or exceed `MAX_ABS_VALUE`. The header is checked from the file's first bytes before
    safetensors maps anything.
    """
    if path.suffix == ".bin":
        return _read_pickle(path)
    from safetensors import SafetensorError, safe_open

    _check_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise _unreadable(path, exc) from exc
    _check_values(path, tensors)
    return tensors, metadata


def _unreadable(path: Path, reason: object) -> AdapterLoadError:
    size = path.stat().st_size if path.exists() else 0
    return AdapterLoadError(
        f"{path} is not a readable safetensors file ({size} bytes; truncated or corrupt?): {reason}. "
        "Re-save or re-download the adapter."
    )


def _check_header(path: Path) -> None:
    """The safetensors header (8-byte little-endian length, then JSON) within bounds and self-consistent."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                if length > MAX_HEADER_BYTES:
                    raise AdapterLoadError(
                        f"{path} declares a header of {length:,} bytes; adapterkit reads headers up to "
                        f"{MAX_HEADER_BYTES:,}. The file is damaged or not an adapter."
                    )
                raise _unreadable(path, f"the header length field says {length:,} bytes")
            raw = fh.read(length)
    except OSError as exc:
        raise AdapterLoadError(f"{path} could not be read: {exc.strerror or exc}.") from exc
    try:
        header = parse_json(raw.decode("utf-8"), f"{path} header", MAX_HEADER_BYTES)
    except (UnicodeDecodeError, ConfigError) as exc:
        raise _unreadable(path, exc) from exc
    if not isinstance(header, dict):
        raise _unreadable(path, f"the header is a JSON {type(header).__name__}, not an object")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > MAX_TENSORS:
        raise AdapterLoadError(
            f"{path} lists {len(entries):,} tensors; adapterkit reads at most {MAX_TENSORS:,}. The file is damaged or "
            "not an adapter."
        )
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _unreadable(path, "__metadata__ must map names to strings")
    data_bytes = size - 8 - length
    for key, entry in entries.items():
        _check_entry(path, key, entry, data_bytes)


def _check_entry(path: Path, key: str, entry: object, data_bytes: int) -> None:
    shown = key if len(key) <= 200 else key[:197] + "..."
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _unreadable(path, f"tensor {shown!r} has no dtype / shape / data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in FLOAT_DTYPES:
        kind = "an integer or bool" if dtype in _OTHER_DTYPES and dtype[0] in "IUB" else "not a float"
        raise AdapterLoadError(
            f"{path}: tensor {shown!r} has dtype {str(dtype)[:20]!r}, {kind} type; adapter weights are float "
            f"({', '.join(FLOAT_DTYPES)}). The file is damaged or not an adapter."
        )
    ints = lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
    if not ints(shape) or len(shape) > MAX_NDIM or not ints(offsets) or len(offsets) != 2:
        raise _unreadable(path, f"tensor {shown!r} has shape {str(shape)[:60]} and offsets {str(offsets)[:60]}")
    begin, end = offsets
    if not begin <= end <= data_bytes or math.prod(shape) * FLOAT_DTYPES[dtype] != end - begin:
        raise _unreadable(
            path, f"tensor {shown!r} ({dtype}, shape {shape}) does not fit its byte range [{begin}, {end}) of a "
            f"{data_bytes:,}-byte data section"
        )


def _check_values(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor finite and within MAX_ABS_VALUE (one min/max pass per tensor, in its own dtype)."""
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = type(value).__name__ if not isinstance(value, torch.Tensor) else f"dtype {value.dtype}"
            raise AdapterLoadError(f"{path}: tensor {key!r} is {what}; adapter weights are float tensors.")
        if value.numel() == 0:
            continue
        low, high = torch.aminmax(value)  # one pass, no copy; NaN if any entry is NaN, +-inf if any is infinite
        largest = max(-float(low), float(high)) if not math.isnan(float(low)) else math.nan
        if largest <= MAX_ABS_VALUE:
            continue
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise AdapterLoadError(
                f"{path}: tensor {key!r} holds {bad} non-finite value(s) (NaN/Inf) of {value.numel()}; nothing was "
                "loaded. The training run diverged or the file is damaged: use an earlier checkpoint."
            )
        raise AdapterLoadError(
            f"{path}: tensor {key!r} holds a value of magnitude {largest:.3g}, beyond the {MAX_ABS_VALUE:g} an "
            "adapter weight can have (float16's range); nothing was loaded. The file is damaged."
        )


def _read_pickle(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle
        raise AdapterLoadError(f"{path} could not be read as a PyTorch weights file: {exc}") from exc
    if not isinstance(tensors, dict) or not all(isinstance(k, str) for k in tensors):
        raise AdapterLoadError(f"{path} holds a {type(tensors).__name__}, not a mapping of tensor names to tensors.")
    if len(tensors) > MAX_TENSORS:
        raise AdapterLoadError(f"{path} holds {len(tensors):,} entries; adapterkit reads at most {MAX_TENSORS:,}.")
    tensors = dict(tensors)
    _check_values(path, tensors)
    return tensors, {}
