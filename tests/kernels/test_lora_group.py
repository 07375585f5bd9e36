"""The siblings' one node (`grouped_lora_linear`) against each sibling's plain composition: outputs and every
gradient, mixed ranks and biases, a dequantizing weight callable, one joint dequantizer for all siblings, frozen
inputs, outputs left unused; CUDA in bf16."""

from __future__ import annotations

import pytest
import torch

from adapterkit.kernels.lora_group import grouped_lora_linear
from adapterkit.kernels.reference import lora_linear_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (out, rank, bias, scaling) per sibling: q/k/v-like widths with mixed ranks.
SIBLINGS = [(24, 4, False, 2.0), (8, 8, True, 0.5), (8, 1, False, 1.0)]


def operands(dtype=torch.float32, device="cpu", n_in=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, n_in, generator=g)
    layers = []
    for out, r, bias, s in SIBLINGS:
        w = torch.randn(out, n_in, generator=g) / n_in**0.5
        b = torch.randn(out, generator=g) if bias else None
        a = torch.randn(r, n_in, generator=g) / n_in**0.5
        bb = torch.randn(out, r, generator=g) / r**0.5
        layers.append([w, b, a, bb, s])
    cast = lambda t: t if t is None or isinstance(t, float) else t.to(device, dtype)  # noqa: E731
    return cast(x), [[cast(t) for t in layer] for layer in layers]


def leaves(x, layers, need_x=True, need_ab=True):
    x = x.clone().requires_grad_(need_x)
    layers = [[w, b, a.clone().requires_grad_(need_ab), bb.clone().requires_grad_(need_ab), s]
              for w, b, a, bb, s in layers]
    return x, layers


def grads_of(x, layers, outs, used):
    loss = sum((out.float() * (k + 1)).square().mean() for k, out in enumerate(outs) if k in used)
    tensors = [x] + [t for layer in layers for t in layer[2:4]]
    wanted = [t for t in tensors if t.requires_grad]
    got = torch.autograd.grad(loss, wanted, allow_unused=True)
    return dict(zip([id(t) for t in wanted], got)), wanted


class Stacked:
    """A stand-in joint dequantizer: every sibling's weight stacked, counting its calls."""

    def __init__(self, weights):
        self.weights, self.calls = weights, 0
        starts = [sum(w.shape[0] for w in weights[:i]) for i in range(len(weights))]
        self.rows = tuple((start, w.shape[0]) for start, w in zip(starts, weights))

    def __call__(self):
        self.calls += 1
        return torch.cat(self.weights)


def compare(x, layers, dtype, used=(0, 1, 2), need_x=True, need_ab=True, callable_weight=False, tol=1e-5,
            joint=None):
    xr, lr = leaves(x, layers, need_x, need_ab)
    ref = [lora_linear_reference(xr, w, b, a, bb, s) for w, b, a, bb, s in lr]
    xg, lg = leaves(x, layers, need_x, need_ab)
    specs = [((lambda w=w: w) if callable_weight else w, b, a, bb, s) for w, b, a, bb, s in lg]
    if joint is not None:
        specs = [(None, *spec[1:]) for spec in specs]  # the joint dequantizer alone gives the weights
    outs = grouped_lora_linear(xg, specs, joint)
    assert len(outs) == len(layers)
    for got, want in zip(outs, ref):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    g_ref, wanted_ref = grads_of(xr, lr, ref, used)
    g_got, wanted_got = grads_of(xg, lg, outs, used)
    for tr, tg in zip(wanted_ref, wanted_got):
        want, got = g_ref[id(tr)], g_got[id(tg)]
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    return g_got, lg


def test_outputs_and_gradients_match_each_sibling_alone():
    x, layers = operands()
    compare(x, layers, torch.float32)


def test_a_dequantizing_weight_callable_gives_the_same():
    x, layers = operands(seed=1)
    compare(x, layers, torch.float32, callable_weight=True)


def test_a_joint_dequantizer_is_called_once_per_direction():
    x, layers = operands(seed=6)
    joint = Stacked([layer[0] for layer in layers])
    compare(x, layers, torch.float32, joint=joint)
    assert joint.calls == 2  # forward, then backward for dX
    joint = Stacked([layer[0] for layer in layers])
    compare(x, layers, torch.float32, need_x=False, joint=joint)
    assert joint.calls == 1  # no input gradient: not dequantized again


def test_frozen_input_or_frozen_factors():
    x, layers = operands(seed=2)
    compare(x, layers, torch.float32, need_x=False)
    compare(x, layers, torch.float32, need_ab=False)


def test_an_unused_output_leaves_its_factors_without_gradient():
    """As for a layer whose output is not used: None for its A and B, and nothing of it in dX."""
    x, layers = operands(seed=3)
    grads, lg = compare(x, layers, torch.float32, used=(0, 2))
    assert grads[id(lg[1][2])] is None and grads[id(lg[1][3])] is None
    grads, lg = compare(x, layers, torch.float32, used=(1,))
    assert all(grads[id(lg[k][2])] is None for k in (0, 2))


def test_no_output_used_gives_no_gradient_at_all():
    x, layers = operands(seed=4)
    xg, lg = leaves(x, layers)
    outs = grouped_lora_linear(xg, [tuple(layer) for layer in lg])
    loss = (outs[0] * 0).sum()  # x's gradient flows only through the first output; the others get none
    loss.backward()
    assert lg[1][2].grad is None and lg[2][3].grad is None
    assert torch.equal(xg.grad, torch.zeros_like(xg))


@cuda
def test_bf16_on_cuda_matches_the_composition():
    x, layers = operands(torch.bfloat16, "cuda", n_in=64, seed=5)
    compare(x, layers, torch.bfloat16, tol=3e-2)
