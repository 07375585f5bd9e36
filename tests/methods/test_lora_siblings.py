"""Sibling LoRA layers (q/k/v, gate/up) trained through one node: which layers are grouped, that a training step
gives what each layer alone gives (float and 4-bit bases), and every way a kept output could go stale."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.methods.lora import LoraLinear
from adapterkit.methods.lora_siblings import link_siblings
from helpers import input_ids, tiny_llama

GROUPED = "_GroupedLoraFnBackward"


def adapted(model=None, targets="all-linear", dropout=0.0, seed=0):
    model = model if model is not None else tiny_llama(seed=seed)
    ak.attach(model, ak.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout,
                                   init_lora_weights=False))
    return model.train()


def step(model, ids):
    """Loss and every gradient of one training step, and the grad_fn name of each projection's output."""
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, type(out.grad_fn).__name__)  # returns None: the output stays as it is
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, seen


def alone(model):
    link_siblings(model, LoraLinear, names=())  # every layer its own node again


def assert_same_step(model, ids, tol=1e-5):
    loss, grads, seen = step(model, ids)
    alone(model)
    loss_alone, grads_alone, seen_alone = step(model, ids)
    link_siblings(model, LoraLinear)
    torch.testing.assert_close(loss, loss_alone, rtol=tol, atol=tol)
    assert grads.keys() == grads_alone.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_alone[name], rtol=tol, atol=tol, msg=name)
    assert GROUPED not in seen_alone.values()
    return seen


def test_siblings_are_grouped_per_parent_module():
    model = adapted()
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    assert attn.q_proj._siblings is attn.k_proj._siblings is attn.v_proj._siblings is not None
    assert attn.q_proj._siblings.names == ("q_proj", "k_proj", "v_proj")
    assert mlp.gate_proj._siblings is mlp.up_proj._siblings and mlp.gate_proj._siblings.names == ("gate_proj", "up_proj")
    assert attn.o_proj._siblings is None and mlp.down_proj._siblings is None
    assert attn.q_proj._siblings is not model.model.layers[1].self_attn.q_proj._siblings
    only_qv = adapted(targets=["q_proj", "v_proj"])
    assert only_qv.model.layers[0].self_attn.q_proj._siblings.names == ("q_proj", "v_proj")
    only_q = adapted(targets=["q_proj"])
    assert only_q.model.layers[0].self_attn.q_proj._siblings is None


def test_a_training_step_matches_each_layer_alone():
    model = adapted()
    seen = assert_same_step(model, input_ids(batch=2, length=9))
    names = [n for n in seen if "layers.0." in n]
    grouped = {n.rsplit(".", 1)[-1] for n in names if seen[n] == GROUPED}
    assert grouped == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # o_proj and down_proj: alone


