"""The verbs over a whole model: attach, set_active, disabled, delete, merge/unmerge/unload, training."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.methods.base import AdapterWrapper
from adapterkit.state import adapter_state
from helpers import assert_state_equal, assert_unchanged, build, input_ids, logits, snapshot

ATTN = ["q_proj", "v_proj"]


def test_attach_freezes_base_and_trains_only_adapters() -> None:
    model = build("llama")
    assert ak.attach(model, ak.LoraConfig(r=4, target_modules=ATTN)) is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    n_train, n_total = ak.count_parameters(model)
    # Per layer: q A (4, 32) + B (32, 4) = 256; v A (4, 32) + B (16, 4) = 192 (2 kv heads x head_dim 8); 2 layers.
    assert n_train == 2 * (256 + 192)
    assert n_total == n_train + sum(p.numel() for p in build("llama").parameters())
    assert n_train == sum(p.numel() for p in ak.trainable_parameters(model))


def test_modules_to_save_copies_are_trainable_and_original_frozen() -> None:
    model = ak.attach(build("llama"), ak.LoraConfig(target_modules=ATTN, modules_to_save=["lm_head"]))
    assert model.lm_head.modules_to_save["default"].weight.requires_grad
    assert not model.lm_head.base_layer.weight.requires_grad
    assert model.lm_head.modules_to_save["default"].weight is not model.lm_head.base_layer.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adapter_dtype_follows_base_unless_given(dtype) -> None:
    model = build("llama").to(dtype)
    ak.attach(model, ak.LoraConfig(target_modules=ATTN))
    assert {p.dtype for p in ak.trainable_parameters(model)} == {dtype}
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    ak.attach(model, ak.LoraConfig(target_modules=ATTN), name="wide", dtype=other)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A["wide"].weight.dtype == other and q.base_layer.weight.dtype == dtype
    ak.set_active(model, "wide")
    assert logits(model).isfinite().all()


def test_set_active_switches_and_disabled_gives_base_exactly() -> None:
    model = build("llama")
    base = logits(model)
    ak.attach(model, ak.LoraConfig(r=4, target_modules=ATTN, init_lora_weights=False))
    ak.attach(model, ak.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False), name="b")
    assert ak.active_adapters(model) == ("default",)
    out_a = logits(model)
    ak.set_active(model, "b")
    out_b = logits(model)
    assert not torch.allclose(out_a, out_b, atol=1e-4) and not torch.allclose(out_b, base, atol=1e-4)
    ak.set_active(model, "default")
    assert torch.equal(logits(model), out_a)
    with ak.disabled(model):
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), out_a)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".default." in n for n in trainable)  # the inactive adapter is frozen
    with pytest.raises(ak.ConfigError, match="nope"):
        ak.set_active(model, "nope")


def test_delete_restores_plain_modules() -> None:
    model = build("llama")
    before = snapshot(model)
    ak.attach(model, ak.LoraConfig(target_modules=ATTN, modules_to_save=["lm_head"]))
    ak.attach(model, ak.LoraConfig(target_modules=["q_proj", "o_proj"]), name="b")
    ak.delete(model, "default")
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdapterWrapper)  # still used by "b"
    assert not isinstance(model.model.layers[0].self_attn.v_proj, AdapterWrapper)
    assert not isinstance(model.lm_head, AdapterWrapper)
    ak.delete(model, "b")
    assert_unchanged(model, before)
    assert adapter_state(model) is None and ak.adapters(model) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_merge_unmerge_unload_bit_exact(arch, dtype) -> None:
    model = build(arch).to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    targets = "all-linear"
    ak.attach(model, ak.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    before = logits(model)
    ak.merge(model)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits(model), before, atol=tol, rtol=0)
    ak.unmerge(model)
    assert torch.equal(logits(model), before)
    for name, p in model.named_parameters():
        if ".base_layer." in name:
            plain = name.replace(".base_layer.", ".")
            assert torch.equal(p, original[plain]), name
    ak.unload(model)
    assert_state_equal(model.state_dict(), original)


def test_unload_merge_true_gives_a_plain_model_with_the_adapter_folded_in() -> None:
    model = build("llama")
    ak.attach(model, ak.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                    modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    expected = logits(model)
    ak.unload(model, merge=True)
    assert not any(isinstance(m, AdapterWrapper) for m in model.modules())
    assert set(model.state_dict()) == set(build("llama").state_dict())
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=0)


def test_training_steps_reduce_loss_and_change_only_adapters() -> None:
    torch.manual_seed(0)
    model = build("llama")
    ak.attach(model, ak.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(ak.trainable_parameters(model), lr=1e-2)
    ids = input_ids(batch=4, length=16)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".lora_B." in n or ".lora_A." in n), n


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_refuses_non_finite_delta_and_changes_nothing(bad) -> None:
    model = build("llama")
    ak.attach(model, ak.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_B["default"].weight[3, 1] = bad
    before = snapshot(model)
    with pytest.raises(ak.MergeError, match="layers.1.mlp.down_proj"):
        ak.merge(model)
    assert_unchanged(model, before)
    assert not any(w.merged_names for w in adapter_state(model).wrappers.values())
    with pytest.raises(ak.MergeError):
        ak.unload(model, merge=True)
    assert_unchanged(model, before)


def test_merge_on_tied_qwen2_with_lora_on_lm_head_keeps_the_embedding() -> None:
    model = build("qwen2")
    embedding = model.model.embed_tokens.weight
    embedding_values = embedding.detach().clone()
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    unmerged = logits(model)
    ak.merge(model)
    assert model.model.embed_tokens.weight is embedding
    assert torch.equal(embedding, embedding_values)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-4, rtol=0)
    ak.unmerge(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie restored
    assert torch.equal(logits(model), unmerged)


def test_attach_errors_leave_the_model_alone() -> None:
    model = build("llama")
    ak.attach(model, ak.LoraConfig(target_modules=ATTN))
    before = snapshot(model)
    with pytest.raises(ak.ConfigError, match="default"):
        ak.attach(model, ak.LoraConfig(target_modules=ATTN))
    with pytest.raises(ak.ConfigError, match="bad name"):
        ak.attach(model, ak.LoraConfig(target_modules=ATTN), name="bad name")
    with pytest.raises(ak.ConfigError, match="expected an adapter config"):
        ak.attach(model, {"r": 4}, name="dict")
    assert_unchanged(model, before)


def test_unload_merge_updates_untied_float32_weights_in_place_and_leaves_tied_embedding_alone():
    """unload(merge=True) keeps no original, so an untied fp32 weight is updated in place (no second copy of the
    model); a head tied to the embedding gets its own merged tensor and the embedding keeps the base values."""
    from helpers import tiny_qwen2

    model = tiny_qwen2().eval()
    ids = input_ids()
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    q_weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    q_before = q_weight.detach().clone()
    embedding_before = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = logits(model, ids)

    ak.unload(model, merge=True)

    assert model.model.layers[0].self_attn.q_proj.weight is q_weight  # same tensor, updated in place
    assert not torch.equal(q_weight, q_before)
    assert torch.equal(model.model.embed_tokens.weight, embedding_before)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("extra", [{}, {"modules_to_save": ["lm_head"]}], ids=["lora", "lora+copy"])
def test_attached_layers_take_the_models_mode(extra) -> None:
    model = build("llama").eval()
    ak.attach(model, ak.LoraConfig(target_modules=ATTN, lora_dropout=0.1, **extra))
    assert not any(m.training for m in model.modules())
    x = input_ids()
    assert torch.equal(logits(model, x), logits(model, x))  # eval: dropout is off
    model.train()
    assert all(m.training for m in model.modules())


def test_attach_refuses_what_is_not_a_module() -> None:
    with pytest.raises(ak.ConfigError, match="attach adapts a torch.nn.Module .*got str"):
        ak.attach("meta-llama/Llama-3.2-1B", ak.LoraConfig(r=4, target_modules=["q_proj"]))
