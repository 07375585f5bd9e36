"""DoRA kernels against the plain reference and against real PEFT DoRA layers (Linear, Conv1D, Embedding).

Checks values and gradients, the no-(out, in)-temporary property of the weight norm, the ||W||² cache, merge, and
the saved-activation memory of the autograd node. CPU only.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adapterkit.kernels.dora import (
    cached_weight_sq_norm,
    dora_delta_merge,
    dora_embedding,
    dora_linear,
    dora_unmerge,
    dora_weight_norm,
    row_sq_norm,
    weight_sq_norm_cache,
)
from adapterkit.kernels.dora_reference import (
    dora_embedding_reference,
    dora_linear_reference,
    dora_merge_reference,
    dora_weight_norm_reference,
)
from adapterkit.kernels.lora_linear import torch_keep_mask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(n=9, n_in=40, n_out=24, r=4, bias=True, fifo=False, dtype=torch.float32, seed=0):
    """Random inputs with non-zero B and a magnitude away from n, so every DoRA term contributes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    w = (w.t().contiguous() if fifo else w).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, n_in, generator=g) / n_in**0.5).to(dtype).requires_grad_(True)
    bb = (torch.randn(n_out, r, generator=g) / r**0.5).to(dtype).requires_grad_(True)
    m = (torch.rand(n_out, generator=g) + 0.5).requires_grad_(True)
    return x, w, b, a, bb, m


def grads(y, wrt, dy):
    return torch.autograd.grad(y, wrt, dy)


# ---------------------------------------------------------------- weight norm


