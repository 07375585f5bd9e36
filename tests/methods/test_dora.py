"""DoRA (`LoraConfig(use_dora=True)`): both directions against the real peft, merge / exact unmerge, dtype, bad input.

Every case perturbs the magnitude vectors after init, so m ≠ ‖W + sBA‖ and the renormalisation is exercised.
"""

from __future__ import annotations

import weakref

import pytest
import torch

import adapterkit as ak
from adapterkit.state import adapter_state
from helpers import assert_state_equal, assert_unchanged, build, input_ids, logits, perturb, sgd_steps, snapshot

peft = pytest.importorskip("peft")

ATTN = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}
EMBED = {"gpt2": "wte", "llama": "embed_tokens", "qwen2": "embed_tokens"}


def case_kwargs(arch: str, case: str) -> dict:
    base = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ATTN[arch], "use_dora": True}
    first = ATTN[arch][0]
    extra = {
        "attn": {},
        "all_linear_rslora": {"target_modules": "all-linear", "use_rslora": True, "r": 8, "lora_alpha": 16},
        "patterns": {"rank_pattern": {first: 2}, "alpha_pattern": {first: 3.0}, "r": 6},
        "dropout": {"lora_dropout": 0.2},
        "embedding": {"target_modules": [EMBED[arch], first]},
    }[case]
    return {**base, **extra}


def _perturb_magnitudes(model: torch.nn.Module) -> None:
    perturb([p for n, p in model.named_parameters() if "lora_magnitude_vector" in n], scale=0.1)


