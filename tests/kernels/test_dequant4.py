"""The Triton 4-bit dequantizer against bitsandbytes' own op, bit for bit: NF4 and FP4, output dtypes, blocksizes,
storage dtypes, sizes that end inside a program's block, odd element counts; the joint launch for siblings against
the members stacked, and the cases it refuses; what pickling and copying leave; a kernel that fails (bitsandbytes'
op answers, on any machine); where it runs (`available`) and that the quantized layer's training path takes it on
CUDA (and keeps it while the weight stays the same).

The kernel runs on CUDA, or on a CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton installed), else
those tests skip. The interpreter rounds float32 to bf16 by truncation where CUDA rounds to nearest, so bf16 output
is compared on CUDA only; and bitsandbytes' CPU op takes blocks row by row where a row is not a whole number of
blocks (its CUDA op, the reference here, takes them over the flattened weight), so such widths are tested on CUDA.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from adapterkit.kernels import dequant4
from helpers import triton_device

bnb = pytest.importorskip("bitsandbytes")
bnb_f = pytest.importorskip("bitsandbytes.functional")
DEVICE = triton_device()
kernel_device = pytest.mark.skipif(DEVICE is None, reason="the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")
needs_triton = pytest.mark.usefixtures("_triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
WIDTHS = [128] + ([96] if DEVICE == "cuda" else [])  # 96: blocks of 64 run across rows


@pytest.fixture
def _triton():
    pytest.importorskip("adapterkit.kernels._triton_dequant4", reason="triton is not installed")


def quantized(out, n_in, dtype, quant_type="nf4", blocksize=64, storage=torch.uint8, seed=0):
    """(packed codes, float32 absmax, shape) of a random weight, and bitsandbytes' dequantization of it."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, n_in, generator=g) * 0.1).to(DEVICE, dtype)
    codes, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False,
                                       quant_storage=storage)
    expected = torch.ops.bitsandbytes.dequantize_4bit.default(codes.view(torch.uint8), state.absmax, blocksize,
                                                              quant_type, state.shape, dtype)
    return codes, state.absmax.float(), tuple(state.shape), expected


@kernel_device
@needs_triton
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_in", WIDTHS)
def test_matches_bitsandbytes_bit_for_bit(quant_type, dtype, n_in):
    # 40 rows: the last program's block ends inside the weight.
    codes, absmax, shape, expected = quantized(40, n_in, dtype, quant_type)
    got = dequant4.Dequant4(codes, absmax, 64, quant_type, shape, dtype)()
    assert got.shape == shape and got.dtype == dtype
    assert torch.equal(got, expected)


@kernel_device
@needs_triton
@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes_and_a_larger_weight(blocksize):
    codes, absmax, shape, expected = quantized(96, 256, torch.float16, blocksize=blocksize)
    assert torch.equal(dequant4.Dequant4(codes, absmax, blocksize, "nf4", shape, torch.float16)(), expected)


@kernel_device
@needs_triton
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8], ids=str)
def test_any_quant_storage(storage):
    codes, absmax, shape, expected = quantized(32, 64, torch.float32, storage=storage)
    assert codes.dtype == storage
    assert torch.equal(dequant4.Dequant4(codes, absmax, 64, "nf4", shape, torch.float32)(), expected)


@kernel_device
@needs_triton
def test_odd_element_count():
    # 5 x 7 = 35 elements: the last byte holds one code (its low nibble is padding, never written out).
    codes, absmax, shape, expected = quantized(5, 7, torch.float32)
    assert torch.equal(dequant4.Dequant4(codes, absmax, 64, "nf4", shape, torch.float32)(), expected)


@kernel_device
@needs_triton
@pytest.mark.parametrize("outs", [(64, 16), (40, 8, 24)])
def test_joint_launch_is_the_members_stacked(outs):
    parts = [quantized(out, 128, torch.float16, seed=i) for i, out in enumerate(outs)]
    members = [dequant4.Dequant4(c, a, 64, "nf4", s, torch.float16) for c, a, s, _ in parts]
    joint = dequant4.joint_dequantizer(members)
    assert joint is not None
    stacked = joint()
    assert torch.equal(stacked, torch.cat([expected for *_, expected in parts]))
    assert [stacked[start:start + rows].shape[0] for start, rows in joint.rows] == list(outs)
    assert torch.equal(joint(), stacked)  # called again (backward): the same values


