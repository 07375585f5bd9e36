"""Reading and writing adapter files safely: atomic directory replacement and clear errors for damaged files."""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import torch

from ..errors import AdapterLoadError


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


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of an adapter weights file (on CPU) and its header metadata."""
    if path.suffix == ".bin":
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged pickle
            raise AdapterLoadError(f"{path} could not be read as a PyTorch weights file: {exc}") from exc
        return dict(tensors), {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        size = path.stat().st_size if path.exists() else 0
        raise AdapterLoadError(
            f"{path} is not a readable safetensors file ({size} bytes; truncated or corrupt?): {exc}. "
            "Re-save or re-download the adapter."
        ) from exc
    return tensors, metadata
