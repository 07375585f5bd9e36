"""The one-launch LoRA decode kernel against a float64 reference and against the cuBLAS composition it replaces;
where `lora_infer` takes it (eager CUDA decode) and where not (graph capture, fp32, the torch backend, failures).

The kernel runs on CUDA, or on a CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton installed), else
those tests skip; the dispatch tests need CUDA, except the failure path, which a stand-in kernel module drives.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from adapterkit.kernels.lora_linear import lora_infer
from helpers import triton_device

module = importlib.import_module("adapterkit.kernels.lora_linear")  # the package exports a function of that name

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = triton_device()  # "cpu": Triton's interpreter runs the kernel on CPU tensors
kernel_device = pytest.mark.skipif(DEVICE is None, reason="the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")
# Triton 3.6's interpreter returns garbage for tl.dot on bf16 tiles (test_gathered_lora.py says the same), so on a
# CPU the kernel runs in fp16; bf16 runs on CUDA.
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.fixture
def kernels():
    return pytest.importorskip("adapterkit.kernels._triton_lora_decode", reason="triton is not installed")


def operands(m, k, n, r, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    a = torch.randn(r, k, generator=g) / k**0.5
    bb = torch.randn(n, r, generator=g) / r**0.5
    return [t.to(device, dtype) if t is not None else None for t in (x, w, b, a, bb)]


def reference(x, w, b, a, bb, s):
    """float64, with x Aᵀ rounded to the adapter dtype as the unfused layer rounds lora_A's output."""
    h = F.linear(x.double(), a.double()).to(a.dtype).double()
    out = F.linear(x.double(), w.double(), None if b is None else b.double()) + s * F.linear(h, bb.double())
    return out


def close(got, want, dtype):
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    assert got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), err


@kernel_device
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,r,bias", [(1, 64, 48, 4, False), (7, 300, 200, 16, True), (64, 256, 512, 8, False),
                                          (33, 130, 70, 1, True), (128, 96, 2000, 16, False), (5, 512, 16, 33, True)])
def test_kernel_matches_reference(kernels, dtype, m, k, n, r, bias):
    """Rows, K, N and R that are not multiples of the blocks; rank 1 and a rank above 32; with and without bias."""
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("tl.dot on bf16 is broken in Triton's interpreter")
    x, w, b, a, bb = operands(m, k, n, r, dtype, DEVICE, bias, seed=m + n)
    got = kernels.lora_decode(x, w, b, a, bb, 1.75)
    assert got.shape == (m, n)
    close(got, reference(x, w, b, a, bb, 1.75), dtype)
    again = kernels.lora_decode(x, w, b, a, bb, 1.75)  # the second call takes the direct launch
    torch.testing.assert_close(again, got, atol=0, rtol=0)


@kernel_device
def test_kernel_matches_the_cublas_composition(kernels):
    """The path it replaces: base GEMM, x·Aᵀ, and the accumulating s·h·Bᵀ, at bf16 rounding."""
    x, w, b, a, bb = operands(64, 256, 384, 16, HALF, DEVICE)
    plain = F.linear(x, w, b).addmm_(F.linear(x, a), bb.t(), alpha=0.5)
    got = kernels.lora_decode(x, w, b, a, bb, 0.5)
    assert (got.float() - plain.float()).abs().max().item() <= 2e-2 * plain.float().abs().max().item()


@kernel_device
def test_one_compiled_kernel_per_row_block_and_scale(kernels):
    """Batch sizes within a row block (16 / 32 / 64) share one launch (rows are a runtime argument); another block,
    scale or layer shape is another launch. Each answer is right."""
    x, w, b, a, bb = operands(100, 64, 32, 4, HALF, DEVICE, bias=False)
    before = set(kernels._launches)
    for rows in (3, 9, 16, 20, 40, 64, 100):
        close(kernels.lora_decode(x[:rows], w, b, a, bb, 1.0), reference(x[:rows], w, b, a, bb, 1.0), HALF)
    two = kernels.lora_decode(x[:9], w, b, a, bb, 2.0)
    close(two, reference(x[:9], w, b, a, bb, 2.0), HALF)
    assert set(kernels._launches) - before == {(16, 32, 64, 4, 1.0, False), (32, 32, 64, 4, 1.0, False),
                                               (64, 32, 64, 4, 1.0, False), (16, 32, 64, 4, 2.0, False)}


def stand_in(monkeypatch, answer, max_rows=128) -> list:
    """Replace the kernel module with one whose lora_decode returns `answer` (or raises it); returns its call log."""
    calls = []

    class Kernels:
        MAX_ROWS = max_rows

        def lora_decode(self, *args):
            calls.append(1)
            if isinstance(answer, Exception):
                raise answer
            return answer

    monkeypatch.setattr(module, "kernels", lambda name: Kernels())
    monkeypatch.setattr(module, "_decode_failed", False)
    return calls