@pytest.mark.parametrize("fifo", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("s", [0.5, 2.0, 16 / 8**0.5], ids=["s0.5", "s2", "rslora"])
def test_weight_norm_matches_materialised_fp32(fifo, s):
    _, w, _, a, bb, _ = make(n_in=300, n_out=70, r=8, fifo=fifo, seed=3)
    got = dora_weight_norm(w, a, bb, s, fifo)
    ref = dora_weight_norm_reference(w, a, bb, s, fifo)
    assert got.shape == (70,) and got.dtype == torch.float32 and not got.requires_grad
    assert ((got - ref).abs() / ref).max().item() <= 1e-5


def test_weight_norm_precomputed_sq_norm_is_used():
    _, w, _, a, bb, _ = make(seed=4)
    sq = row_sq_norm(w)
    assert torch.allclose(sq, w.pow(2).sum(1), rtol=1e-6)
    # A deliberately wrong ||W||² must show up in the result: proves the argument is read, not recomputed.
    assert not torch.allclose(dora_weight_norm(w, a, bb, 1.0, weight_sq_norm=sq + 1.0), dora_weight_norm(w, a, bb, 1.0))
    assert torch.equal(dora_weight_norm(w, a, bb, 1.0, weight_sq_norm=sq), dora_weight_norm(w, a, bb, 1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fifo", [False, True], ids=["linear", "conv1d"])
def test_weight_norm_low_precision_inputs_computed_in_fp32(dtype, fifo, monkeypatch):
    import adapterkit.kernels.dora as dora

    monkeypatch.setattr(dora, "_CAST_BLOCK_ELEMS", 1000)  # several row blocks even at this small shape
    _, w, _, a, bb, _ = make(n_in=300, n_out=70, r=8, fifo=fifo, dtype=dtype, seed=5)
    got = dora_weight_norm(w, a, bb, 2.0, fifo)
    ref = dora_weight_norm_reference(w, a, bb, 2.0, fifo)  # float32 from the same low-precision values
    assert got.dtype == torch.float32
    assert ((got - ref).abs() / ref).max().item() <= 1e-5


def test_weight_norm_clamps_cancellation_to_zero():
    # W = -s·B A exactly: n is 0 (not NaN from the sqrt of a tiny negative).
    a = torch.randn(3, 16)
    bb = torch.randn(8, 3)
    w = -(2.0 * bb @ a)
    n = dora_weight_norm(w, a, bb, 2.0)
    assert torch.isfinite(n).all() and n.max().item() <= 1e-3 * (bb @ a).norm().item()


def test_weight_norm_rejects_mismatched_factors():
    _, w, _, a, bb, _ = make()
    with pytest.raises(ValueError, match="do not fit"):
        dora_weight_norm(w, a, bb, 1.0, fan_in_fan_out=True)


class _OpOutputs(TorchDispatchMode):
    """Records the element count of every fresh tensor an aten op returns (composite ops are seen decomposed).

    Outputs that share storage with an input (views, in-place results) allocate nothing and are not recorded.
    """

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        held = {t.untyped_storage().data_ptr() for t in inputs}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held:
                self.sizes.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fifo", [False, True], ids=["linear", "conv1d"])
def test_weight_norm_never_allocates_out_by_in(dtype, fifo):
    n_out, n_in = 1024, 4096
    _, w, _, a, bb, _ = make(n=2, n_in=n_in, n_out=n_out, r=8, fifo=fifo, dtype=dtype, seed=6)
    with _OpOutputs() as rec:
        dora_weight_norm(w, a, bb, 2.0, fifo)
    biggest = max(rec.sizes, key=lambda t: t[1])
    assert biggest[1] < n_out * n_in // 2, biggest
    # The detector does see a materialising implementation:
    with _OpOutputs() as rec_ref:
        dora_weight_norm_reference(w, a, bb, 2.0, fifo)
    assert max(n for _, n in rec_ref.sizes) >= n_out * n_in


def test_dora_linear_forward_backward_never_allocate_out_by_in():
    n_out, n_in = 512, 2048
    x, w, b, a, bb, m = make(n=4, n_in=n_in, n_out=n_out, r=8, seed=7)
    with _OpOutputs() as rec:
        y = dora_linear(x, w, b, a, bb, m, 2.0, 0.1, True, seed=1)
        y.sum().backward()
    assert max(n for _, n in rec.sizes) < n_out * n_in // 2


# ---------------------------------------------------------------- ||W||² cache


def test_sq_norm_cache_hits_and_invalidates():
    w = nn.Parameter(torch.randn(16, 32), requires_grad=False)
    first = cached_weight_sq_norm(w)
    assert cached_weight_sq_norm(w) is first  # no recompute for an unchanged weight
    assert cached_weight_sq_norm(w, fan_in_fan_out=True) is not first  # other axis, other value
    with torch.no_grad():
        w.mul_(2.0)  # in place: bumps _version
    assert torch.allclose(cached_weight_sq_norm(w), 4.0 * first)
    w.data = torch.randn(16, 32)  # new storage: data_ptr changes
    assert torch.allclose(cached_weight_sq_norm(w), w.detach().pow(2).sum(1))
    # Writes through a `.data` alias are invisible to the stamp (documented); forget() recovers.
    stale = cached_weight_sq_norm(w)
    w.data.mul_(3.0)
    assert cached_weight_sq_norm(w) is stale
    weight_sq_norm_cache.forget(w)
    assert torch.allclose(cached_weight_sq_norm(w), 9.0 * stale)


def test_sq_norm_cache_entry_dies_with_the_tensor():
    weight_sq_norm_cache.clear()
    w = torch.randn(8, 8)
    cached_weight_sq_norm(w)
    assert len(weight_sq_norm_cache) == 1
    del w
    gc.collect()
    assert len(weight_sq_norm_cache) == 0


# ---------------------------------------------------------------- dora_linear vs reference


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("fifo", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
def test_dora_linear_matches_reference_fp32(bias, fifo, p, recompute):
    x, w, b, a, bb, m = make(bias=bias, fifo=fifo, seed=11)
    s, seed = 1.7, 5
    y = dora_linear(x, w, b, a, bb, m, s, p, p > 0, fan_in_fan_out=fifo, seed=seed, recompute=recompute)
    mask = torch_keep_mask((x.shape[0], x.shape[1]), p, seed, "cpu") if p else None
    y_ref = dora_linear_reference(x, w, b, a, bb, m, s, p, p > 0, mask, fan_in_fan_out=fifo)
    assert y.shape == y_ref.shape == (9, 24)
    assert rel(y, y_ref) <= 1e-6
    dy = torch.randn_like(y)
    for got, ref in zip(grads(y, (x, a, bb, m), dy), grads(y_ref, (x, a, bb, m), dy)):
        assert rel(got, ref) <= 1e-5


def test_dora_linear_3d_input_and_eval_ignores_dropout():
    x, w, b, a, bb, m = make(n=12, seed=12)
    x3 = x.detach().view(3, 4, -1).requires_grad_(True)
    y_eval = dora_linear(x3, w, b, a, bb, m, 2.0, 0.5, False)
    y_ref = dora_linear_reference(x3, w, b, a, bb, m, 2.0)
    assert y_eval.shape == (3, 4, 24) and rel(y_eval, y_ref) <= 1e-6


def test_dora_linear_dropout_differs_from_dropout_then_no_dropout_formula():
    # PEFT keeps base(x) on the undropped input: applying the eval formula to x_d would be wrong.
    x, w, b, a, bb, m = make(seed=13)
    p, seed = 0.5, 3
    y = dora_linear(x, w, b, a, bb, m, 2.0, p, True, seed=seed)
    xd = x * torch_keep_mask(x.shape, p, seed, "cpu") / (1 - p)
    assert rel(y, dora_linear_reference(xd, w, b, a, bb, m, 2.0)) > 1e-2


def test_dora_linear_weight_sq_norm_argument_is_used():
    x, w, b, a, bb, m = make(seed=14)
    sq = cached_weight_sq_norm(w)
    assert torch.equal(dora_linear(x, w, b, a, bb, m, 2.0, weight_sq_norm=sq), dora_linear(x, w, b, a, bb, m, 2.0))
    wrong = dora_linear(x, w, b, a, bb, m, 2.0, weight_sq_norm=2 * sq)
    assert not torch.allclose(wrong, dora_linear(x, w, b, a, bb, m, 2.0))


def test_dora_linear_norm_is_detached():
    # If n carried a gradient, dA / dB would differ from the reference that detaches it; check against an
    # explicitly non-detached composition that they do differ, so the comparison above can fail.
    x, w, b, a, bb, m = make(seed=15)
    y = dora_linear(x, w, b, a, bb, m, 2.0)
    full = w + 2.0 * bb @ a
    y_grad_norm = nn.functional.linear(x, (m / full.norm(dim=1)).view(-1, 1) * full, b)
    dy = torch.randn_like(y)
    assert rel(y, y_grad_norm) <= 1e-6  # same value...
    assert rel(grads(y, (a,), dy)[0], grads(y_grad_norm, (a,), dy)[0]) > 1e-3  # ...different gradient


def test_dora_linear_bf16_close_to_fp32_reference():
    x, w, b, a, bb, m = make(n=32, n_in=128, n_out=64, r=8, seed=16)
    lo = [t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad) for t in (x, w, b, a, bb)]
    y = dora_linear(lo[0], lo[1], lo[2], lo[3], lo[4], m, 2.0)
    assert y.dtype == torch.bfloat16
    hi = [t.detach().float().requires_grad_(t.requires_grad) for t in lo]  # the same values, in fp32
    m_hi = m.detach().clone().requires_grad_(True)
    y_ref = dora_linear_reference(hi[0], hi[1], hi[2], hi[3], hi[4], m_hi, 2.0)
    assert rel(y, y_ref) <= 1e-2
    dy = torch.randn_like(y_ref)
    got = grads(y, (lo[0], lo[3], lo[4], m), dy.to(torch.bfloat16))
    ref = grads(y_ref, (hi[0], hi[3], hi[4], m_hi), dy)
    assert got[3].dtype == m.dtype
    for gt, rf in zip(got, ref):
        assert rel(gt, rf) <= 2e-2


def test_dora_linear_nan_factor_gives_non_finite_output():
    # Behaviour, not policy: NaN in A reaches every row's norm (W_i · A_k), so every output is NaN; NaN in one row
    # of B spoils only that output column. Refusing such factors is the caller's job.
    x, w, b, a, bb, m = make(seed=17)
    a_bad = a.detach().clone()
    a_bad[0, 0] = float("nan")
    assert torch.isnan(dora_linear(x, w, b, a_bad, bb, m, 2.0)).all()
    b_bad = bb.detach().clone()
    b_bad[3, 0] = float("nan")
    y = dora_linear(x, w, b, a, b_bad, m, 2.0)
    assert torch.isnan(y[:, 3]).all()
    assert torch.isfinite(torch.cat([y[:, :3], y[:, 4:]], 1)).all()


def test_dora_linear_trainable_base_falls_back_to_reference():
    x, w, b, a, bb, m = make(seed=18)
    w = w.clone().requires_grad_(True)
    y = dora_linear(x, w, b, a, bb, m, 2.0)
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    assert gw.shape == w.shape and rel(y, dora_linear_reference(x, w, b, a, bb, m, 2.0)) <= 1e-6


def test_dora_linear_under_autocast_matches_reference():
    x, w, b, a, bb, m = make(seed=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dora_linear(x, w, b, a, bb, m, 2.0)
        y_ref = dora_linear_reference(x, w, b, a, bb, m, 2.0)
    assert y.dtype == y_ref.dtype and rel(y, y_ref) <= 1e-6


# ---------------------------------------------------------------- against real PEFT


class _Tiny(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


class _FixedDropout(nn.Module):
    """Stands in for PEFT's nn.Dropout with a known keep-mask, so a training-mode forward is reproducible."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1.0 - self.p)


def peft_dora(layer: nn.Module, r=4, alpha=8, rslora=False, dropout=0.0, fifo=False, seed=0):
    """A PEFT DoRA model around `layer` with random A, B and a magnitude moved away from its init."""
    import peft

    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["proj"], use_dora=True, init_lora_weights=False,
        use_rslora=rslora, lora_dropout=dropout, fan_in_fan_out=fifo,
    )
    torch.manual_seed(seed)
    model = peft.get_peft_model(_Tiny(layer), cfg)
    wrapped = model.base_model.model.proj
    with torch.no_grad():
        mag = wrapped.lora_magnitude_vector["default"].weight
        mag.mul_(torch.rand(mag.shape) + 0.5)
    return model, wrapped


def _linear_factors(wrapped):
    a = wrapped.lora_A["default"].weight
    b = wrapped.lora_B["default"].weight
    m = wrapped.lora_magnitude_vector["default"].weight
    return a, b, m, wrapped.scaling["default"]


def _base(kind: str, bias: bool, n_in=20, n_out=12):
    torch.manual_seed(1)
    if kind == "linear":
        return nn.Linear(n_in, n_out, bias=bias)
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(n_out, n_in)  # weight (in, out)
    with torch.no_grad():
        layer.weight.normal_(0, n_in**-0.5)
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_r", "rslora"])
@pytest.mark.parametrize("mode", ["eval_with_dropout", "train_no_dropout", "train_dropout"])
def test_matches_peft_linear_and_conv1d(kind, bias, rslora, mode):
    if kind == "conv1d" and not bias:
        pytest.skip("HF Conv1D always has a bias (the bias-free Conv1D layout is covered against the reference)")
    p = 0.0 if mode == "train_no_dropout" else 0.25
    fifo = kind == "conv1d"
    model, wrapped = peft_dora(_base(kind, bias), r=4, alpha=8, rslora=rslora, dropout=p, fifo=fifo)
    a, b, m, s = _linear_factors(wrapped)
    assert s == pytest.approx(8 / 4**0.5 if rslora else 8 / 4)
    base = wrapped.base_layer
    x = torch.randn(3, 5, 20, requires_grad=True)
    seed = 9
    if mode == "train_dropout":
        model.train()
        mask = torch_keep_mask((15, 20), p, seed, "cpu").view(3, 5, 20)
        wrapped.lora_dropout["default"] = _FixedDropout(mask, p)
    else:
        model.train(mode == "train_no_dropout")
    y_peft = model(x)
    training = mode != "eval_with_dropout"
    x2 = x.detach().clone().requires_grad_(True)
    y = dora_linear(x2, base.weight, base.bias, a, b, m, s, p, training, fan_in_fan_out=fifo, seed=seed)
    assert y.shape == y_peft.shape == (3, 5, 12)
    assert rel(y, y_peft) <= 1e-6
    dy = torch.randn_like(y)
    ref = grads(y_peft, (x, a, b, m), dy)
    got = grads(y, (x2, a, b, m), dy)
    for name, gt, rf in zip("xABm", got, ref):
        assert rel(gt, rf) <= 1e-5, name


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_peft_magnitude_init_is_our_norm(kind):
    fifo = kind == "conv1d"
    import peft

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True, init_lora_weights=False,
                          fan_in_fan_out=fifo)
    wrapped = peft.get_peft_model(_Tiny(_base(kind, True)), cfg).base_model.model.proj
    a, b, m, s = _linear_factors(wrapped)
    assert m.shape == (12,)
    assert rel(m, dora_weight_norm(wrapped.base_layer.weight, a, b, s, fifo)) <= 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_matches_peft(kind):
    fifo = kind == "conv1d"
    _, wrapped = peft_dora(_base(kind, True), fifo=fifo)
    a, b, m, s = _linear_factors(wrapped)
    w0 = wrapped.base_layer.weight.detach().clone()
    ours = dora_delta_merge(w0, a, b, m, s, fifo)
    assert ours.dtype == torch.float32 and ours.shape == w0.shape
    assert rel(ours, dora_merge_reference(w0, a, b, m, s, fifo)) <= 1e-6
    wrapped.merge()
    assert rel(ours, wrapped.base_layer.weight) <= 1e-6
    back = dora_unmerge(ours, a, b, m, s, dora_weight_norm(w0, a, b, s, fifo), fifo)
    assert rel(back, w0) <= 1e-5


def _peft_embedding(seed=0):
    _, wrapped = peft_dora(nn.Embedding(50, 16), r=4, alpha=8, seed=seed)
    with torch.no_grad():  # non-zero B regardless of PEFT's embedding init
        wrapped.lora_embedding_B["default"].normal_()
        wrapped.lora_embedding_A["default"].normal_()
    a = wrapped.lora_embedding_A["default"]  # (r, V)
    b = wrapped.lora_embedding_B["default"]  # (D, r)
    return wrapped, a, b, wrapped.lora_magnitude_vector["default"].weight, wrapped.scaling["default"]


def test_embedding_norm_runs_over_vocabulary_and_matches_peft():
    wrapped, a, b, m, s = _peft_embedding()
    w = wrapped.base_layer.weight  # (V, D)
    assert a.shape == (4, 50) and b.shape == (16, 4) and m.shape == (16,)
    n = dora_weight_norm(w, a, b, s, fan_in_fan_out=True)
    assert n.shape == (16,)
    full = w.detach() + s * (b @ a).t().detach()  # (V, D)
    assert rel(n, full.norm(dim=0)) <= 1e-6  # column norm: one value per embedding dimension

    ids = torch.randint(0, 50, (3, 7))
    y_peft = wrapped(ids)
    y = dora_embedding(ids, w, a, b, m, s, weight_sq_norm=cached_weight_sq_norm(w, fan_in_fan_out=True))
    assert rel(y, y_peft) <= 1e-6
    assert rel(y, dora_embedding_reference(ids, w, a, b, m, s)) <= 1e-6
    dy = torch.randn_like(y)
    for gt, rf in zip(grads(y, (a, b, m), dy), grads(y_peft, (a, b, m), dy)):
        assert rel(gt, rf) <= 1e-5


def test_embedding_merge_matches_peft():
    wrapped, a, b, m, s = _peft_embedding(seed=1)
    w0 = wrapped.base_layer.weight.detach().clone()
    ours = dora_delta_merge(w0, a, b, m, s, fan_in_fan_out=True)
    wrapped.merge()
    assert rel(ours, wrapped.base_layer.weight) <= 1e-6


# ---------------------------------------------------------------- saved activations


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of distinct storages autograd saves while running fn(), not counting the tensors in `exclude`."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_saved_memory_not_above_reference(p):
    x, w, b, a, bb, m = make(n=256, n_in=128, n_out=96, r=8, seed=19)
    params = (x, w, b, a, bb, m)
    n_d, n_out = 256 * 128 * 4, 256 * 96 * 4  # bytes of one (N, in) and one (N, out) fp32 activation
    mask = torch_keep_mask(x.shape, p, 1, "cpu") if p else None
    ref = saved_bytes(lambda: dora_linear_reference(x, w, b, a, bb, m, 2.0, p, p > 0, mask), params)
    ours = saved_bytes(lambda: dora_linear(x, w, b, a, bb, m, 2.0, p, p > 0, seed=1), params)
    lean = saved_bytes(lambda: dora_linear(x, w, b, a, bb, m, 2.0, p, p > 0, seed=1, recompute=True), params)
    assert ours <= ref
    assert lean <= ours - n_out  # recompute drops the (N, out) pre-scale output
    if p:
        assert ours <= ref - n_d  # no dropped-out copy of x is stored


# ---------------------------------------------------------------- the lean CUDA node, with its passes as torch ops


class _TorchPasses:
    """What kernels/_triton_dora.py computes, in float32 torch ops: stands in for the Triton passes on a CPU."""

    @staticmethod
    def scale_columns_(y, magnitude, norm, bias):
        out = y.float() * (magnitude.float() / norm)
        if bias is not None:
            out += bias.float()
        return y.copy_(out)

    @staticmethod
    def scale_grad(g, y, magnitude, norm, bias, m_dtype):
        gc = (g.float() * (magnitude.float() / norm)).to(g.dtype)
        if y is None:
            return gc, None
        dm = (g.float() * y.float()).sum(0)
        if bias is not None:
            dm -= bias.float() * g.float().sum(0)
        return gc, (dm / magnitude.float()).to(m_dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("fifo", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("frozen_m", [False, True], ids=["m-trained", "m-frozen"])
def test_lean_node_matches_reference_fp32(bias, fifo, frozen_m, monkeypatch):
    """_DoraFastFn (the no-dropout GPU node) against the reference: values and the gradients of x, A, B and m."""
    from adapterkit.kernels import dora as dora_mod

    monkeypatch.setattr(dora_mod, "_triton", lambda: _TorchPasses)
    x, w, b, a, bb, m = make(bias=bias, fifo=fifo, seed=21)
    x3 = x.detach().view(3, 3, -1).requires_grad_(True)
    if frozen_m:
        m.requires_grad_(False)
    s = 0.8
    norm = dora_weight_norm(w, a, bb, s, fifo)
    y = dora_mod._DoraFastFn.apply(x3, w.t() if fifo else w, b, a, bb, m, norm, s)
    y_ref = dora_linear_reference(x3, w, b, a, bb, m, s, 0.0, False, None, fan_in_fan_out=fifo)
    assert y.shape == y_ref.shape == (3, 3, 24)
    assert rel(y, y_ref) <= 1e-6
    dy = torch.randn_like(y)
    wrt = (x3, a, bb) if frozen_m else (x3, a, bb, m)
    for got, ref in zip(grads(y, wrt, dy), grads(y_ref, wrt, dy)):
        assert ref.abs().sum() > 0
        assert rel(got, ref) <= 1e-5


def test_dora_linear_takes_the_lean_node_only_where_it_applies(monkeypatch):
    """On a CPU tensor, with dropout, or with a trainable base the general node or the reference runs instead."""
    from adapterkit.kernels import dora as dora_mod

    calls = []
    monkeypatch.setattr(dora_mod._DoraFastFn, "apply", lambda *args: calls.append(args))
    x, w, b, a, bb, m = make(seed=22)
    dora_linear(x, w, b, a, bb, m, 1.0, from_output=True)  # CPU: never the CUDA node
    assert calls == []
