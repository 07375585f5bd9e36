"""The one-launch LoRA decode kernel against a float64 reference and against the cuBLAS composition it replaces;
where `lora_infer` takes it (eager CUDA decode, graph capture of shapes launched before) and where not (fp32, the
torch backend, failures).

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
from helpers import stand_in_kernels, triton_device

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
def test_one_compiled_kernel_per_layer_shape_and_scale(kernels):
    """Every batch size shares one launch (rows are a runtime argument, masked within 64-row blocks); another scale
    or layer shape is another launch. Each answer is right."""
    x, w, b, a, bb = operands(100, 64, 32, 4, HALF, DEVICE, bias=False)
    before = set(kernels._launches)
    for rows in (3, 9, 16, 20, 40, 64, 100):
        close(kernels.lora_decode(x[:rows], w, b, a, bb, 1.0), reference(x[:rows], w, b, a, bb, 1.0), HALF)
    two = kernels.lora_decode(x[:9], w, b, a, bb, 2.0)
    close(two, reference(x[:9], w, b, a, bb, 2.0), HALF)
    assert set(kernels._launches) - before == {(32, 64, 4, 1.0, False), (32, 64, 4, 2.0, False)}


@kernel_device
def test_nothing_compiles_inside_a_capture(kernels):
    """While a CUDA graph is captured (`capturing=True`) a shape never launched eagerly gives None and leaves no
    plan behind, so its first eager call later still compiles, binds and announces it."""
    x, w, b, a, bb = operands(12, 48, 40, 4, HALF, DEVICE, seed=5)
    seen = []

    def announce(*args):
        seen.append(args[0].shape)

    assert kernels.lora_decode(x, w, b, a, bb, 3.0, announce, capturing=True) is None
    assert seen == [] and not any(key[:3] == (12, 40, 48) and key[4] == 3.0 for key in kernels._plans)
    close(kernels.lora_decode(x, w, b, a, bb, 3.0, announce), reference(x, w, b, a, bb, 3.0), HALF)
    assert seen == [(12, 48)]


@kernel_device
def test_any_leading_shape_and_misaligned_operands(kernels):
    """x of shape (batch, tokens, K) gives (batch, tokens, N) without a reshape on the way; an operand off 16-byte
    alignment (a view one element in) takes another specialisation and is still right, and so is the aligned call
    after it."""
    x, w, b, a, bb = operands(24, 64, 48, 8, HALF, DEVICE, seed=3)
    got = kernels.lora_decode(x.view(4, 6, 64), w, b, a, bb, 1.5)
    assert got.shape == (4, 6, 48)
    close(got.view(24, 48), reference(x, w, b, a, bb, 1.5), HALF)
    flat = torch.cat([torch.zeros(1, dtype=HALF, device=DEVICE), x.flatten()])
    off = flat[1:].view(24, 64)  # 2 bytes past an aligned address
    assert off.data_ptr() % 16 != 0
    for operand in (off, x, off, x):
        close(kernels.lora_decode(operand, w, b, a, bb, 1.5), reference(x, w, b, a, bb, 1.5), HALF)


@kernel_device
def test_new_shapes_are_announced_once_and_oversized_ones_refused(kernels):
    """`on_new_shape` runs once per call shape, before its first launch (lora_infer warms cuBLAS there, for a graph
    captured later); more than MAX_ROWS rows, or a weight of 2³¹ elements (int32 indexing), gives None, not a
    launch (meta tensors here: nothing is allocated or launched for them)."""
    x, w, b, a, bb = operands(kernels.MAX_ROWS + 1, 32, 24, 4, HALF, DEVICE, seed=4)
    seen = []

    def announce(x, *rest):
        seen.append(tuple(x.shape))

    for rows in (5, 5, 3, 5, 3):
        close(kernels.lora_decode(x[:rows], w, b, a, bb, 1.0, announce), reference(x[:rows], w, b, a, bb, 1.0), HALF)
    assert seen == [(5, 32), (3, 32)]
    assert kernels.lora_decode(x, w, b, a, bb, 1.0, announce) is None
    assert kernels.lora_decode(x[:0], w, b, a, bb, 1.0, announce) is None  # no rows: nothing to launch
    huge = torch.empty(2**31, dtype=HALF, device="meta").as_strided((2**20, 2**11), (2**11, 1))
    xm, am = (torch.empty(shape, dtype=HALF, device="meta") for shape in ((4, 2**11), (4, 2**11)))
    bm = torch.empty(2**20, 4, dtype=HALF, device="meta")
    assert kernels.lora_decode(xm, huge, None, am, bm, 1.0, announce) is None
    assert seen == [(5, 32), (3, 32)]  # refused shapes are not announced: no kernel runs for them


def stand_in(monkeypatch, answer) -> list:
    """The kernel module replaced by one whose lora_decode returns `answer` (or raises it); returns its call log."""
    return stand_in_kernels(monkeypatch, module, "lora_decode", answer, "_decode_failed")


def test_a_failing_kernel_warns_once_and_cublas_answers(monkeypatch):
    """A Triton that cannot compile the kernel: one RuntimeWarning, then the composition, now and from then on."""
    calls = stand_in(monkeypatch, RuntimeError("PTX assembly failed"))
    x, w, b, a, bb = operands(4, 32, 24, 4, torch.bfloat16, "cpu")
    with pytest.warns(RuntimeWarning, match="LoRA decode kernel failed \\(RuntimeError: PTX assembly failed\\)"):
        assert module._decode_kernel(x, w, b, a, bb, 1.0) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert module._decode_kernel(x, w, b, a, bb, 1.0) is None
    assert len(calls) == 1


def test_the_kernel_is_told_to_warm_cublas_for_new_shapes(monkeypatch):
    """lora_infer hands the kernel module its cuBLAS warm-up, and the warm-up runs the cuBLAS composition (so that a
    CUDA graph captured later, which takes cuBLAS, finds its kernels loaded)."""
    calls = stand_in(monkeypatch, "kernel")
    x, w, b, a, bb = operands(6, 32, 24, 4, torch.bfloat16, "cpu")
    assert module._decode_kernel(x.view(2, 3, 32), w, b, a, bb, 1.0) == "kernel"
    (args,) = calls
    assert args[-2] is module._warm_cublas and args[-1] is False  # on the CPU: never inside a capture
    ran = []
    monkeypatch.setattr(module, "_decode_cublas", lambda x, *rest: ran.append(tuple(x.shape)))
    module._warm_cublas(x.view(2, 3, 32), w, b, a, bb, 1.0)
    assert ran == [(6, 32)]


def test_what_the_kernel_does_not_take_is_left_to_cublas(monkeypatch):
    """fp32, non-contiguous operands, a bias of another dtype, the torch backend (rows and sizes: the kernel
    module's own refusals, tested above)."""
    calls = stand_in(monkeypatch, "kernel")
    x, w, b, a, bb = operands(4, 32, 24, 4, torch.bfloat16, "cpu")
    assert module._decode_kernel(x, w, b, a, bb, 1.0) == "kernel"
    refused = [
        (x.float(), w.float(), b.float(), a.float(), bb.float()),
        (x.t().contiguous().t(), w, b, a, bb),
        (x, w.t().contiguous().t(), b, a, bb),
        (x, w, b, a.t().contiguous().t(), bb),
        (x, w, b, a, bb.t().contiguous().t()),
        (x, w, b.float(), a, bb),
    ]
    for args in refused:
        assert module._decode_kernel(*args, 1.0) is None
    monkeypatch.setattr(module, "_backend", "torch")
    assert module._decode_kernel(x, w, b, a, bb, 1.0) is None
    assert len(calls) == 1


@cuda
def test_eager_cuda_decode_and_graph_capture(monkeypatch):
    """lora_infer on CUDA: eager decode-sized calls go through the kernel. Inside a CUDA graph capture the kernel is
    captured for a shape launched eagerly before; a shape first seen inside the capture, or one with K above
    GRAPH_MAX_K, captures the cuBLAS composition. Every replay gives the eager answer."""
    mod = pytest.importorskip("adapterkit.kernels._triton_lora_decode", reason="triton is not installed")
    taken = []
    real = mod.lora_decode

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(mod, "lora_decode", counted)
    x, w, b, a, bb = operands(64, 512, 768, 16, torch.bfloat16, "cuda")
    x3 = x.view(64, 1, 512)
    with torch.no_grad():
        eager = lora_infer(x3, w, b, a, bb, 2.0)
        assert taken == [True] and eager.shape == (64, 1, 768)
        close(eager.view(64, 768), reference(x, w, b, a, bb, 2.0), torch.bfloat16)
        for rows in (64, 7, 50):  # again (the direct launch), and other batch sizes of the same launch
            got = lora_infer(x3[:rows], w, b, a, bb, 2.0)
            close(got.view(rows, 768), reference(x[:rows], w, b, a, bb, 2.0), torch.bfloat16)
        assert taken == [True] * 4
        launch, _ = mod._launches[(768, 512, 16, 2.0, True)]
        assert any(launcher is not None for launcher in launch.launchers.values())  # bound: launched directly
        taken.clear()
        monkeypatch.setattr(mod, "GRAPH_MAX_K", 256)  # for the shapes planned from here on
        xk, wk, bk, ak_, bbk = operands(64, 512, 96, 16, torch.bfloat16, "cuda", seed=9)
        lora_infer(xk, wk, bk, ak_, bbk, 2.0)  # planned eagerly with K = 512 > GRAPH_MAX_K
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = lora_infer(x3, w, b, a, bb, 2.0)  # launched eagerly before: the kernel
            fresh = lora_infer(x3[:33], w, b, a, bb, 2.0)  # 33 rows: never seen eagerly, cuBLAS
            long_k = lora_infer(xk, wk, bk, ak_, bbk, 2.0)  # K above the limit: cuBLAS
        assert taken == [True, True, False, False]
        graph.replay()
        torch.cuda.synchronize()
        close(captured.view(64, 768), reference(x, w, b, a, bb, 2.0), torch.bfloat16)
        close(fresh.view(33, 768), reference(x[:33], w, b, a, bb, 2.0), torch.bfloat16)
        close(long_k, reference(xk, wk, bk, ak_, bbk, 2.0), torch.bfloat16)
        taken.clear()
        lora_infer(x3.float(), w.float(), b.float(), a.float(), bb.float(), 2.0)  # fp32: cuBLAS
        assert taken == []
        with pytest.raises(RuntimeError, match="device"):  # x on CUDA, the layer on the CPU: not the kernel's,
            lora_infer(x3, w.cpu(), b.cpu(), a.cpu(), bb.cpu(), 2.0)  # but torch's own error, as for an nn.Linear
        prefill = torch.randn(600, 512, device="cuda", dtype=torch.bfloat16)
        close(lora_infer(prefill, w, b, a, bb, 2.0), reference(prefill, w, b, a, bb, 2.0), torch.bfloat16)
        assert taken == [False]  # offered to the kernel module, which refused it (more than MAX_ROWS rows)