def test_a_failing_kernel_warns_once_and_cublas_answers(monkeypatch):
    """A Triton that cannot compile the kernel: one RuntimeWarning, then the composition, now and from then on."""
    calls = stand_in(monkeypatch, RuntimeError("PTX assembly failed"))
    x, w, b, a, bb = operands(4, 32, 24, 4, torch.bfloat16, "cpu")
    with pytest.warns(RuntimeWarning, match="LoRA decode kernel failed \\(RuntimeError: PTX assembly failed\\)"):
        assert module._decode_kernel(x, w, b, a, bb, 1.0) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert module._decode_kernel(x, w, b, a, bb, 1.0) is None
    assert calls == [1]


def test_the_cublas_path_runs_once_per_new_shape_before_the_kernel(monkeypatch):
    """So that a CUDA graph captured later (which takes cuBLAS) finds its kernels loaded."""
    calls = stand_in(monkeypatch, "kernel")
    warmed = []
    monkeypatch.setattr(module, "_decode_shapes", set())
    monkeypatch.setattr(module, "_decode_cublas", lambda x, *rest: warmed.append(x.shape[0]))
    x, w, b, a, bb = operands(6, 32, 24, 4, torch.bfloat16, "cpu")
    for rows in (6, 6, 3, 6, 3):
        assert module._decode_kernel(x[:rows], w, b, a, bb, 1.0) == "kernel"
    assert warmed == [6, 3] and len(calls) == 5


def test_what_the_kernel_does_not_take_is_left_to_cublas(monkeypatch):
    """fp32, more rows than MAX_ROWS, non-contiguous operands, a bias of another dtype, the torch backend."""
    calls = stand_in(monkeypatch, "kernel", max_rows=8)
    x, w, b, a, bb = operands(4, 32, 24, 4, torch.bfloat16, "cpu")
    assert module._decode_kernel(x, w, b, a, bb, 1.0) == "kernel"
    refused = [
        (x.float(), w.float(), b.float(), a.float(), bb.float()),
        (torch.cat([x, x, x]), w, b, a, bb),
        (x.t().contiguous().t(), w, b, a, bb),
        (x, w.t().contiguous().t(), b, a, bb),
        (x, w, b.float(), a, bb),
    ]
    for args in refused:
        assert module._decode_kernel(*args, 1.0) is None
    huge = torch.empty(2**31, dtype=torch.bfloat16, device="meta").as_strided((2**20, 2**11), (2**11, 1))
    assert module._decode_kernel(x[:, :1].expand(4, 2**11).contiguous(), huge, None, a[:, :1].expand(4, 2**11)
                                 .contiguous(), bb, 1.0) is None  # int32 indexing: refused by its size
    monkeypatch.setattr(module, "_backend", "torch")
    assert module._decode_kernel(x, w, b, a, bb, 1.0) is None
    assert calls == [1]


@cuda
def test_eager_cuda_decode_takes_the_kernel_and_graph_capture_does_not(monkeypatch):
    """lora_infer on CUDA: eager decode-sized calls go through the kernel; inside a CUDA graph capture the cuBLAS
    composition is captured instead, and its replay gives the eager answer."""
    mod = pytest.importorskip("adapterkit.kernels._triton_lora_decode", reason="triton is not installed")
    calls = []
    real = mod.lora_decode
    monkeypatch.setattr(mod, "lora_decode", lambda *args: calls.append(1) or real(*args))
    x, w, b, a, bb = operands(64, 512, 768, 16, torch.bfloat16, "cuda")
    x3 = x.view(64, 1, 512)
    with torch.no_grad():
        eager = lora_infer(x3, w, b, a, bb, 2.0)
        assert calls == [1] and eager.shape == (64, 1, 768)
        close(eager.view(64, 768), reference(x, w, b, a, bb, 2.0), torch.bfloat16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = lora_infer(x3, w, b, a, bb, 2.0)
        graph.replay()
        torch.cuda.synchronize()
        assert calls == [1]  # the capture did not take the kernel
        close(captured.view(64, 768), reference(x, w, b, a, bb, 2.0), torch.bfloat16)
        for rows in (64, 7, 50):  # again (the direct launch), and other batch sizes of the same blocks
            got = lora_infer(x3[:rows], w, b, a, bb, 2.0)
            close(got.view(rows, 768), reference(x[:rows], w, b, a, bb, 2.0), torch.bfloat16)
        assert len(calls) == 4
        launch, _ = mod._launches[(64, 768, 512, 16, 2.0, True)]
        assert any(launcher is not None for launcher in launch.launchers.values())  # bound: launched directly
        calls.clear()
        lora_infer(x3.float(), w.float(), b.float(), a.float(), bb.float(), 2.0)  # fp32: cuBLAS
        lora_infer(torch.randn(600, 512, device="cuda", dtype=torch.bfloat16), w, b, a, bb, 2.0)  # prefill rows
        assert calls == []
