"""AdaLoRA on bitsandbytes 4-bit (NF4, FP4) and 8-bit bases: outputs of the dequantized float model, training and
rank allocation in step with PEFT's on the same quantized model, rank_pattern files both ways, exact reload,
requantizing merge with a bit-exact unmerge, unload to plain layers, the CLI, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.methods.adalora import AdaLoraLinear
from adapterkit.state import adapter_state
from bnb_cases import (KINDS, TOLERANCE, assert_packed_equal, assert_reloads_exactly, copy_values, float_twin,
                       logits, packed_state, quantized, without_cpu_repack)
from helpers import train_with

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

MARK = ("lora_A", "lora_B", "lora_E")
KW = dict(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=12, lora_alpha=8,
          target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
TOL = dict(atol=1e-5, rtol=0)  # PEFT scales by alpha, then divides by ranknum; adapterkit multiplies once


def adalora(**kwargs) -> ak.AdaLoraConfig:
    return ak.AdaLoraConfig(**{**KW, "init_lora_weights": False, **kwargs})  # random A, E, B: a non-zero adapter


def attach_ours(model: nn.Module, **kwargs) -> nn.Module:
    """A, E, B drawn N(0, 1), then A and B scaled to 0.1: a delta about as large as the base weights."""
    torch.manual_seed(1)
    ak.attach(model, adalora(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.mul_(0.1)
    return model


def attached(kind: str, **kwargs) -> nn.Module:
    return attach_ours(quantized("llama", kind), **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_match_the_dequantized_float_model(kind):
    model = quantized("llama", kind)
    logits(model)  # an eval forward first: bitsandbytes repacks 4-bit weights on this CPU
    twin = float_twin("llama", model)
    attach_ours(model)
    attach_ours(twin)
    assert copy_values(model, twin, MARK) == 18
    assert isinstance(model.model.layers[0].mlp.down_proj, AdaLoraLinear)
    got = logits(model)
    assert (got - logits(twin)).abs().max() < TOLERANCE[kind]
    assert (got - logits(quantized("llama", kind))).abs().max() > 20 * TOLERANCE[kind]  # the adapter matters


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_training_and_allocation_follow_peft_and_files_go_both_ways(kind, tmp_path):
    ours = attached(kind)
    theirs = peft.get_peft_model(without_cpu_repack(quantized("llama", kind)), peft.AdaLoraConfig(**KW))
    assert copy_values(ours, theirs, MARK) == 18
    assert type(theirs.base_model.model.model.layers[0].mlp.down_proj).__name__.startswith("SVDLinear")
    allocator = ak.RankAllocator(ours)
    our_losses = train_with(ours, allocator.step)
    their_losses = train_with(theirs, theirs.base_model.update_and_allocate)
    assert our_losses == pytest.approx(their_losses, abs=1e-4) and our_losses[-1] < our_losses[0]
    pattern = ak.adapters(ours)["default"].rank_pattern
    assert pattern == {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    ranks = allocator.ranks()
    assert sum(ranks.values()) == KW["target_r"] * 6 and max(ranks.values()) < KW["init_r"]
    torch.testing.assert_close(logits(ours), logits(theirs), **TOL)

    ak.save(ours, tmp_path / "ours")  # pruned triplets dropped, the masks in rank_pattern
    back = peft.PeftModel.from_pretrained(without_cpu_repack(quantized("llama", kind)), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back), logits(ours), **TOL)
    theirs.save_pretrained(tmp_path / "theirs")
    fresh = without_cpu_repack(quantized("llama", kind))
    report = ak.load(fresh, tmp_path / "theirs")
    assert report.ok and not report.missing and not report.unexpected
    torch.testing.assert_close(logits(fresh), logits(theirs), **TOL)
    assert {p: w.lora_A["default"].shape[0] for p, w in adapter_state(fresh).wrappers.items()} == ranks


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_on_a_fresh_quantized_model_is_exact(kind, tmp_path):
    assert_reloads_exactly(attached(kind), quantized("llama", kind), tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_and_unmerge_restores_the_packed_weights(kind):
    model = attached(kind)
    want = logits(model)
    before = packed_state(model)
    report = ak.merge(model)
    assert len(report.requantization) == 6 and 0 < report.max_rel_error < 0.2
    assert (logits(model) - want).abs().max() < (0.5 if kind != "int8" else 0.05)  # requantization noise only
    path = "model.layers.0.self_attn.q_proj.base_layer"
    assert not torch.equal(packed_state(model)[path][1], before[path][1])
    ak.unmerge(model)
    assert_packed_equal(before, packed_state(model))
    assert torch.equal(logits(model), want)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_unload_merge_to_bf16_gives_plain_linear_layers(kind):
    model = quantized("llama", kind)
    twin = float_twin("llama", model)
    attach_ours(model)
    attach_ours(twin)
    copy_values(model, twin, MARK)
    want = logits(twin)
    out = ak.unload(model, merge=True, dtype=torch.bfloat16)
    linears = [m for m in out.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
    assert not ak.adapters(out) and not any("lora_" in n for n, _ in out.named_parameters())
    assert (logits(out) - want).abs().max() < 0.05  # bf16 rounding of the merged float32 weights


# -- refusals ----------------------------------------------------------------------------------------------------
def test_nan_refused_on_merge_and_save_with_the_model_untouched(tmp_path):
    model = attached("nf4")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_E["default"][2, 0] = float("nan")
    before = packed_state(model)
    with pytest.raises(ak.MergeError, match="non-finite.*down_proj"):
        ak.merge(model)
    assert_packed_equal(before, packed_state(model))
    with pytest.raises(ak.AdapterSaveError, match="non-finite"):
        ak.save(model, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_unquantized_bitsandbytes_layer_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(64, 64, quant_type="nf4")  # never moved to a device: still float

    net = Net()
    with pytest.raises(ak.TargetError, match="not quantized yet"):
        ak.attach(net, adalora(target_modules=["proj"]))
    assert type(net.proj) is bnb.nn.Linear4bit and not ak.adapters(net)


# -- command line ------------------------------------------------------------------------------------------------
def test_cli_train_adalora_on_an_nf4_base(tmp_path, capsys):
    from cli.conftest import build_model_dir, write_chat_data

    from adapterkit.cli.main import main

    base = build_model_dir(tmp_path / "base", hidden=64)
    data = write_chat_data(tmp_path / "chat.jsonl")
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(base), "--data", str(data), "--out", str(out), "--method", "adalora",
                 "--quantize", "nf4", "--max-steps", "10", "--r", "4", "--target-r", "2", "--batch-size", "4",
                 "--lr", "1e-2", "--targets", "q_proj,v_proj"]) == 0
    assert "quant  nf4" in capsys.readouterr().out
    log = json.loads((out / "training.json").read_text())
    assert log["config"]["quantize"] == "nf4" and sum(log["config"]["adalora_ranks"].values()) == 2 * 4
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
