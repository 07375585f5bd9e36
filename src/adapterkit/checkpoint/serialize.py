"""Byte-stable safetensors files: the same tensors and metadata always give the same bytes.

safetensors (0.8) serialises `__metadata__` from a hash map with a random seed, so its key order differs between
saves. `to_bytes` lets safetensors lay out the tensor data, then rewrites the JSON header with sorted keys and compact
separators, padded with spaces to a multiple of 8 bytes as the format requires (the data offsets do not change), and
reads the result back to check that it holds exactly what was given.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..errors import AdapterSaveError

_ALIGN = 8  # the header length (and so the data start) is a multiple of 8 bytes


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file for `tensors` (contiguous CPU tensors) and string `metadata`, byte-stable."""
    raw = save_bytes(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-(8 + len(text)) % _ALIGN)
    out = struct.pack("<Q", len(text)) + text + data
    _verify(out, tensors, metadata)
    return out


def _verify(blob: bytes, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Read `blob` back with safetensors itself: same keys, bit-equal values, same metadata; else refuse to write."""
    back = load_bytes(blob)
    header = json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])
    if back.keys() != tensors.keys() or header.get("__metadata__", {}) != (metadata or {}):
        raise AdapterSaveError("the rewritten safetensors header does not read back as written; nothing was written.")
    for key, value in tensors.items():
        got = back[key]
        if got.dtype != value.dtype or got.shape != value.shape or not torch.equal(
            got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        ):
            raise AdapterSaveError(f"{key} does not read back bit-exactly from the rewritten file; nothing was written.")
