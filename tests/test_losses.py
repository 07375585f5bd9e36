"""The chunked output loss equals F.cross_entropy on the full logits, in value and in every gradient, for plain, tied,
LoRA/DoRA-adapted and trainable-token heads, with ignored labels and chunk sizes that do not divide the tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit import losses
from adapterkit.methods.trainable_tokens import TiedTokensHead
from helpers import VOCAB, build, input_ids, perturb

TOL = dict(atol=1e-6, rtol=1e-6)
CHUNKS = (1, 3, 5, 64)  # 13 tokens below: 3 and 5 leave a short last chunk, 64 is one chunk


def _labels(n: int, ignored=(0, 4, 5, 11), seed: int = 1) -> torch.Tensor:
    y = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    y[list(ignored)] = -100
    return y


def _grads(params) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def _compare(head: nn.Module, params: list[torch.Tensor], reduction: str = "mean") -> None:
    """Value and gradients (hidden states and `params`) of the chunked loss against the full-logits loss."""
    hidden = torch.randn(13, 32, requires_grad=True)
    labels = _labels(13)
    ref = F.cross_entropy(head(hidden).float(), labels, ignore_index=-100, reduction=reduction)
    ref.backward()
    expected = _grads([hidden, *params])
    for chunk in CHUNKS:
        loss = ak.chunked_loss(hidden, head, labels, chunk_size=chunk, reduction=reduction)
        torch.testing.assert_close(loss, ref, **TOL)
        loss.backward()
        for got, want in zip(_grads([hidden, *params]), expected):
            assert want.abs().sum() > 0
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_untied_head(reduction):
    model = build("llama")
    head = model.lm_head
    head.weight.requires_grad_(True)
    _compare(head, [head.weight], reduction)


def test_tied_head_gradient_reaches_the_shared_weight():
    model = build("qwen2")
    weight = model.model.embed_tokens.weight
    assert model.lm_head.weight is weight
    weight.requires_grad_(True)
    _compare(model.lm_head, [weight])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dora", [False, True])
def test_lora_and_dora_on_the_head(arch, dora):
    model = build(arch)
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False, use_dora=dora))
    params = ak.trainable_parameters(model)
    assert len(params) == (3 if dora else 2)
    _compare(model.get_output_embeddings(), params)


def test_trainable_token_rows_of_a_tied_head():
    model = build("qwen2")
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 17, 100]))
    assert isinstance(model.lm_head, TiedTokensHead)
    values = model.model.embed_tokens.trainable_tokens_delta["default"]
    perturb([values], scale=0.5)
    _compare(model.lm_head, [values])


def test_leading_dimensions_and_no_grad():
    model = build("llama")
    hidden = torch.randn(2, 6, 32)
    labels = torch.randint(0, VOCAB, (2, 6))
    ref = F.cross_entropy(model.lm_head(hidden).flatten(0, 1), labels.flatten())
    with torch.no_grad():
        torch.testing.assert_close(ak.chunked_loss(hidden, model.lm_head, labels, chunk_size=4), ref, **TOL)


def test_all_labels_ignored_is_nan_like_cross_entropy():
    model = build("llama")
    hidden = torch.randn(4, 32)
    labels = torch.full((4,), -100)
    assert torch.isnan(ak.chunked_loss(hidden, model.lm_head, labels))
    assert float(ak.chunked_loss(hidden, model.lm_head, labels, reduction="sum").detach()) == 0.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_causal_lm_loss_matches_the_models_own_loss(arch):
    model = build(arch)
    ak.attach(model, ak.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = input_ids(batch=2, length=9)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :3] = -100  # a masked prompt
    params = ak.trainable_parameters(model)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    expected = _grads(params)
    for only_labelled in (True, False):
        loss = ak.causal_lm_loss(model, ids, mask, labels, chunk_size=5, only_labelled=only_labelled)
        torch.testing.assert_close(loss, ref, **TOL)
        loss.backward()
        for got, want in zip(_grads(params), expected):
            torch.testing.assert_close(got, want, **TOL)


def test_causal_lm_loss_defaults_labels_to_the_inputs():
    model = build("llama")
    ids = input_ids(batch=1, length=8)
    with torch.no_grad():
        torch.testing.assert_close(ak.causal_lm_loss(model, ids), model(input_ids=ids, labels=ids).loss, **TOL)


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="none"), "reduction must be 'mean' or 'sum'"),
    (dict(backend="fast"), "backend must be one of"),
    (dict(chunk_size=0), "chunk_size must be at least 1"),
])
def test_bad_arguments(kwargs, message):
    model = build("llama")
    with pytest.raises(ak.ConfigError, match=message):
        ak.chunked_loss(torch.randn(3, 32), model.lm_head, torch.zeros(3, dtype=torch.long), **kwargs)


def test_shape_mismatch_names_both_shapes():
    model = build("llama")
    with pytest.raises(ak.ConfigError, match=r"\(2, 4, 32\) do not match labels \(2, 5\)"):
        ak.chunked_loss(torch.randn(2, 4, 32), model.lm_head, torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("ids, labels, message", [
    (input_ids().float(), None, r"input_ids must be an integer tensor of shape \(batch, sequence\), got "
                                r"torch.float32 of shape \(2, 7\)"),
    (input_ids()[0], None, r"input_ids must be .* got torch.int64 of shape \(7,\)"),
    (input_ids(), input_ids()[:, :3], r"labels \(2, 3\) must have the shape of input_ids \(2, 7\)"),
    (input_ids(), [[1, 2]], r"labels must be an integer tensor .* got list"),
])
def test_causal_lm_loss_names_a_bad_batch(ids, labels, message):
    with pytest.raises(ak.ConfigError, match=message):
        ak.causal_lm_loss(build("llama"), ids, labels=labels)


def test_liger_backend_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(losses, "_liger", False)
    head = nn.Linear(32, VOCAB, bias=False)
    # On CPU the fused kernel never applies, so "liger" only fails where it would be used; check the CUDA decision.
    assert not losses._uses_liger(head, torch.randn(2, 32), "auto")
    fake_cuda = torch.randn(2, 32)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(ak.ConfigError, match="needs the liger-kernel package"):
        losses._uses_liger(head, fake_cuda, "liger")
    assert not losses._uses_liger(head, fake_cuda, "auto")


def test_adapted_head_never_takes_the_fused_kernel(monkeypatch):
    monkeypatch.setattr(losses, "_liger", lambda *a, **k: None)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    model = build("llama")
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["lm_head"]))
    assert not losses._uses_liger(model.lm_head, torch.randn(2, 32), "auto")
    assert losses._uses_liger(nn.Linear(32, VOCAB), torch.randn(2, 32), "auto")


def test_model_without_a_plain_head_is_refused():
    class NoHead(nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ak.ConfigError, match="NoHead: the chunked loss needs a causal LM"):
        ak.causal_lm_loss(NoHead(), input_ids())


def test_cli_refuses_a_zero_loss_chunk(capsys, tmp_path):
    from adapterkit.cli.main import main

    assert main(["train", "--out", str(tmp_path / "o"), "--loss-chunk", "0"]) != 0
    assert not (tmp_path / "o").exists()
    assert "--loss-chunk must be at least 1, got 0" in " ".join(capsys.readouterr().err.split())


def test_causal_lm_loss_never_builds_more_than_a_chunk_of_logits():
    model = build("llama")
    shapes = []
    model.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    ids = input_ids(batch=2, length=9)
    ak.causal_lm_loss(model, ids, chunk_size=5)
    logits = [s for s in shapes if s[-1] == VOCAB]
    assert logits == [(5, VOCAB)] * 3 + [(1, VOCAB)]  # 16 targets: 5 + 5 + 5 + 1
    assert "forward" not in model.lm_head.__dict__  # the bypass is gone


def test_head_bypass_restores_an_instance_forward():
    head = nn.Linear(4, 6)
    mine = head.forward
    head.forward = mine
    with losses.head_bypassed(head):
        assert head(torch.ones(2, 4)).shape == (2, 4)
    assert head.forward is mine and head(torch.ones(2, 4)).shape == (2, 6)


def _trainer_run(tmp_path, mixin: bool, accumulate: int):
    from transformers import Trainer, TrainingArguments, default_data_collator

    from adapterkit.integrations.trainer import ChunkedLossMixin

    class ChunkedTrainer(ChunkedLossMixin, Trainer):
        loss_chunk_size = 3

    model = build("llama")
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    gen = torch.Generator().manual_seed(2)
    rows = []
    for i in range(8):
        ids = torch.randint(0, VOCAB, (7,), generator=gen)
        labels = ids.clone()
        labels[: 1 + i % 4] = -100  # unequal label counts: the accumulation must weight tokens
        rows.append({"input_ids": ids, "attention_mask": torch.ones(7, dtype=torch.long), "labels": labels})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulate, learning_rate=0.5, optim="sgd", report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
                             dataloader_drop_last=True)
    cls = ChunkedTrainer if mixin else Trainer
    trainer = cls(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
    trainer.train()
    return [p.detach().clone() for p in ak.trainable_parameters(model)]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_mixin_trains_like_the_trainers_own_loss(tmp_path, accumulate):
    want = _trainer_run(tmp_path / "plain", False, accumulate)
    got = _trainer_run(tmp_path / "chunked", True, accumulate)
    assert any(w.abs().sum() > 0 for w in want)  # SGD: the step is proportional to the loss scale
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