def test_a_training_step_on_a_4bit_base_matches_each_layer_alone():
    pytest.importorskip("bitsandbytes")
    from bnb_cases import quantized

    model = adapted(quantized("llama", "nf4"))
    seen = assert_same_step(model, input_ids(batch=2, length=9), tol=1e-4)
    assert sum(v == GROUPED for v in seen.values()) == 5 * len(model.model.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_4bit_base_on_cuda_dequantizes_each_group_in_one_launch():
    """bf16 on CUDA: the siblings' weights come from one joint dequantize launch, and the step is bit for bit the
    step with bitsandbytes' own dequantize op."""
    pytest.importorskip("bitsandbytes")
    from adapterkit.kernels import dequant4
    from helpers import build

    model = ak.quantize_model(build("llama", hidden=64, seed=0).to("cuda", torch.bfloat16), "nf4",
                              compute_dtype=torch.bfloat16)
    model = adapted(model)
    ids = input_ids(batch=2, length=9).cuda()
    loss, grads, seen = step(model, ids)
    assert sum(v == GROUPED for v in seen.values()) == 5 * len(model.model.layers)
    groups = {id(m._siblings): m._siblings for m in model.modules() if isinstance(m, LoraLinear) and m._siblings}
    assert groups and all(isinstance(g.joint, dequant4.JointDequant4) for g in groups.values())
    dequant4.set_enabled(False)
    try:
        loss_bnb, grads_bnb, _ = step(model, ids)
        assert all(g.joint is None for g in groups.values())
    finally:
        dequant4.set_enabled(True)
    assert torch.equal(loss, loss_bnb) and grads.keys() == grads_bnb.keys()
    assert all(torch.equal(grads[n], grads_bnb[n]) for n in grads)


def test_input_recompute_mode_gives_the_same_step(monkeypatch):
    from adapterkit.kernels import recompute

    monkeypatch.setattr(recompute, "_mode", "all")
    model = adapted(seed=1)
    assert_same_step(model, input_ids(batch=2, length=9, seed=1))


def sibling_call(model, xs, used=(0, 1, 2)):
    """q_proj(xs[0]), k_proj(xs[1]), v_proj(xs[2]) of the first attention; outputs, grad_fn names and grads."""
    attn = model.model.layers[0].self_attn
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    outs = [layer(x) for layer, x in zip(layers, xs)]
    params = [p for layer in layers for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    loss = sum(out.square().sum() * (k + 1) for k, out in enumerate(outs) if k in used)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return outs, [type(out.grad_fn).__name__ for out in outs], grads


def assert_calls_match(model, xs, used=(0, 1, 2)):
    outs, kinds, grads = sibling_call(model, xs, used)
    alone(model)
    outs_alone, _, grads_alone = sibling_call(model, xs, used)
    link_siblings(model, LoraLinear)
    for got, want in zip(outs, outs_alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_alone):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return kinds


def test_a_sibling_called_on_another_input_runs_alone():
    model = adapted()
    x1, x2 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    kinds = assert_calls_match(model, (x1, x2, x1))
    assert kinds[0] == kinds[2] == GROUPED and kinds[1] != GROUPED


def test_an_input_changed_in_place_after_the_leader_is_not_served_stale():
    model = adapted()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    attn.q_proj(x)
    kept = attn.q_proj._siblings.kept[2][1][0]
    x.mul_(2.0)
    got = attn.k_proj(x)
    assert got is not kept and type(got.grad_fn).__name__ != GROUPED
    alone(model)
    torch.testing.assert_close(got, attn.k_proj(x))


def test_a_factor_changed_after_the_leader_is_not_served_stale():
    model = adapted()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    attn.q_proj(x)
    with torch.no_grad():
        attn.k_proj.lora_B["default"].weight.add_(1.0)  # an optimizer step between the two calls, say
    got_k, got_v = attn.k_proj(x), attn.v_proj(x)
    assert type(got_k.grad_fn).__name__ != GROUPED and type(got_v.grad_fn).__name__ == GROUPED
    alone(model)
    torch.testing.assert_close(got_k, attn.k_proj(x))
    torch.testing.assert_close(got_v, attn.v_proj(x))


def test_an_unused_sibling_gets_no_gradient():
    model = adapted()
    x = torch.randn(2, 5, 32)
    kinds = assert_calls_match(model, (x, x, x), used=(0, 2))
    assert kinds == [GROUPED] * 3


def test_kept_outputs_are_handed_out_once_and_replaced_by_the_next_leader_call():
    model = adapted()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    attn.q_proj(x)
    first = attn.k_proj(x)
    again = attn.k_proj(x)  # a second call: its own node
    assert type(first.grad_fn).__name__ == GROUPED and type(again.grad_fn).__name__ != GROUPED
    attn.q_proj(x)
    attn.q_proj(torch.randn(2, 5, 32))  # a new leader call drops what the last one kept
    assert type(attn.v_proj(x).grad_fn).__name__ != GROUPED


def test_eval_no_grad_and_dropout_take_each_layer_alone():
    model = adapted()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    model.eval()
    assert type(attn.q_proj(x).grad_fn).__name__ != GROUPED and attn.q_proj._siblings.kept is None
    with torch.no_grad():
        model.train()
        assert attn.q_proj(x).grad_fn is None
    dropped = adapted(dropout=0.1)
    out = dropped.model.layers[0].self_attn.q_proj(x)
    assert type(out.grad_fn).__name__ != GROUPED


def test_deleting_an_adapter_regroups_what_is_left():
    model = adapted(targets=["q_proj", "k_proj"])
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False), name="other")
    attn = model.model.layers[0].self_attn
    assert attn.q_proj._siblings.names == ("q_proj", "k_proj", "v_proj")
    ak.delete(model, "default")
    assert attn.v_proj._siblings is None and not isinstance(attn.q_proj, LoraLinear)


def test_two_active_adapters_take_each_layer_alone():
    model = adapted()
    ak.attach(model, ak.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), name="second")
    ak.set_active(model, ["default", "second"])
    model.train()
    _, _, seen = step(model, input_ids(batch=2, length=9))
    assert GROUPED not in seen.values()
    ak.set_active(model, "second")
    model.train()
    _, _, seen = step(model, input_ids(batch=2, length=9))
    assert seen["model.layers.0.self_attn.k_proj"] == GROUPED  # one adapter again: grouped again


def test_the_environment_switch_turns_grouping_off(monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_LORA_SIBLINGS", "0")
    model = adapted()
    assert all(m._siblings is None for m in model.modules() if isinstance(m, LoraLinear))
    _, _, seen = step(model, input_ids(batch=2, length=9))
    assert GROUPED not in seen.values()
    monkeypatch.setenv("ADAPTERKIT_LORA_SIBLINGS", "1")
    link_siblings(model, LoraLinear)
    assert model.model.layers[0].self_attn.q_proj._siblings is not None


def test_autocast_takes_each_layer_alone():
    """Under autocast the fused nodes do not apply (lora_linear's plain composition runs), grouped or not."""
    model = adapted()
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.model.layers[0].self_attn.q_proj(x)
    assert type(out.grad_fn).__name__ != GROUPED and model.model.layers[0].self_attn.q_proj._siblings.kept is None
