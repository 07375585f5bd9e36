"""The fused LoRA linear against its plain reference: forward and gradients, dropout, dtypes, and the CUDA kernels.

CPU tests run everywhere; CUDA tests (Triton kernels, both backends) skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from adapterkit.kernels import dropout_mask, lora_linear, lora_linear_reference, set_backend
from adapterkit.kernels.lora_linear import get_backend, hash_keep_mask

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(lead=(6,), n_in=40, n_out=24, r=4, bias=True, dtype=torch.float32, device="cpu", x_grad=True, seed=0):
    """Fresh random inputs; B is non-zero so the adapter branch really contributes."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g, device=device).to(dtype).requires_grad_(x_grad)
    w = (torch.randn(n_out, n_in, generator=g, device=device) / n_in**0.5).to(dtype)
    b = torch.randn(n_out, generator=g, device=device).to(dtype) if bias else None
    a = (torch.randn(r, n_in, generator=g, device=device) / n_in**0.5).to(dtype).requires_grad_(True)
    bb = (torch.randn(n_out, r, generator=g, device=device) / r**0.5).to(dtype).requires_grad_(True)
    return x, w, b, a, bb


def run_both(x, w, b, a, bb, s=1.7, p=0.0, seed=11):
    """Outputs and grads (x, A, B) of the fused path and of the reference with the fused path's own mask."""
    y = lora_linear(x, w, b, a, bb, s, dropout_p=p, training=p > 0, seed=seed)
    mask = dropout_mask(x, p, seed) if p > 0 else None
    y_ref = lora_linear_reference(x, w, b, a, bb, s, p, p > 0, dropout_mask=mask)
    dy = torch.randn_like(y)
    wrt = [t for t in (x, a, bb) if t.requires_grad]
    got = torch.autograd.grad(y, wrt, dy)
    ref = torch.autograd.grad(y_ref, wrt, dy)
    return y, y_ref, got, ref


@pytest.fixture(autouse=True)
def _default_backend():
    before = get_backend()
    yield
    set_backend(before)


@pytest.mark.parametrize("lead", [(9,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
def test_matches_reference_fp32(lead, bias, p):
    x, w, b, a, bb = make(lead, bias=bias, seed=hash((lead, bias, p)) % 1000)
    y, y_ref, got, ref = run_both(x, w, b, a, bb, p=p)
    assert y.shape == y_ref.shape == (*lead, 24)
    assert rel(y, y_ref) <= 1e-5
    for gt, rf in zip(got, ref):
        assert gt.shape == rf.shape
        assert rel(gt, rf) <= 1e-5


def test_x_without_grad():
    x, w, b, a, bb = make(x_grad=False)
    y, y_ref, (ga, gb), (ra, rb) = run_both(x, w, b, a, bb)
    assert rel(y, y_ref) <= 1e-5 and rel(ga, ra) <= 1e-5 and rel(gb, rb) <= 1e-5


@pytest.mark.parametrize("frozen", ["a", "b", "both"])
def test_frozen_adapter_weights(frozen):
    x, w, b, a, bb = make(lead=(2, 7))
    if frozen in ("a", "both"):
        a.requires_grad_(False)
    if frozen in ("b", "both"):
        bb.requires_grad_(False)
    y, y_ref, got, ref = run_both(x, w, b, a, bb, p=0.1)
    assert rel(y, y_ref) <= 1e-5
    assert len(got) == {"a": 2, "b": 2, "both": 1}[frozen]
    for gt, rf in zip(got, ref):
        assert rel(gt, rf) <= 1e-5


def test_no_grad_and_eval_dropout_is_identity():
    x, w, b, a, bb = make()
    with torch.no_grad():
        y = lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, training=False)
        y_ref = lora_linear_reference(x, w, b, a, bb, 0.5)
    assert rel(y, y_ref) <= 1e-6


def test_dropout_mask_is_seeded_and_has_the_right_rate():
    x = torch.randn(64, 256)
    m1, m2, m3 = dropout_mask(x, 0.2, 1), dropout_mask(x, 0.2, 1), dropout_mask(x, 0.2, 2)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert abs(m1.float().mean().item() - 0.8) < 0.01
    # Same seed, same output; and a fresh seed per call when none is given.
    _, w, b, a, bb = make(n_in=256)
    y1 = lora_linear(x, w, b, a, bb, 1.0, 0.2, True, seed=5)
    assert torch.equal(y1, lora_linear(x, w, b, a, bb, 1.0, 0.2, True, seed=5))
    assert not torch.equal(lora_linear(x, w, b, a, bb, 1.0, 0.2, True), lora_linear(x, w, b, a, bb, 1.0, 0.2, True))


def test_hash_mask_rate_and_independence():
    m = hash_keep_mask(300, 500, 0.1, 123)
    assert abs(m.float().mean().item() - 0.9) < 0.005
    # Neighbouring rows and columns are not correlated.
    f = m.float() - m.float().mean()
    assert abs((f[:, 1:] * f[:, :-1]).mean().item()) < 0.005
    assert abs((f[1:] * f[:-1]).mean().item()) < 0.005
    assert not torch.equal(m, hash_keep_mask(300, 500, 0.1, 124))


def test_bf16_within_bf16_tolerance():
    x, w, b, a, bb = make(lead=(4, 16), n_in=96, n_out=64, r=8, dtype=torch.bfloat16)
    y = lora_linear(x, w, b, a, bb, 2.0)
    assert y.dtype == torch.bfloat16
    xs = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b, a, bb)]
    y64 = lora_linear_reference(*xs, 2.0)
    assert rel(y, y64) <= 1e-2
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, bb), dy)
    ref = torch.autograd.grad(y64, (xs[0], xs[3], xs[4]), dy.double())
    for gt, rf in zip(got, ref):
        assert gt.dtype == torch.bfloat16
        assert rel(gt, rf) <= 1e-2


