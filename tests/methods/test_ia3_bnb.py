"""(IA)³ on bitsandbytes 4-bit (NF4, FP4) and 8-bit bases: outputs of the dequantized float model, PEFT's
float32 arithmetic for other input dtypes, files both ways with PEFT on the same quantized model, exact reload,
requantizing merge with a bit-exact unmerge (biases too), unload to plain layers, training, the CLI, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.methods.ia3_bnb import IA3BnbLinear
from adapterkit.quantized import quantized_view
from adapterkit.state import adapter_state
from bnb_cases import (KINDS, TOLERANCE, assert_packed_equal, assert_reloads_exactly,
                       assert_unquantized_layers_refused, copy_values, float_twin, logits, packed_state, quantized,
                       set_values, without_cpu_repack)
from helpers import build, input_ids

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

MARK = ("ia3_l",)
# OPT: biases everywhere; output scaling on attention and fc1, input scaling on fc2.
OPT = {"target_modules": ["k_proj", "v_proj", "fc1", "fc2"], "feedforward_modules": ["fc2"]}


def ia3(**kwargs) -> ak.IA3Config:
    return ak.IA3Config(**{**OPT, **kwargs})


def attach_ours(model: nn.Module, cfg: ak.IA3Config | None = None, **kwargs) -> nn.Module:
    ak.attach(model, cfg or ia3(), **kwargs)
    set_values(model, MARK)  # 1 + 0.5 N(0, 1): far from the identity init
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_match_the_dequantized_float_model(kind):
    model = quantized("opt", kind)
    logits(model)  # an eval forward first: bitsandbytes repacks 4-bit weights on this CPU
    twin = float_twin("opt", model)
    attach_ours(model)
    attach_ours(twin)
    wrapper = model.model.decoder.layers[0].fc2
    assert isinstance(wrapper, IA3BnbLinear) and wrapper.ia3_l["default"].shape == (1, 128)  # input scaling
    assert model.model.decoder.layers[0].self_attn.k_proj.ia3_l["default"].shape == (64, 1)
    got = logits(model)
    assert (got - logits(twin)).abs().max() < TOLERANCE[kind]
    assert (got - logits(quantized("opt", kind))).abs().max() > 20 * TOLERANCE[kind]  # the vectors matter


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_other_input_dtypes_compute_in_float32_as_peft_does(kind):
    """PEFT feeds the quantized layer float32 and leaves its result in float32; ours is that result, rounded once to
    the input's dtype (PEFT's float32 output would break the next bf16 layer)."""
    ours = quantized("llama", kind, compute_dtype=torch.bfloat16)
    ak.attach(ours, ak.IA3Config(), dtype=torch.float32)  # PEFT keeps (IA)³ vectors in float32
    theirs = peft.get_peft_model(without_cpu_repack(quantized("llama", kind, compute_dtype=torch.bfloat16)),
                                 peft.IA3Config()).eval()
    set_values(theirs, MARK)
    assert copy_values(theirs, ours, MARK) == 6
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    for path, width in (("mlp.down_proj", 128), ("self_attn.k_proj", 64)):  # input and output scaling
        mine = ours.model.layers[1].get_submodule(path)
        peft_layer = theirs.base_model.model.model.layers[1].get_submodule(path)
        h = x[..., :width]
        with torch.no_grad():
            got, want = mine(h), peft_layer(h)
        assert want.dtype == torch.float32 and got.dtype == torch.bfloat16
        assert torch.equal(got, want.to(torch.bfloat16)), path
        with torch.no_grad():
            assert not torch.equal(got, mine.base_layer(h))  # the vector is applied


@pytest.mark.parametrize("arch, kind", [("opt", "nf4"), ("opt", "int8"), ("llama", "fp4")])
def test_files_interchange_with_peft_on_the_same_quantized_model(arch, kind, tmp_path):
    # PEFT's per-model defaults on Llama (k_proj, v_proj, down_proj feed-forward); explicit targets on OPT.
    kwargs = OPT if arch == "opt" else {}
    theirs = peft.get_peft_model(without_cpu_repack(quantized(arch, kind)), peft.IA3Config(**kwargs)).eval()
    set_values(theirs, MARK)
    want = logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = without_cpu_repack(quantized(arch, kind))  # its layers PEFT does not target run as in `theirs`
    report = ak.load(loaded, tmp_path / "peft")
    assert report.ok and not report.missing and not report.unexpected
    assert isinstance(loaded.get_submodule(next(iter(adapter_state(loaded).wrappers))), IA3BnbLinear)
    assert torch.equal(logits(loaded), want)

    ours = attach_ours(without_cpu_repack(quantized(arch, kind)), ak.IA3Config(**kwargs))
    ak.save(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(without_cpu_repack(quantized(arch, kind)), tmp_path / "ours").eval()
    assert torch.equal(logits(back), logits(ours))
    assert (want - logits(quantized(arch, kind))).abs().max() > 0.1  # a non-trivial adapter


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_on_a_fresh_quantized_model_is_exact(kind, tmp_path):
    assert_reloads_exactly(attach_ours(quantized("opt", kind)), quantized("opt", kind), tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_and_unmerge_restores_packed_weights_and_biases(kind):
    model = attach_ours(quantized("opt", kind))
    want = logits(model)
    before = packed_state(model)
    report = ak.merge(model)
    assert len(report.requantization) == 8 and 0 < report.max_rel_error < 0.2
    assert (logits(model) - want).abs().max() < (0.5 if kind != "int8" else 0.05)  # requantization noise only
    merged = packed_state(model)
    k_proj = "model.decoder.layers.0.self_attn.k_proj.base_layer"
    assert not torch.equal(merged[k_proj][1], before[k_proj][1])
    assert not torch.equal(merged[k_proj][3], before[k_proj][3])  # output scaling scales the bias
    fc2 = "model.decoder.layers.0.fc2.base_layer"
    assert torch.equal(merged[fc2][3], before[fc2][3])  # input scaling leaves it
    ak.unmerge(model)
    assert_packed_equal(before, packed_state(model))
    assert torch.equal(logits(model), want)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_unload_merge_to_bf16_gives_plain_linear_layers(kind):
    model = quantized("opt", kind)
    twin = attach_ours(float_twin("opt", model))
    attach_ours(model)
    want = logits(twin)
    out = ak.unload(model, merge=True, dtype=torch.bfloat16)
    linears = [m for m in out.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
    assert not ak.adapters(out) and not any("ia3_l" in n for n, _ in out.named_parameters())
    assert (logits(out) - want).abs().max() < 0.05  # bf16 rounding of the merged float32 weights
    float_merged = ak.unload(twin, merge=True, dtype=torch.float32)
    for path in ("model.decoder.layers.1.fc2", "model.decoder.layers.1.self_attn.v_proj"):
        a, b = out.get_submodule(path), float_merged.get_submodule(path)
        assert torch.allclose(a.weight.float(), b.weight, atol=1e-2) and torch.allclose(a.bias.float(), b.bias, atol=1e-2)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_training_after_eval_passes_matches_the_float_gradients(kind):
    """PEFT's Llama defaults adapt k_proj, v_proj and down_proj only: the gradients of the lower layers' vectors pass
    through the unadapted q_proj, o_proj, gate_proj and up_proj, which an eval forward on this CPU would repack into
    a layout without a backward (before or after attach)."""
    model = quantized("llama", kind)
    logits(model)
    twin = float_twin("llama", model)
    for m in (model, twin):
        attach_ours(m, ak.IA3Config())
        logits(m)
    ids = input_ids()
    for m in (model, twin):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert len(grads) == 6
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert (p.grad - grads[name]).norm() / grads[name].norm() < (0.02 if kind != "int8" else 0.1), name


# -- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_nan_vector_refused_on_merge_and_save_with_the_model_untouched(kind, tmp_path):
    model = attach_ours(quantized("opt", kind))
    with torch.no_grad():
        model.model.decoder.layers[1].fc2.ia3_l["default"][0, 3] = float("nan")
    before = packed_state(model)
    with pytest.raises(ak.MergeError, match="non-finite.*fc2"):
        ak.merge(model)
    assert_packed_equal(before, packed_state(model))
    assert not any(w.merged_names for w in adapter_state(model).wrappers.values())
    with pytest.raises(ak.AdapterSaveError, match="non-finite"):
        ak.save(model, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_merge_overflowing_the_int8_source_dtype_is_refused():
    model = attach_ours(quantized("opt", "int8"))
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.ia3_l["default"].fill_(1e7)
    before = packed_state(model)
    with pytest.raises(ak.MergeError, match=r"overflows torch.float16.*dtype=torch.float32"):
        ak.merge(model)
    assert_packed_equal(before, packed_state(model))


def test_unquantized_bitsandbytes_layers_are_refused():
    assert_unquantized_layers_refused(ak.IA3Config(target_modules=["proj"], feedforward_modules=["proj"]))


def test_file_of_another_width_is_refused_on_the_quantized_model(tmp_path):
    ak.save(attach_ours(quantized("opt", "nf4")), tmp_path)
    other = ak.quantize_model(build("opt", hidden=96), "nf4", compute_dtype=torch.float32)
    with pytest.raises(ak.AdapterLoadError, match="k_proj"):
        ak.load(other, tmp_path)
    assert not ak.adapters(other) and quantized_view(other.model.decoder.layers[0].self_attn.k_proj) is not None


# -- command line ------------------------------------------------------------------------------------------------
def test_cli_train_ia3_on_an_nf4_base(tmp_path, capsys):
    from cli.conftest import build_model_dir, write_chat_data

    from adapterkit.cli.main import main

    base = build_model_dir(tmp_path / "base", hidden=64)
    data = write_chat_data(tmp_path / "chat.jsonl")
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "3",
                 "--batch-size", "4", "--lr", "3e-2", "--method", "ia3", "--quantize", "nf4"]) == 0
    assert "quant  nf4" in capsys.readouterr().out
    log = json.loads((out / "training.json").read_text())
    assert log["config"]["method"] == "ia3" and log["config"]["quantize"] == "nf4" and log["completed_steps"] == 3
    assert log["eval_after"] < log["eval_before"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "IA3"