@pytest.mark.parametrize("case", ["attn", "all_linear_rslora", "patterns", "dropout", "embedding"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_dora_round_trip_both_directions(arch: str, case: str, tmp_path) -> None:
    kwargs = case_kwargs(arch, case)
    ids = input_ids()

    peft_model = peft.get_peft_model(build(arch), peft.LoraConfig(**kwargs))
    _perturb_magnitudes(peft_model)
    peft_model.eval()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = build(arch)
    report = ak.load(ours, tmp_path / "peft")
    assert not report.missing and not report.unexpected and not report.refused
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=0)

    model = build(arch)
    ak.attach(model, ak.LoraConfig(**kwargs))
    _perturb_magnitudes(model)
    model.eval()
    ours_logits = logits(model, ids)
    assert not torch.allclose(ours_logits, logits(build(arch), ids), atol=1e-4), "adapter is a no-op"
    ak.save(model, tmp_path / "ak")
    loaded = peft.PeftModel.from_pretrained(build(arch), tmp_path / "ak").eval()
    torch.testing.assert_close(logits(loaded, ids), ours_logits, atol=1e-5, rtol=0)

    # Merge and bit-exact unmerge.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ak.merge(model)
    torch.testing.assert_close(logits(model, ids), ours_logits, atol=1e-4, rtol=0)
    ak.unmerge(model)
    assert_state_equal(model.state_dict(), before)
    torch.testing.assert_close(logits(model, ids), ours_logits, atol=0, rtol=0)


def test_two_named_dora_adapters_both_ways(tmp_path) -> None:
    ids = input_ids()
    peft_model = peft.get_peft_model(build("llama"), peft.LoraConfig(**case_kwargs("llama", "attn")))
    peft_model.add_adapter("second", peft.LoraConfig(**case_kwargs("llama", "patterns")))
    _perturb_magnitudes(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    wanted = {}
    for name in ("default", "second"):
        peft_model.set_adapter(name)
        wanted[name] = logits(peft_model, ids)
    ours = build("llama")
    ak.load(ours, tmp_path / "peft")
    ak.load(ours, tmp_path / "peft", name="second", activate=False)
    for name in ("default", "second"):
        ak.set_active(ours, name)
        torch.testing.assert_close(logits(ours, ids), wanted[name], atol=1e-5, rtol=0)

    ak.save(ours, tmp_path / "ak")
    back = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ak")
    back.load_adapter(tmp_path / "ak" / "second", adapter_name="second")
    back.eval()
    for name in ("default", "second"):
        back.set_adapter(name)
        torch.testing.assert_close(logits(back, ids), wanted[name], atol=1e-5, rtol=0)


def test_dora_training_matches_peft_gradients() -> None:
    """Train mode without dropout: loss and every adapter gradient equal PEFT's (fp32)."""
    kwargs = case_kwargs("llama", "attn")
    ids = input_ids()
    theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(**kwargs))
    ours = ak.attach(build("llama"), ak.LoraConfig(**kwargs))
    for model in (theirs, ours):
        _perturb_magnitudes(model)
        model.train()
    loss_t = theirs(input_ids=ids, labels=ids).loss
    loss_o = ours(input_ids=ids, labels=ids).loss
    loss_t.backward()
    loss_o.backward()
    torch.testing.assert_close(loss_o, loss_t, atol=1e-6, rtol=0)
    grads_t = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
               for n, p in theirs.named_parameters() if p.requires_grad}
    grads_o = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_t.keys() == grads_o.keys() and grads_o
    for name, grad in grads_o.items():
        torch.testing.assert_close(grad, grads_t[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fp32_dora_adapter_loads_onto_bf16_base(tmp_path) -> None:
    model = ak.attach(build("llama"), ak.LoraConfig(**case_kwargs("llama", "attn")))
    _perturb_magnitudes(model)
    reference = logits(model)
    ak.save(model, tmp_path)
    half = build("llama").to(torch.bfloat16)
    report = ak.load(half, tmp_path)
    assert report.base_check == "same base"
    wrapper = half.model.layers[0].self_attn.q_proj
    assert wrapper.lora_magnitude_vector["default"].weight.dtype == torch.bfloat16
    out = logits(half)
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max() < 0.1  # bf16 rounding of a logit scale of ~1


def test_dora_nan_magnitude_refused_on_save_and_merge(tmp_path) -> None:
    model = ak.attach(build("llama"), ak.LoraConfig(**case_kwargs("llama", "attn")))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight[3] = float("nan")
    with pytest.raises(ak.AdapterSaveError, match="lora_magnitude_vector"):
        ak.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    before = snapshot(model)
    with pytest.raises(ak.MergeError, match="non-finite"):
        ak.merge(model)
    assert_unchanged(model, before)


def test_dora_on_bias_layers_and_conv1d_matches_peft_forward() -> None:
    """GPT-2's Conv1D has a bias: DoRA scales the product, not the bias (PEFT's rule); checked against PEFT."""
    kwargs = case_kwargs("gpt2", "all_linear_rslora")
    theirs = peft.get_peft_model(build("gpt2"), peft.LoraConfig(**kwargs)).eval()
    ours = ak.attach(build("gpt2"), ak.LoraConfig(**kwargs))
    state = {n.replace("base_model.model.", "").replace(".default", ""): p for n, p in theirs.named_parameters()
             if p.requires_grad}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(state[name.replace(".default", "")])
        _perturb_magnitudes(theirs)
        _perturb_magnitudes(ours)
    ours.eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)


def test_fused_dora_path_is_used_and_matches_the_loop() -> None:
    """One DoRA adapter on nn.Linear runs the single autograd node; two active adapters take the loop. Same math."""
    model = ak.attach(build("llama"), ak.LoraConfig(**case_kwargs("llama", "attn")))
    _perturb_magnitudes(model)
    ak.attach(model, ak.LoraConfig(**{**case_kwargs("llama", "attn"), "init_lora_weights": True}), name="noop")
    wrapper = model.model.layers[0].self_attn.q_proj
    ak.set_active(model, "default")
    assert wrapper._fused == "dora"
    single = logits(model)
    ak.set_active(model, ["default", "noop"])  # "noop": B = 0, m = ‖W‖, so it changes nothing
    assert wrapper._fused is None
    torch.testing.assert_close(logits(model), single, atol=1e-5, rtol=0)


def test_dora_state_records_magnitudes_as_peft_names_them() -> None:
    model = ak.attach(build("llama"), ak.LoraConfig(**case_kwargs("llama", "attn")))
    names = [n for n in model.state_dict() if "magnitude" in n]
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight" in names
    wrapper = adapter_state(model).wrappers["model.layers.0.self_attn.q_proj"]
    assert set(wrapper.file_tensors("default")) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}