def test_mixed_dtype_adapters_fall_back_like_peft():
    x, w, b, _, _ = make(dtype=torch.bfloat16)
    _, _, _, a, bb = make()
    y = lora_linear(x, w, b, a, bb, 1.0)
    assert y.dtype == torch.bfloat16
    ref = (torch.nn.functional.linear(x, w, b).float() + (x.float() @ a.t() @ bb.t())).to(torch.bfloat16)
    assert rel(y, ref) <= 1e-2


def test_trainable_base_weight_gets_its_gradient():
    x, w, b, a, bb = make()
    w.requires_grad_(True)
    y = lora_linear(x, w, b, a, bb, 1.0)
    y_ref = lora_linear_reference(x, w, b, a, bb, 1.0)
    dy = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, (w,), dy)
    (rw,) = torch.autograd.grad(y_ref, (w,), dy)
    assert rel(gw, rw) <= 1e-5


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p):
    x, w, b, a, bb = make(lead=(2, 3), n_in=7, n_out=5, r=3, dtype=torch.float64)

    def f(x, a, bb):
        return lora_linear(x, w, b, a, bb, 0.9, dropout_p=p, training=True, seed=3)

    assert torch.autograd.gradcheck(f, (x, a, bb))


# ------------------------------------------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(1000, 256, 384, 16), (3 * 77, 320, 96, 8), (512, 512, 512, 64)],
                         ids=["r16", "odd-r8", "r64"])
def test_cuda_bf16_matches_reference(backend, p, shape):
    n, n_in, n_out, r = shape
    set_backend(backend)
    x, w, b, a, bb = make((n,), n_in, n_out, r, dtype=torch.bfloat16, device="cuda", seed=r + n)
    y, y_ref, got, ref = run_both(x, w, b, a, bb, s=2.0, p=p)
    # Both are bf16 computations of the same function with the same mask; compare each against float64 too.
    xs = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b, a, bb)]
    mask = dropout_mask(x, p, 11) if p > 0 else None
    y64 = lora_linear_reference(*xs, 2.0, p, p > 0, dropout_mask=mask)
    assert rel(y, y64) <= 1e-2
    assert rel(y, y_ref) <= 1e-2
    for gt, rf in zip(got, ref):
        assert torch.isfinite(gt).all()
        assert rel(gt, rf) <= 2e-2


