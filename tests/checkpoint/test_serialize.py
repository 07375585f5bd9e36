"""Byte-stable adapter files: the same weights give the same bytes on every save; the rewritten header is valid
safetensors (8-byte aligned, sorted keys) and reads back exactly; a placeholder tensor is refused by name."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers import tiny_llama
from safetensors import safe_open

import adapterkit as ak
from adapterkit.checkpoint.serialize import to_bytes
from adapterkit.errors import AdapterSaveError

WEIGHTS = "adapter_model.safetensors"


def adapted():
    model = tiny_llama()
    torch.manual_seed(0)
    return ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_repeated_saves_are_byte_identical(tmp_path):
    model = adapted()
    blobs = set()
    for i in range(8):  # safetensors' own header order changes between calls: one fixed order must come out
        ak.save(model, tmp_path / str(i))
        blobs.add((tmp_path / str(i) / WEIGHTS).read_bytes())
    assert len(blobs) == 1


def test_header_is_aligned_sorted_and_reads_back(tmp_path):
    tensors = {"b": torch.arange(3, dtype=torch.float16), "a": torch.ones(2, 3), "c": torch.zeros(0)}
    meta = {"z": "1", "format": "pt", "m": json.dumps({"k": [1, 2]})}
    blob = to_bytes(tensors, meta)
    (n,) = struct.unpack("<Q", blob[:8])
    assert (8 + n) % 8 == 0
    header = blob[8 : 8 + n].decode("ascii")
    parsed = json.loads(header)
    assert list(parsed) == sorted(parsed) and list(parsed["__metadata__"]) == sorted(meta)
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == meta
        for key, value in tensors.items():
            assert torch.equal(fh.get_tensor(key), value) and fh.get_tensor(key).dtype == value.dtype


def test_zero3_placeholder_is_refused_by_name(tmp_path):
    model = adapted()
    lora_a = model.model.layers[1].self_attn.v_proj.lora_A["default"].weight
    shape = tuple(lora_a.shape)
    lora_a.data = torch.empty(0)  # what DeepSpeed ZeRO-3 leaves outside a gather
    lora_a.ds_shape = torch.Size(shape)
    with pytest.raises(AdapterSaveError, match=r"layers\.1\.self_attn\.v_proj\.lora_A\.weight holds \[0\] "
                                                r"\(0 values\) where \[4, 32\] is expected.*ZeRO-3"):
        ak.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_flat_empty_tensor_without_ds_shape_is_refused(tmp_path):
    model = adapted()
    lora_a = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    lora_a.data = torch.empty(0)  # a partitioned placeholder that carries no shape record
    with pytest.raises(AdapterSaveError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight holds \[0\] "
                                                r"\(0 values\) where its adapter shape is expected"):
        ak.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
