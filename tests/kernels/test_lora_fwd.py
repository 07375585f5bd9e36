"""The training forward's rank-r kernel (x·Aᵀ and every output's s·xa·Bᵀ + bias in one launch) against a float64
reference: one to three outputs, mixed ranks, biases, sizes that end inside a block; what it refuses; and where
`lora_linear` and the siblings' node take it (CUDA) or the cuBLAS GEMMs (everything else, and after a failure).

The kernel runs on CUDA, or on a CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton installed), else
those tests skip; the failure path runs anywhere, driven by a stand-in kernel module.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from adapterkit.kernels.reference import lora_linear_reference
from helpers import stand_in_kernels, triton_device

module = importlib.import_module("adapterkit.kernels.lora_linear")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = triton_device()
kernel_device = pytest.mark.skipif(DEVICE is None, reason="the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")
# Triton 3.6's interpreter returns garbage for tl.dot on bf16 tiles: fp16 on a CPU, bf16 on CUDA.
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.fixture
def kernels():
    return pytest.importorskip("adapterkit.kernels._triton_lora_fwd", reason="triton is not installed")


def operands(m, k, outs, dtype, device, seed=0):
    """x (m, k), A (R, k) and per output (B_i, bias_i, s_i), `outs` holding (n_i, r_i, bias?, s_i)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    r = sum(ri for _, ri, _, _ in outs)
    a = torch.randn(r, k, generator=g) / k**0.5
    outputs = [(torch.randn(n, ri, generator=g) / ri**0.5, torch.randn(n, generator=g) if bias else None, s)
               for n, ri, bias, s in outs]
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(x), cast(a), [(cast(b), cast(c), s) for b, c, s in outputs]


def reference(x, a, outputs):
    """xa rounded to x's dtype as the kernel stores it, and each output from that rounded xa, in float64."""
    xa = (x.double() @ a.double().t()).to(x.dtype)
    outs, start = [], 0
    for b, bias, s in outputs:
        r = b.shape[1]
        out = s * (xa[:, start:start + r].double() @ b.double().t())
        outs.append(out + bias.double() if bias is not None else out)
        start += r
    return xa, outs


def close(got, want, dtype):
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


@kernel_device
@pytest.mark.parametrize("outs", [
    [(24, 4, True, 2.0)],                                       # one output (o, down)
    [(40, 8, False, 0.5), (8, 4, True, 1.0), (8, 4, False, 3.0)],  # q/k/v: three, mixed ranks and biases
    [(72, 16, False, 2.0), (72, 16, False, 2.0)],              # gate/up, 72 columns: the last block is partial
])
def test_matches_the_reference(kernels, outs):
    x, a, outputs = operands(70, 200, outs, HALF, DEVICE)  # 70 rows, 200 columns: partial row and K blocks
    xa, got = kernels.rank_forward(x, a, outputs)
    xa_ref, want = reference(x, a, outputs)
    assert xa.shape == (70, a.shape[0]) and xa.dtype == HALF
    close(xa, xa_ref, HALF)
    assert len(got) == len(outputs)
    for out, ref, (b, _, _) in zip(got, want, outputs):
        assert out.shape == (70, b.shape[0]) and out.dtype == HALF
        close(out, ref, HALF)


@kernel_device
def test_refusals(kernels):
    x, a, outputs = operands(8, 32, [(16, 4, False, 1.0)], HALF, DEVICE)
    wide = torch.randn(80, 32, dtype=HALF, device=DEVICE)  # rank 80 pads to 128 > MAX_RANK
    assert kernels.rank_forward(x, wide, [(torch.randn(16, 80, dtype=HALF, device=DEVICE), None, 1.0)]) is None
    four = [(torch.randn(16, 1, dtype=HALF, device=DEVICE), None, 1.0)] * 4  # more outputs than MAX_SEGMENTS
    assert kernels.rank_forward(x, a, four) is None
    many_rows = torch.empty(kernels.MAX_ROWS + 1, 32, dtype=HALF, device="meta")
    assert kernels.rank_forward(many_rows, a, outputs) is None
    assert kernels.rank_forward(x[:0], a, outputs) is None  # no rows: nothing to launch
    long_k = torch.empty(4, 2**15, dtype=HALF, device="meta")
    assert kernels.rank_forward(long_k, torch.empty(4, 2**15, dtype=HALF, device="meta"), outputs) is None
    assert kernels.rank_forward(x, a, outputs) is not None  # and the shapes it takes still run