def _dora_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ak.attach(build("llama"), ak.LoraConfig(r=4, use_dora=True, init_lora_weights=False,
                                                    target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    return model.train()


def test_a_stale_norm_refreshes_every_stale_dora_layer_at_once(monkeypatch) -> None:
    """As on a GPU: after an optimizer step the first DoRA layer computes all the model's stale norms in one call;
    the others find theirs fresh. Losses and gradients equal a model whose layers compute their own."""
    from adapterkit.methods import dora as dora_method

    calls: list[int] = []
    real = dora_method.grouped_norms

    def counting(items, scalings):
        calls.append(len(items))
        return real(items, scalings)

    want = sgd_steps(_dora_model(0))
    monkeypatch.setattr(dora_method, "groupable", lambda m, a, b: True)  # on a CPU the numerics stay the reference's
    monkeypatch.setattr(dora_method, "grouped_norms", counting)
    monkeypatch.setattr(dora_method, "_live", weakref.WeakSet())  # only this test's layers: others' may linger
    idle = _dora_model(1).eval()  # another model's stale layers, not training: left to compute their own
    with torch.no_grad():
        idle.model.layers[0].self_attn.q_proj.lora_A["default"].weight.mul_(2.0)
    model = _dora_model(0)
    layers = sum(isinstance(m, dora_method.Magnitude) for m in model.modules())
    calls.clear()
    got = sgd_steps(model)
    assert layers == 8 and calls == [layers, layers]  # steps 2 and 3; step 1 used the norms from attach
    for step_got, step_want in zip(got, want):
        for g, w in zip(step_got, step_want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    q = idle.model.layers[0].self_attn.q_proj
    magnitude = q.lora_magnitude_vector["default"]
    assert not magnitude._fresh(magnitude._state(q))
    fresh = dora_method.dora_weight_norm(q.base_layer.weight, q.lora_A["default"].weight, q.lora_B["default"].weight,
                                         magnitude.record.scaling)
    torch.testing.assert_close(magnitude.norm(q), fresh, rtol=1e-6, atol=1e-6)
    assert calls[-1] == layers + 1  # on its own turn, with the training model's layers its last step left stale


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-launch norm runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_norms_on_cuda_train_like_per_layer_norms(monkeypatch, dtype) -> None:
    from adapterkit.methods import dora as dora_method

    def run(grouped: bool):
        if not grouped:
            monkeypatch.setattr(dora_method, "groupable", lambda m, a, b: False)
        model = _dora_model(0).to("cuda", dtype)
        losses = torch.stack([step[0].float() for step in sgd_steps(model, device="cuda")])
        monkeypatch.undo()
        return losses, [p.detach().float() for p in ak.trainable_parameters(model)]

    (loss_g, params_g), (loss_l, params_l) = run(True), run(False)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss_g, loss_l, rtol=tol, atol=tol)
    for g, l in zip(params_g, params_l):
        torch.testing.assert_close(g, l, rtol=tol, atol=tol)


def test_a_pickled_or_copied_dora_model_works_and_rejoins_the_refresh(monkeypatch) -> None:
    """Whole-model torch.save and deepcopy keep working; a copy's layers join the one-call refresh at their next
    miss."""
    import copy
    import io

    from adapterkit.methods import dora as dora_method

    model = _dora_model(0).eval()
    want = logits(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    torch.testing.assert_close(logits(loaded), want, rtol=0, atol=0)
    twin = copy.deepcopy(model).train()
    monkeypatch.setattr(dora_method, "groupable", lambda m, a, b: True)
    monkeypatch.setattr(dora_method, "_live", weakref.WeakSet())
    q = twin.model.layers[0].self_attn.q_proj
    magnitude = q.lora_magnitude_vector["default"]
    assert magnitude._layer() is None
    with torch.no_grad():
        for p in ak.trainable_parameters(twin):
            p.mul_(1.5)
    twin(input_ids=input_ids())
    assert magnitude._layer() is q and magnitude in dora_method._live
    fresh = dora_method.dora_weight_norm(q.base_layer.weight, q.lora_A["default"].weight, q.lora_B["default"].weight,
                                         magnitude.record.scaling)
    torch.testing.assert_close(magnitude.norm(q), fresh, rtol=1e-6, atol=1e-6)
