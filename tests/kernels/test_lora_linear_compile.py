"""torch.compile over the fused LoRA linear: no graph breaks with dropout, and the compiled path's math and mask.

Graph breaks are counted with dynamo's own counters after a reset. The model-level tests use the "aot_eager" backend
(dynamo + AOTAutograd, which traces the backward too, without Inductor's code generation) to stay fast on 2 cores;
one kernel-level test runs Inductor itself.
"""

from __future__ import annotations

import pytest
import torch
from helpers import input_ids, tiny_llama

import adapterkit as ak
from adapterkit.kernels import dropout_mask, lora_linear, lora_linear_reference


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks() -> dict[str, int]:
    return dict(torch._dynamo.utils.counters["graph_break"])


def lora_llama(dropout: float = 0.1):
    """One-layer tiny Llama with a non-zero adapter (random A and B) on q/v, so both factors get gradients."""
    model = tiny_llama(layers=1)
    cfg = ak.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=dropout,
                        init_lora_weights=False)
    return ak.attach(model, cfg)


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_training_step_with_dropout_has_no_graph_breaks():
    model = lora_llama().train()
    compiled = torch.compile(model, backend="aot_eager")
    ids = input_ids(batch=2, length=8)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    assert graph_breaks() == {}, f"graph breaks under torch.compile: {graph_breaks()}"
    params = lora_params(model)
    assert len(params) == 4  # A and B on q_proj and v_proj of one layer
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    # Dropout really ran: the training logits differ from the (dropout-free) eval logits of the same weights.
    with torch.no_grad():
        model.eval()
        assert not torch.allclose(out.logits, model(input_ids=ids).logits, atol=1e-6)


def test_compiled_eval_matches_eager():
    model = lora_llama().eval()
    ids = input_ids(batch=2, length=8)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="aot_eager")(input_ids=ids).logits
    assert graph_breaks() == {}, f"graph breaks under torch.compile: {graph_breaks()}"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def make(n=6, n_in=40, n_out=24, r=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype)
    a = (torch.randn(r, n_in, generator=g) / n_in**0.5).to(dtype).requires_grad_(True)
    bb = (torch.randn(n_out, r, generator=g) / r**0.5).to(dtype).requires_grad_(True)
    return x, w, b, a, bb


def against_reference(fn, x, w, b, a, bb, p, seed):
    """fn's output and grads next to the reference's with the mask `dropout_mask(x, p, seed)`."""
    y = fn(x, a, bb)
    y_ref = lora_linear_reference(x, w, b, a, bb, 1.5, p, True, dropout_mask=dropout_mask(x, p, seed))
    dy = torch.randn_like(y)
    return y, y_ref, torch.autograd.grad(y, (x, a, bb), dy), torch.autograd.grad(y_ref, (x, a, bb), dy)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_tensor_seed_applies_the_hash_mask_in_forward_and_backward(backend):
    x, w, b, a, bb = make()
    seed = torch.tensor(123456789)
    fn = torch.compile(lambda x, a, bb: lora_linear(x, w, b, a, bb, 1.5, 0.25, True, seed=seed), backend=backend)
    y, y_ref, got, ref = against_reference(fn, x, w, b, a, bb, 0.25, seed)
    assert graph_breaks() == {}, f"graph breaks under torch.compile: {graph_breaks()}"
    assert rel(y, y_ref) <= 1e-5
    for gt, rf in zip(got, ref):
        assert rel(gt, rf) <= 1e-5


def test_compiled_int_seed_keeps_the_eager_mask():
    x, w, b, a, bb = make(seed=1)
    fn = torch.compile(lambda x, a, bb: lora_linear(x, w, b, a, bb, 1.5, 0.25, True, seed=5), backend="aot_eager")
    y, y_ref, got, ref = against_reference(fn, x, w, b, a, bb, 0.25, 5)
    assert rel(y, y_ref) <= 1e-5
    for gt, rf in zip(got, ref):
        assert rel(gt, rf) <= 1e-5


def test_eager_tensor_seed_is_the_hash_mask_and_gradchecks():
    x = torch.randn(64, 256)
    seed = torch.tensor(42)
    m = dropout_mask(x, 0.2, seed)
    assert torch.equal(m, dropout_mask(x, 0.2, torch.tensor(42)))
    assert not torch.equal(m, dropout_mask(x, 0.2, torch.tensor(43)))
    assert abs(m.float().mean().item() - 0.8) < 0.01
    x, w, b, a, bb = make(n=5, n_in=7, n_out=5, r=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, a, bb: lora_linear(x, w, b, a, bb, 0.9, 0.3, True, seed=seed), (x, a, bb))


def test_compiled_seed_is_fresh_per_call():
    x, w, b, a, bb = make()
    fn = torch.compile(lambda x, a, bb: lora_linear(x, w, b, a, bb, 1.5, 0.25, True), backend="aot_eager")
    with torch.no_grad():
        y1, y2 = fn(x, a, bb), fn(x, a, bb)
    assert graph_breaks() == {}, f"graph breaks under torch.compile: {graph_breaks()}"
    assert not torch.equal(y1, y2)


def test_compiled_training_step_of_sibling_layers_has_no_graph_breaks_and_matches_eager():
    """q/k/v and gate/up are sibling groups (one node eagerly); under torch.compile each layer takes its own node,
    with no graph break from the group's bookkeeping, and the gradients are eager's."""
    torch._dynamo.reset()
    model = ak.attach(tiny_llama(layers=1), ak.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          init_lora_weights=False)).train()
    assert model.model.layers[0].self_attn.q_proj._siblings is not None
    ids = input_ids(batch=2, length=8)
    model(input_ids=ids, labels=ids).loss.backward()
    eager = {n: p.grad.clone() for n, p in lora_params(model).items()}
    model.zero_grad(set_to_none=True)
    torch.compile(model, backend="aot_eager")(input_ids=ids, labels=ids).loss.backward()
    assert graph_breaks() == {}, f"graph breaks under torch.compile: {graph_breaks()}"
    for name, p in lora_params(model).items():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-5, atol=1e-6, msg=name)