@kernel_device
@needs_triton
def test_joint_refusals():
    def member(out=16, n_in=64, dtype=torch.float32, quant_type="nf4", blocksize=64):
        c, a, s, _ = quantized(out, n_in, dtype, quant_type, blocksize)
        return dequant4.Dequant4(c, a, blocksize, quant_type, s, dtype)

    one = member()
    assert dequant4.joint_dequantizer([one]) is None  # nothing to share
    assert dequant4.joint_dequantizer([one, member(n_in=128)]) is None  # another input width
    assert dequant4.joint_dequantizer([one, member(dtype=torch.float16)]) is None
    assert dequant4.joint_dequantizer([one, member(quant_type="fp4")]) is None
    assert dequant4.joint_dequantizer([one, member(blocksize=128)]) is None
    assert dequant4.joint_dequantizer([one, lambda: None]) is None  # bitsandbytes' op (not this kernel's)
    assert dequant4.joint_dequantizer([member() for _ in range(4)]) is None  # more than MAX_SEGMENTS
    assert dequant4.joint_dequantizer([one, member()]) is not None


@kernel_device
@needs_triton
def test_bad_absmax_is_refused():
    codes, absmax, shape, _ = quantized(16, 64, torch.float32)
    with pytest.raises(ValueError, match="absmax must be float32"):
        dequant4.Dequant4(codes, absmax.half(), 64, "nf4", shape, torch.float32)
    with pytest.raises(ValueError, match="one value per block of 64"):
        dequant4.Dequant4(codes, absmax[:-1], 64, "nf4", shape, torch.float32)


@kernel_device
@needs_triton
def test_pickled_or_copied_it_becomes_none():
    codes, absmax, shape, _ = quantized(16, 64, torch.float32)
    d = dequant4.Dequant4(codes, absmax, 64, "nf4", shape, torch.float32)
    d()  # holds a launch now
    assert pickle.loads(pickle.dumps(d)) is None
    assert copy.deepcopy(d) is None
    joint = dequant4.joint_dequantizer([d, dequant4.Dequant4(codes, absmax, 64, "nf4", shape, torch.float32)])
    assert copy.deepcopy({"joint": joint}) == {"joint": None}


def test_a_failing_kernel_warns_once_and_bitsandbytes_answers(monkeypatch):
    """A Triton that cannot compile the kernel: one RuntimeWarning, bitsandbytes' values for this call and every
    later one (joint ones too), and no new dequantizer is handed out."""

    class Failing:
        def launch_for(self, *args):
            raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(dequant4, "kernels", lambda name: Failing())
    monkeypatch.setattr(dequant4, "_failed", False)
    monkeypatch.setattr(dequant4, "_enabled", True)
    g = torch.Generator().manual_seed(0)
    parts = []
    for out in (32, 16):
        codes, state = bnb_f.quantize_4bit(torch.randn(out, 64, generator=g), blocksize=64, quant_type="nf4",
                                           compress_statistics=False)
        parts.append((dequant4.Dequant4(codes, state.absmax, 64, "nf4", state.shape, torch.float32),
                      bnb_f.dequantize_4bit(codes, state)))
    (first, want), (second, want2) = parts
    joint = dequant4.JointDequant4([first, second])
    with pytest.warns(RuntimeWarning, match="4-bit dequantize kernel failed \\(RuntimeError: PTX assembly failed\\)"):
        assert torch.equal(first(), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(first(), want)
        assert torch.equal(joint(), torch.cat([want, want2]))
    assert not dequant4.enabled() and not dequant4.available("cuda")
    assert dequant4.joint_dequantizer([first, second]) is None


def test_available_only_on_cuda_and_switchable(monkeypatch):
    assert not dequant4.available("cpu")
    if torch.cuda.is_available():
        assert dequant4.available("cuda")
        monkeypatch.setattr(dequant4, "_enabled", True)
        dequant4.set_enabled(False)
        assert not dequant4.available("cuda")
        dequant4.set_enabled(True)
        assert dequant4.available("cuda")


@cuda
def test_layer_training_path_takes_it_and_keeps_it():
    from adapterkit.quantized import Bnb4bitView

    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16) * 0.1, requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    layer = layer.cuda()
    deq = Bnb4bitView.dequantizer(layer)
    assert isinstance(deq, dequant4.Dequant4)
    assert Bnb4bitView.dequantizer(layer) is deq  # kept while the weight is the same
    expected = bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(deq(), expected)
    assert deq._launch.run.fast is not None  # bound: the next call launches directly
    layer.weight = copy.deepcopy(layer.weight)  # new data and state: a new dequantizer
    assert Bnb4bitView.dequantizer(layer) is not deq
    dequant4.set_enabled(False)
    try:
        assert not isinstance(Bnb4bitView.dequantizer(copy.deepcopy(layer)), dequant4.Dequant4)
    finally:
        dequant4.set_enabled(True)