@cuda
def test_cuda_triton_mask_matches_hash_definition():
    set_backend("triton")
    x = torch.randn(333, 1000, device="cuda", dtype=torch.bfloat16)
    got = dropout_mask(x, 0.1, 987654321)
    assert torch.equal(got.cpu(), hash_keep_mask(333, 1000, 0.1, 987654321))


@cuda
def test_cuda_triton_kernels_fp32_reference():
    from adapterkit.kernels import _triton_lora as tk

    g = torch.Generator("cuda").manual_seed(0)
    M, K, R, p, seed, s = 777, 640, 16, 0.1, 42, 1.5
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    a = torch.randn(R, K, device="cuda", generator=g).bfloat16() / K**0.5
    gg = torch.randn(M, R, device="cuda", generator=g).bfloat16()
    keep = hash_keep_mask(M, K, p, seed, "cuda")
    xd = x.double() * keep / (1 - p)
    assert rel(tk.lora_a_forward(x, a, p, seed), xd @ a.double().t()) <= 1e-2
    dx, da = tk.lora_a_backward(x, gg, a, p, seed, s, True, True)
    assert rel(dx, s * (gg.double() @ a.double()) * keep / (1 - p)) <= 1e-2
    assert rel(da, s * gg.double().t() @ xd) <= 1e-2
    assert tk.lora_a_backward(x, gg, a, p, seed, s, False, True)[0] is None
    dx_only, none = tk.lora_a_backward(None, gg, a, p, seed, s, True, False)
    assert none is None and torch.equal(dx_only, dx)


@cuda
def test_cuda_training_step_memory_saves_no_dropout_copy():
    set_backend("triton")
    x, w, b, a, bb = make((4096,), 1024, 1024, 16, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.1, training=True)
    saved = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    # Only x (already alive, shared) and x·Aᵀ (N·r) are kept: far under one copy of x.
    assert saved < x.numel() * x.element_size() // 4


@pytest.mark.parametrize("lead", [(3, 5), (15,), (4, 200)])  # decode-sized (both ranks) and prefill-sized rows
def test_inference_path_without_autograd_matches_the_node(lead):
    """Under no_grad the forward runs its GEMMs without the autograd node: same values, no graph."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, 32, generator=gen)
    w, bias = torch.randn(24, 32, generator=gen), torch.randn(24, generator=gen)
    a, b = torch.randn(4, 32, generator=gen), torch.randn(24, 4, generator=gen)
    want = lora_linear(x, w, bias, a.requires_grad_(), b.requires_grad_(), 0.5)
    with torch.no_grad():
        got = lora_linear(x, w, bias, a, b, 0.5)
        got_nobias = lora_linear(x, w, None, a, b, 0.5)
    assert got.grad_fn is None and want.grad_fn is not None
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_nobias, x @ w.t() + 0.5 * (x @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)


def test_inference_entry_falls_back_where_the_three_gemms_do_not_apply():
    """`lora_infer` (the layer's no-grad call) hands mixed dtypes and enabled gradients to `lora_linear`."""
    from adapterkit.kernels.lora_linear import lora_infer

    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 7, 16, generator=gen), torch.randn(12, 16, generator=gen)
    a, b = torch.randn(4, 16, generator=gen), torch.randn(12, 4, generator=gen)
    want = x @ w.t() + 0.25 * (x @ a.t()) @ b.t()
    with torch.no_grad():
        torch.testing.assert_close(lora_infer(x, w, None, a, b, 0.25), want, rtol=1e-5, atol=1e-5)
        # Adapters in float64 on a float32 layer: computed in theirs and added back in the layer's dtype.
        mixed = lora_infer(x, w, None, a.double(), b.double(), 0.25)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-5)
    a.requires_grad_(True)
    out = lora_infer(x, w, None, a, b, 0.25)  # gradients on: the autograd node, so A still learns
    out.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