def stand_in(monkeypatch, answer) -> list:
    """The kernel module replaced by one whose rank_forward returns `answer` (or raises it); returns its call log."""
    return stand_in_kernels(monkeypatch, module, "rank_forward", answer, "_rank_failed")


def test_a_failing_kernel_warns_once_and_cublas_answers(monkeypatch):
    calls = stand_in(monkeypatch, RuntimeError("PTX assembly failed"))
    x, a, outputs = operands(8, 32, [(16, 4, False, 1.0)], torch.bfloat16, "cpu")
    with pytest.warns(RuntimeWarning, match="rank-r forward kernel failed \\(RuntimeError: PTX assembly failed\\)"):
        assert module.rank_kernel(x, a, outputs) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert module.rank_kernel(x, a, outputs) is None
    assert len(calls) == 1


def test_what_the_dispatch_refuses(monkeypatch):
    calls = stand_in(monkeypatch, "kernel")
    x, a, outputs = operands(8, 32, [(16, 4, True, 1.0)], torch.bfloat16, "cpu")
    assert module.rank_kernel(x, a, outputs) == "kernel"
    assert module.rank_kernel(x.float(), a.float(), outputs) is None  # fp32
    assert module.rank_kernel(x.t().contiguous().t(), a, outputs) is None  # a transposed view
    b, bias, s = outputs[0]
    assert module.rank_kernel(x, a, [(b, bias.float(), s)]) is None  # bias in another dtype
    module.set_backend("torch")
    try:
        assert module.rank_kernel(x, a, outputs) is None
    finally:
        module.set_backend("auto")
    assert len(calls) == 1
    # lora_linear on a CPU never asks it: the kernel is for CUDA tensors.
    x3 = x.view(2, 4, 32).requires_grad_(True)
    module.lora_linear(x3, torch.randn(16, 32, dtype=torch.bfloat16), bias, a, b, s, training=True)
    assert len(calls) == 1


@cuda
def test_training_forward_takes_it_on_cuda(monkeypatch):
    """lora_linear and the siblings' node: the kernel's outputs and every gradient against the cuBLAS path."""
    from adapterkit.kernels.lora_group import grouped_lora_linear

    x, a, outputs = operands(96, 64, [(48, 4, True, 2.0), (16, 4, False, 1.0)], torch.bfloat16, "cuda", seed=3)
    weights = [torch.randn(b.shape[0], 64, device="cuda", dtype=torch.bfloat16) / 8 for b, _, _ in outputs]
    launched = []
    real = module.kernels

    def spy(name):
        mod = real(name)
        if name == "_triton_lora_fwd":
            launched.append(name)
        return mod

    def run(single):
        xg = x.view(2, 48, 64).clone().requires_grad_(True)
        a_parts = [p.clone().requires_grad_(True) for p in a.split([4, 4])]
        bs = [b.clone().requires_grad_(True) for b, _, _ in outputs]
        if single:
            outs = [module.lora_linear(xg, w, c, ap, b, s, training=True)
                    for w, ap, b, (_, c, s) in zip(weights, a_parts, bs, outputs)]
        else:
            outs = grouped_lora_linear(xg, [(w, c, ap, b, s) for w, ap, b, (_, c, s) in zip(weights, a_parts, bs,
                                                                                            outputs)])
        loss = sum((o.float() * (i + 1)).square().mean() for i, o in enumerate(outs))
        return [o.detach() for o in outs], torch.autograd.grad(loss, [xg, *a_parts, *bs])

    monkeypatch.setattr(module, "kernels", spy)
    for single in (True, False):
        launched.clear()
        got = run(single)
        assert launched  # the kernel was asked for
        module.set_backend("torch")
        try:
            want = run(single)
        finally:
            module.set_backend("auto")
        for g, w in zip(got[0] + list(got[1]), want[0] + list(want[1])):
            torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=3e-2)
    # and against the float64 composition of each layer
    ref = [lora_linear_reference(x.double(), w.double(), None if c is None else c.double(), ap.double(), b.double(),
                                 s) for w, ap, (b, c, s) in zip(weights, a.split([4, 4]), outputs)]
    for g, r in zip(got[0], ref):
        torch.testing.assert_close(g.double().view(96, -1), r, rtol=3e-2, atol=3e-2)
