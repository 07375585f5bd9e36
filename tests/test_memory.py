"""Per-layer checkpointing and offload give the gradients of the plain run (frozen input embedding included), keep
the model's structure, undo cleanly, and offload exactly what they claim to; the saved-tensor meter counts storages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit import memory
from helpers import build, input_ids

TOL = dict(atol=1e-6, rtol=1e-6)
MODES = [dict(), dict(offload=True), dict(offload=1), dict(offload=True, recompute=False)]


def _adapted(arch: str, dropout: float = 0.0) -> nn.Module:
    model = build(arch)
    ak.attach(model, ak.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout))
    return model.train()


def _step_grads(model: nn.Module, seed: int = 0) -> list[torch.Tensor]:
    ids = input_ids(batch=2, length=9)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss  # use_cache stays at the config's default (True)
    loss.backward()
    params = ak.trainable_parameters(model)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return [loss.detach(), *grads]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("mode", MODES, ids=["recompute", "recompute+offload", "recompute+offload-first", "offload"])
def test_gradients_equal_the_plain_run_with_a_frozen_embedding(arch, mode):
    model = _adapted(arch, dropout=0.1)  # dropout: the recompute must replay the same masks
    assert not model.get_input_embeddings().weight.requires_grad
    plain = _step_grads(model)
    with ak.checkpointed(model, **mode):
        wrapped = _step_grads(model)
    for got, want in zip(wrapped, plain):
        torch.testing.assert_close(got, want, **TOL)
    assert all(g.abs().sum() > 0 for g in plain[1:])


def test_structure_and_state_dict_are_untouched_and_undo_restores_the_forward():
    model = _adapted("llama")
    keys = list(model.state_dict())
    layers = ak.decoder_layers(model)
    assert layers == list(model.model.layers)
    ak.checkpoint_layers(model)
    assert list(model.state_dict()) == keys
    assert all("forward" in layer.__dict__ for layer in layers)
    ak.checkpoint_layers(model, offload=True)  # reconfigures, does not wrap twice
    assert layers[0].__dict__[memory._STATE][1] is True
    assert layers[0].__dict__[memory._STATE][0].__func__ is type(layers[0]).forward
    ak.uncheckpoint_layers(model)
    assert not any("forward" in layer.__dict__ or memory._STATE in layer.__dict__ for layer in layers)


def test_an_instance_forward_installed_before_is_kept_and_restored():
    model = _adapted("llama")
    layer = model.model.layers[0]
    calls = []
    original = layer.forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.forward = spy
    with ak.checkpointed(model):
        _step_grads(model)
    assert len(calls) == 2  # forward, then the recompute in backward
    assert layer.forward is spy


def test_inference_runs_the_layers_as_they_are():
    model = build("llama")
    ids = input_ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with ak.checkpointed(model):
            out = model(input_ids=ids, use_cache=True)
    assert torch.equal(out.logits, ref)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == ids.shape[1]


def test_offload_with_recompute_keeps_only_the_layer_inputs(monkeypatch):
    """What goes through the offload hooks is each layer's hidden-state input (and the position ids),
    not the activations inside the layer."""
    model = _adapted("llama")
    packed = []

    def counting(pin_memory):
        return torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting)
    ids = input_ids(batch=2, length=9)
    with ak.checkpointed(model, offload=True):
        model(input_ids=ids, labels=ids).loss.backward()
    hidden = (2, 9, 32)
    assert packed.count(hidden) == len(model.model.layers)
    assert set(packed) == {hidden, (1, 9)}, packed  # plus position ids; the rotary (cos, sin) come as a tuple

    packed.clear()
    with ak.checkpointed(model, offload=True, recompute=False):
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(packed) > 10 * len(model.model.layers)  # every activation the layers keep


def test_offloading_the_first_layers_only(monkeypatch):
    """offload=N sends the first N layers' checkpoints to host memory and keeps the others on the device."""
    model = _adapted("llama")
    n_layers = len(model.model.layers)
    assert n_layers >= 2
    calls = []

    def counting(pin_memory):
        calls.append(1)
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting)
    ids = input_ids(batch=2, length=9)
    for n in (0, 1, n_layers):
        calls.clear()
        with ak.checkpointed(model, offload=n):
            model(input_ids=ids, labels=ids).loss.backward()
        assert len(calls) == n  # one offload scope per offloaded layer's forward


