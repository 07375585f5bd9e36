"""Reading and writing adapter files safely: atomic directory replacement and clear errors for damaged files."""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import socket
import stat
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import torch

from ..config import parse_json
from ..errors import AdapterLoadError, AdapterSaveError, ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock, so a stale temp folder cannot be told from a running save and is kept
    fcntl = None

# Written into every temp folder of a save, and held under an exclusive flock while that save runs: a `.tmp-*`
# folder whose marker is unlocked was left by a save that died, and the next save into the same target removes it.
MARKER = ".adapterkit-save"
_MARKER_HEADER = "adapterkit save in progress"
_PROC_STATUS = "/proc/self/status"


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` in one atomic exchange.

    A crash or kill at any point leaves either the previous `target` or the new one, complete (at worst a stray
    `.tmp-*` folder beside it, which the next save into `target` removes).
    Entries of an existing `target` that the new tree does not contain are carried over (hard links where possible),
    so saving an adapter into a folder that also holds, say, a tokenizer loses nothing.
    What the caller wrote gets the modes a plain mkdir/open gives under the process umask (mkdtemp makes 0700 and
    safetensors writes 0600, which would hide the adapter from other users); carried-over entries keep theirs.
    """
    target = _writable_folder(Path(target).absolute())
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    lock = None
    try:
        lock = _write_marker(tmp)
        yield tmp
        _ordinary_modes(tmp, current_umask())
        if target.is_dir():
            _carry_over(target, tmp)
        _fsync_tree(tmp)
        if target.exists() and _exchange(tmp, target):
            # `tmp` now holds the previous tree: the marker goes with it, so that a kill during the removal below
            # leaves a folder the next save recognises as stale.
            _move_marker(target, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        elif target.exists():
            # No atomic exchange here (not Linux, or a filesystem without it): two renames, with a moment in
            # which `target` is absent and the previous tree sits in `.<name>.old-*` beside it.
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            _move_marker(target, old)  # only now is the previous tree disposable
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
            _move_marker(target, None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)  # releases the flock


def output_folder_problem(target: str | os.PathLike) -> str | None:
    """Why a save into `target` would be refused, or None; nothing is created. A save writes a folder, so a file
    (or a link to a file or to nothing) at the path, or a file among its parents, is a problem; a folder, a link to
    a folder or a path that does not exist yet is not."""
    target = Path(target).absolute()
    if target.is_symlink() and target.is_dir():
        return None  # a link to a folder (say `latest` -> `run-12`): the save goes into run-12
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        what = "a symbolic link" if target.is_symlink() else "a file" if target.is_file() else "not a folder"
        return (f"{target} exists and is {what}, not a directory; nothing was written. What is saved there is a "
                "folder of files: give a folder path, or move that entry away first.")
    return _parent_problem(target)


def _parent_problem(path: Path) -> str | None:
    """Why `path`'s parent folders cannot be created (a file stands where a folder must), or None."""
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is None:
        return None
    return f"cannot write {path}: {blocking} is a file, not a directory; nothing was written."


def _writable_folder(target: Path) -> Path:
    """The folder a save into `target` replaces: `target`, or the folder a symbolic link there points to, with its
    parents created. Anything else at the path is refused before a byte is written (`output_folder_problem`): the
    exchange would otherwise put the new folder in its place and delete it."""
    problem = output_folder_problem(target)
    if problem is not None:
        raise AdapterSaveError(problem)
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def make_parent(path: Path) -> None:
    """Create `path`'s parent folders, or refuse with the entry on the way that is a file, not a folder."""
    problem = _parent_problem(path)
    if problem is not None:
        raise AdapterSaveError(problem)
    path.parent.mkdir(parents=True, exist_ok=True)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored at once."""
    try:
        with open(_PROC_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # os.umask can only be read by setting it: the restrictive value covers files other threads create meanwhile.
    old = os.umask(0o077)
    os.umask(old)
    return old


def _ordinary_modes(root: Path, umask: int) -> None:
    """Folders 0777 & ~umask; files get read/write for all (execute bits kept), minus the umask."""
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        if path.name == MARKER or path.is_symlink():
            continue
        mode = 0o777 if path.is_dir() else stat.S_IMODE(path.stat().st_mode) | 0o666
        os.chmod(path, mode & ~umask)


def _write_marker(folder: Path) -> int | None:
    """Create `folder/MARKER` already locked (written under another name, renamed once the flock is held).

    Returns the open descriptor holding the lock; None where flock does not exist or the filesystem refuses it
    (then the folder has no marker and is never taken for stale).
    """
    if fcntl is None:
        return None
    partial = folder / f"{MARKER}.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # e.g. ENOLCK on a network filesystem without a lock service
        os.close(fd)
        os.unlink(partial)
        return None
    try:
        os.write(fd, f"{_MARKER_HEADER}\npid {os.getpid()}\nhost {socket.gethostname()}\n".encode())
        os.rename(partial, folder / MARKER)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _move_marker(src: Path, dest: Path | None) -> None:
    """Move the marker out of the finished `src` into the folder about to be deleted (or drop it)."""
    marker = src / MARKER
    if not marker.exists():  # no flock here: none was written
        return
    try:
        if dest is None:
            os.unlink(marker)
        else:
            os.rename(marker, dest / MARKER)
    except OSError:
        try:
            os.unlink(marker)
        except OSError:
            pass  # a leftover hidden file; the next save over `target` drops it


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete temp folders beside `target` left by saves that died; returns those removed.

    A folder is removed only if its name is one this module gives (`.<name>.tmp-*` or `.<name>.old-*`), it holds a
    marker file written by this module, and no process holds the marker's lock (a running save holds it until it
    ends; the kernel releases it when a process dies, however it dies).
    """
    removed: list[Path] = []
    if fcntl is None:
        return removed
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefixes) or entry.is_symlink() or not entry.is_dir():
            continue
        if _remove_if_unlocked(entry):
            removed.append(entry)
    return removed


def _remove_if_unlocked(folder: Path) -> bool:
    marker = folder / MARKER
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return False
        fd = os.open(marker, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False  # no marker: not made by this module (or by a save from before markers existed)
    try:
        if os.read(fd, len(_MARKER_HEADER)).decode(errors="replace") != _MARKER_HEADER:
            return False
        try:
            # Shared is enough to see the saver's exclusive lock, and needs only read access (NFS emulates flock
            # with byte-range locks, which refuse an exclusive lock on a read-only descriptor).
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return False  # held: a save is writing into this folder right now
        shutil.rmtree(folder, ignore_errors=True)
        return not folder.exists()
    finally:
        os.close(fd)


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
            os.chmod(new_dir, stat.S_IMODE(entry.stat().st_mode))  # a carried folder keeps its mode
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
