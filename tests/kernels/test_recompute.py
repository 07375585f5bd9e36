"""LoRA inputs rebuilt in backward from tensors autograd keeps anyway: bit-identical gradients, fewer saved bytes,
and no guess where the rebuild would not be exact."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.kernels import recompute, set_input_recompute
from adapterkit.memory import SavedTensorMeter
from helpers import build, input_ids


@pytest.fixture(autouse=True)
def recompute_on():
    """These tests turn the full rebuild on ("all"; the default rebuilds products only), then restore."""
    before = recompute.input_recompute_enabled()
    set_input_recompute(True)
    yield
    set_input_recompute(before)


@pytest.fixture
def recompute_off():
    return lambda: set_input_recompute(False)


def test_rebuild_defaults_to_products_and_is_switchable() -> None:
    import os
    import subprocess
    import sys

    code = "from adapterkit.kernels import input_recompute_mode as m; print(m())"
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERKIT_LORA_RECOMPUTE"}
    seen, warned = [], []
    for value in (None, "0", "1", "products", "bogus"):
        run_env = env if value is None else {**env, "ADAPTERKIT_LORA_RECOMPUTE": value}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=run_env)
        seen.append(done.stdout.strip())
        warned.append("none of 0, products, 1" in done.stderr)
    assert seen == ["products", "off", "all", "products", "products"]
    assert warned == [False, False, False, False, True]  # a misspelt value is said, not silently taken


def _model(dtype, dropout):
    model = build("llama", hidden=32).to(dtype)
    ak.attach(model, ak.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout))
    for p in ak.trainable_parameters(model):
        p.data = p.data.to(dtype)
    return model.train()


def _run(model):
    ids = input_ids(batch=2, length=9)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # the frozen base's floor, as in bench/
    params = ak.trainable_parameters(model)
    torch.manual_seed(3)
    with SavedTensorMeter(exclude=list(model.parameters())) as meter:
        loss = model(inputs_embeds=emb, labels=ids).loss
    loss.backward()
    grads = [emb.grad.clone()] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads, meter.bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_are_bit_identical_and_the_inputs_are_not_kept(dtype, dropout, recompute_off):
    model = _model(dtype, dropout)
    got, kept = _run(model)
    recompute_off()
    want, kept_all = _run(model)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # Per layer: the two norm outputs (hidden 32) and SwiGLU's product (64) are no longer kept, 2x9 tokens each.
    saved = 2 * (2 * 32 + 64) * 2 * 9 * dtype.itemsize
    assert kept_all - kept == saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_mode_rebuilds_only_the_swiglu_product(dtype, recompute_off):
    set_input_recompute("products")
    assert recompute.input_recompute_mode() == "products"
    model = _model(dtype, 0.0)
    got, kept = _run(model)
    recompute_off()
    want, kept_all = _run(model)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # Per layer only SwiGLU's product (intermediate 64) is no longer kept; the norm outputs still are.
    assert kept_all - kept == 2 * 64 * 2 * 9 * dtype.itemsize


def test_recompute_modes_are_checked():
    with pytest.raises(ValueError, match="products"):
        set_input_recompute("sometimes")
    set_input_recompute(False)
    assert recompute.input_recompute_mode() == "off" and not recompute.input_recompute_enabled()
    set_input_recompute(True)
    assert recompute.input_recompute_mode() == "all"


def test_checkpointed_layers_still_get_the_same_gradients(recompute_off):
    model = _model(torch.float32, 0.0)
    with ak.checkpointed(model):
        got, _ = _run(model)
    recompute_off()
    want, _ = _run(model)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_cast_into_a_float32_product_is_not_guessed():
    w = torch.randn(8)
    h = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    assert recompute.input_recipe(w * h.float()) is None  # the cast's source type is not certain from the graph
    h32 = torch.randn(3, 8, requires_grad=True)
    r = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True))
    x = w.bfloat16() * (h32 * r).bfloat16()  # RMSNorm in bfloat16
    recipe = recompute.input_recipe(x)
    assert recipe is not None and torch.equal(recipe(), x)


def test_inputs_of_other_ops_are_saved_as_usual():
    h = torch.randn(3, 8, requires_grad=True)
    assert recompute.input_recipe(h) is None  # a leaf
    assert recompute.input_recipe(torch.tanh(h)) is None
    assert recompute.input_recipe(h * 2.0) is None  # MulBackward1 (a Python scalar)


def test_a_retained_graph_can_run_backward_twice():
    model = _model(torch.bfloat16, 0.0)
    ids = input_ids(batch=1, length=5)
    loss = model(input_ids=ids, labels=ids).loss
    params = ak.trainable_parameters(model)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss.backward()
    for p, g in zip(params, first):
        assert torch.equal(p.grad, g)