def test_bad_offload_values_are_refused():
    model = _adapted("llama")
    n_layers = len(model.model.layers)
    with pytest.raises(ak.ConfigError, match=f"has {n_layers} decoder layers"):
        ak.checkpoint_layers(model, offload=n_layers + 1)
    with pytest.raises(ak.ConfigError, match="a number of layers"):
        ak.checkpoint_layers(model, offload=-1)
    with pytest.raises(ak.ConfigError, match="a number of layers"):
        ak.checkpoint_layers(model, offload=0.5)
    with pytest.raises(ak.ConfigError, match="offloads every layer's activations"):
        ak.checkpoint_layers(model, offload=1, recompute=False)
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)  # refused before any change


def test_checkpointing_keeps_fewer_bytes():
    model = _adapted("llama")
    ids = input_ids(batch=2, length=9)
    params = list(model.parameters())
    with memory.SavedTensorMeter(exclude=params) as plain:
        model(input_ids=ids, labels=ids).loss
    with ak.checkpointed(model), memory.SavedTensorMeter(exclude=params) as ckpt:
        model(input_ids=ids, labels=ids).loss
    assert 0 < ckpt.bytes < plain.bytes / 3


def test_meter_counts_a_shared_storage_once():
    x = torch.randn(4, 8, requires_grad=True)
    w1, w2 = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    with memory.SavedTensorMeter() as meter:
        _ = (x @ w1).sum() + (x.view(2, 16).view(4, 8) @ w2).sum()
    assert (meter.saves, meter.storages, meter.bytes) == (4, 3, 4 * 8 * 4 + 2 * 8 * 3 * 4)  # x once, w1, w2


def test_layers_are_found_generically():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([Block() for _ in range(3)])
            self.heads = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])  # mixed classes: not repeated blocks

    net = Net()
    assert ak.decoder_layers(net) == list(net.blocks)


def test_no_layers_is_a_clear_error_and_the_model_is_untouched():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ak.ConfigError, match="Sequential: found no decoder layers"):
        ak.checkpoint_layers(net)
    assert "forward" not in net[0].__dict__


def test_recompute_off_without_offload_is_refused():
    with pytest.raises(ak.ConfigError, match="recompute=False\\) only makes sense with offload=True"):
        ak.checkpoint_layers(build("llama"), recompute=False)


def _examples(n: int = 6) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        ids = torch.randint(1, 128, (6 + i,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})  # a masked prompt of 3 tokens
    return out


def test_train_options_give_the_plain_training_run():
    """`adapterkit train`'s loop with the chunked loss, checkpointing and offload ends with the plain run's adapter."""
    from adapterkit.train import TrainConfig, train

    results = []
    for opts in (dict(), dict(loss_chunk=4, checkpoint=True, offload=True), dict(loss_chunk=3, offload=True),
                 dict(checkpoint=True, offload=1)):
        model = build("llama", tie=True)
        ak.attach(model, ak.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
        cfg = TrainConfig(max_steps=3, batch_size=3, warmup_steps=1, lr=1e-2, **opts)
        result = train(model, _examples(), _examples(2), cfg)
        assert not any("forward" in layer.__dict__ for layer in model.model.layers)  # unwrapped afterwards
        results.append((result, [p.detach().clone() for p in ak.trainable_parameters(model)]))
    (plain, want), *others = results
    for result, got in others:
        assert result.eval_after == pytest.approx(plain.eval_after, rel=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_long_context_bench_small_run():
    """bench/long_context.py --small: each option moves the longest trainable length the way it should."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "long_context.py"
    spec = importlib.util.spec_from_file_location("long_context", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {r["config"]: r for r in bench.main(["--small", "--only", "ak", "ak+ckpt", "ak+chunk+ckpt+offload"])}
    assert rows["ak"]["longest"] < rows["ak+ckpt"]["longest"] < rows["ak+chunk+ckpt+offload"]["longest"]
    assert rows["ak+chunk+ckpt+offload"]["loss"] == "chunked"
    (sub,) = bench.main(["--small", "--subprocess", "--only", "ak+chunk+ckpt"])  # the GPU run's path
    assert sub["config"] == "ak+chunk+ckpt" and sub["longest"] > rows["ak"]["longest"], sub


@pytest.mark.parametrize("argv, message", [
    (["--offload-layers", "1"], "--offload-layers offloads the checkpointed layers' inputs: add --checkpoint"),
    (["--checkpoint", "--offload-layers", "-1"], "--offload-layers must be 0 or more, got -1"),
])
def test_cli_offload_layers_bad_values(argv, message, capsys, tmp_path):
    from adapterkit.cli.main import main

    assert main(["train", "--out", str(tmp_path / "o"), *argv]) != 0
    assert not (tmp_path / "o").exists()
    assert message in " ".join(capsys.readouterr().err.split())
