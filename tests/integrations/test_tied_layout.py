"""The tied modules_to_save file (one stored copy, the other key an empty alias marker): every consumer loads it
correctly or refuses loudly; none keeps an untrained copy silently."""

from __future__ import annotations

import pytest
from helpers import logits, perturb, tiny_qwen2

import adapterkit as ak

TOL = 1e-5


def trained():
    model = tiny_qwen2()
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    perturb([p for n, p in model.named_parameters() if "modules_to_save" in n], scale=0.3)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = trained()
    root = tmp_path_factory.mktemp("tied")
    ak.save(model, root / "once")
    ak.save(model, root / "peft", peft_compatible=True)
    return root, logits(model)


def test_transformers_load_adapter_refuses_the_default_file(saved):
    root, _ = saved
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        tiny_qwen2().load_adapter(str(root / "once"))


def test_peft_refuses_the_default_file(saved):
    from peft import PeftModel

    root, _ = saved
    with pytest.raises(RuntimeError, match=r"size mismatch for base_model\.model\.lm_head\.modules_to_save"):
        PeftModel.from_pretrained(tiny_qwen2(), str(root / "once"))


def test_every_consumer_loads_the_peft_compatible_file(saved):
    from peft import PeftModel

    root, want = saved
    model = tiny_qwen2()
    model.load_adapter(str(root / "peft"))
    assert (logits(model) - want).abs().max().item() <= TOL
    assert (logits(PeftModel.from_pretrained(tiny_qwen2(), str(root / "peft"))) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["once", "peft"])
def test_adapterkit_loads_both_layouts_with_the_tie(saved, layout):
    root, want = saved
    model = tiny_qwen2()
    assert ak.load(model, root / layout).ok
    assert (logits(model) - want).abs().max().item() <= TOL
    assert model.model.embed_tokens.modules_to_save["default"].weight is model.lm_head.modules_to_save["default"].weight


def test_the_default_file_stores_the_tensor_once(saved):
    root, _ = saved
    once = (root / "once" / "adapter_model.safetensors").stat().st_size
    twice = (root / "peft" / "adapter_model.safetensors").stat().st_size
    table = 128 * 32 * 4  # one (vocab, hidden) float32 table
    assert twice - once >= table * 0.99, f"{once} vs {twice} bytes: the marker must not hold a copy"
