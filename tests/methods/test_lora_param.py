"""LoRA on bare parameters (`target_parameters`): fused MoE experts of tiny Qwen3-MoE ((E, out, in)) and gpt-oss
((E, in, out), `is_transposed`), both ways with PEFT, PEFT's pre-0.19.1 layout, merge / unmerge, training, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak
from adapterkit.checkpoint.format import adapter_tensors
from adapterkit.state import adapter_state
from helpers import assert_unchanged, input_ids, logits, perturb, snapshot

peft = pytest.importorskip("peft")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = dict(atol=1e-5, rtol=0)


def qwen3_moe(seed=0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64, decoder_sparse_step=1, mlp_only_layers=[])
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.ndim > 1 else p.add_(0.01)
    return model.eval()


def gpt_oss(seed=0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=64, layer_types=["full_attention"] * 2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = GptOssForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.ndim > 1 else p.add_(0.01)
    return model.eval()


BUILD = {"qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss}


def _kwargs(**extra):
    return {"r": 2, "lora_alpha": 4, "init_lora_weights": False, "target_modules": [], "target_parameters": EXPERTS,
            **extra}


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_peft_file_loads_with_same_logits(tmp_path, arch):
    theirs = peft.get_peft_model(BUILD[arch](), peft.LoraConfig(**_kwargs()))
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(BUILD[arch]()), atol=1e-3)  # the adapter changes the outputs
    theirs.save_pretrained(tmp_path)
    ours = BUILD[arch]()
    report = ak.load(ours, tmp_path)
    assert not report.missing and not report.unexpected
    assert any("0.19.1+ layout" in n for n in report.notes)
    torch.testing.assert_close(logits(ours), expected, **TOL)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_our_file_loads_in_peft_with_same_logits(tmp_path, arch):
    ours = ak.attach(BUILD[arch](), ak.LoraConfig(**_kwargs(target_modules=None, init_lora_weights=True)))
    perturb(ak.trainable_parameters(ours), scale=0.1)
    ak.save(ours, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys  # gate_up_proj, inner
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_parameters"] == EXPERTS
    theirs = peft.PeftModel.from_pretrained(BUILD[arch](), tmp_path)
    torch.testing.assert_close(logits(theirs), logits(ours), **TOL)


def test_same_init_layout_as_peft():
    torch.manual_seed(1)
    ours = ak.attach(qwen3_moe(), ak.LoraConfig(**_kwargs()))
    theirs = peft.get_peft_model(qwen3_moe(), peft.LoraConfig(**_kwargs()))
    mine = {k: v.shape for k, v in adapter_tensors(adapter_state(ours), "default").items()}
    ref = {k: v.shape for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert mine == ref


def _old_layout_file(src, dst, model):
    """Rewrite a 0.19.1+ file in the pre-0.19.1 layout: per expert A_old = B_newᵀ, B_old = A_newᵀ, which gives
    (B_old A_old)ᵀ = B_new A_new, and label it with an old peft_version."""
    tensors = load_file(src / "adapter_model.safetensors")
    out = {}
    for key, value in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        bkey = key.replace("lora_A", "lora_B")
        a, b = value, tensors[bkey]
        experts = 4
        r = a.shape[0] // experts
        a3 = a.reshape(experts, r, -1)  # (E, r, in)
        b3 = b.reshape(b.shape[0], r, experts).permute(2, 0, 1)  # (E, out, r)
        a_old = b3.transpose(1, 2).reshape(experts * r, -1)  # (E*r, out)
        b_old = a3.permute(2, 1, 0).reshape(a3.shape[2], r * experts)  # (in, r*E), column r_i*E + e
        out[key], out[bkey] = a_old.contiguous(), b_old.contiguous()
    dst.mkdir()
    save_file(out, dst / "adapter_model.safetensors")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["peft_version"] = "0.19.0"
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    del model


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_pre_0191_layout_loads_and_is_named(tmp_path, arch):
    theirs = peft.get_peft_model(BUILD[arch](), peft.LoraConfig(**_kwargs()))
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "new")
    _old_layout_file(tmp_path / "new", tmp_path / "old", theirs)
    ours = BUILD[arch]()
    report = ak.load(ours, tmp_path / "old")
    assert any("pre-0.19.1 layout" in n for n in report.notes)
    torch.testing.assert_close(logits(ours), expected, **TOL)


def test_merge_unmerge_and_training():
    model = ak.attach(qwen3_moe(), ak.LoraConfig(**_kwargs(target_modules=None, init_lora_weights=True)))
    experts = model.model.layers[0].mlp.experts.base_layer
    original = experts.gate_up_proj
    opt = torch.optim.AdamW(ak.trainable_parameters(model), lr=2e-2)
    ids = input_ids(4, 10)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    assert losses[-1] < losses[0] - 0.05
    before = logits(model)
    ak.merge(model)
    assert experts.gate_up_proj is not original
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    ak.unmerge(model)
    assert experts.gate_up_proj is original
    torch.testing.assert_close(logits(model), before, **TOL)
    with ak.disabled(model):
        torch.testing.assert_close(logits(model), logits(qwen3_moe()), **TOL)


def test_unmatched_parameter_is_refused():
    model = qwen3_moe()
    before = snapshot(model)
    with pytest.raises(ak.TargetError, match=r"target_parameters \['mlp.experts.up_proj'\] matched no parameter"):
        ak.attach(model, ak.LoraConfig(target_parameters=["mlp.experts.up_proj"], target_modules=[]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("extra, word", [({"lora_dropout": 0.1}, "lora_dropout"), ({"use_dora": True}, "use_dora"),
                                         ({"init_lora_weights": "pissa"}, "init_lora_weights")])
def test_unsupported_combinations_are_refused(extra, word):
    with pytest.raises(ak.ConfigError, match=f"target_parameters cannot be combined with {word}"):
        ak.LoraConfig(target_parameters=EXPERTS, **extra)


def test_module_and_parameter_targets_on_one_module_are_refused():
    from helpers import tiny_llama

    with pytest.raises(ak.TargetError, match="targeted both as a module and by target_parameters"):
        ak.attach(tiny_llama(), ak.LoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))


def test_a_second_adapter_must_target_the_same_parameters():
    model = ak.attach(qwen3_moe(), ak.LoraConfig(**_kwargs()))
    with pytest.raises(ak.ConfigError, match="every adapter must target the same parameters"):
        ak.attach(model, ak.LoraConfig(**_kwargs(target_parameters=["mlp.experts.down_proj"])), name="other")
