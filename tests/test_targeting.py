"""Target matching follows PEFT: the set of wrapped modules equals the set PEFT wraps for the same config."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.state import adapter_state
from adapterkit.targeting import expand_targets, target_matcher
from helpers import assert_unchanged, build, snapshot

peft = pytest.importorskip("peft")

CONFIGS = [
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"target_modules": ["model.layers.0.self_attn.q_proj"]}),  # an exact path
    ("llama", {"target_modules": r".*layers\.1\.mlp\..*_proj"}),  # regex fullmatch
    ("llama", {"target_modules": "all-linear"}),  # lm_head excluded
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["k_proj", "down_proj"]}),
    ("llama", {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}),
    ("llama", {"target_modules": ["q_proj"], "layers_to_transform": 1}),
    ("llama", {"target_modules": ["embed_tokens", "lm_head"]}),
    ("llama", {"target_modules": ["q_proj", "k_proj"], "exclude_modules": r".*\.0\..*"}),
    ("gpt2", {"target_modules": "all-linear"}),  # Conv1D layers count as linear
    ("gpt2", {"target_modules": ["c_attn", "wte"], "layers_to_transform": [1], "layers_pattern": "h"}),
    ("opt", {"target_modules": "all-linear"}),
    ("qwen2", {"target_modules": "all-linear"}),
    ("qwen2", {"target_modules": ["q_proj", "lm_head"]}),
]


def _peft_targets(model, kwargs) -> set[str]:
    from peft.tuners.lora import LoraLayer

    pm = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("arch, kwargs", CONFIGS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CONFIGS)])
def test_same_targets_as_peft(arch, kwargs) -> None:
    model = ak.attach(build(arch), ak.LoraConfig(**kwargs))
    ours = set(adapter_state(model).wrappers)
    assert ours == _peft_targets(build(arch), kwargs)


def test_list_is_exact_or_dot_suffix() -> None:
    cfg = ak.LoraConfig(target_modules=["q_proj", "model.norm"])
    assert target_matcher(cfg)("model.layers.0.self_attn.q_proj")
    assert target_matcher(cfg)("q_proj")
    assert not target_matcher(cfg)("model.layers.0.self_attn.xq_proj")
    assert target_matcher(cfg)("model.norm")
    assert not target_matcher(cfg)("model.layers.0.q_proj.inner")


def test_string_is_regex_fullmatch() -> None:
    cfg = ak.LoraConfig(target_modules="q_proj")
    assert not target_matcher(cfg)("model.layers.0.self_attn.q_proj")  # fullmatch, not search
    assert target_matcher(ak.LoraConfig(target_modules=r".*q_proj"))("model.layers.0.self_attn.q_proj")


def test_all_linear_is_expanded_and_skips_the_head() -> None:
    cfg = expand_targets(build("llama"), ak.LoraConfig(target_modules="all-linear"))
    assert isinstance(cfg.target_modules, list)
    assert "lm_head" not in cfg.target_modules
    assert "model.layers.1.mlp.down_proj" in cfg.target_modules
    assert len(cfg.target_modules) == 2 * 7


def test_default_targets_by_model_type() -> None:
    model = ak.attach(build("llama"), ak.LoraConfig())
    assert sorted({p.rsplit(".", 1)[-1] for p in adapter_state(model).wrappers}) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("target", [["nonexistent_proj"], r".*\.nope", ["q_proj_typo"]])
def test_no_match_names_patterns_and_existing_modules(target) -> None:
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ak.TargetError) as info:
        ak.attach(model, ak.LoraConfig(target_modules=target))
    msg = str(info.value)
    assert (target[0] if isinstance(target, list) else target).replace("\\", "\\\\") in msg or str(target) in msg
    assert "q_proj" in msg and "down_proj" in msg  # existing names are suggested
    assert_unchanged(model, before)
    assert adapter_state(model) is None


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(exclude_modules=["q_proj"]), r"exclude_modules=\['q_proj'\] leaves none of them\."),
    (dict(layers_to_transform=[99]), r"layers_to_transform=\[99\] leaves none of them\."),
    (dict(modules_to_save=["q_proj"]), r"modules_to_save=\['q_proj'\] leaves none of them \(a module in "
                                       r"modules_to_save is trained as a full copy"),
])
def test_targets_that_a_filter_removes_name_the_filter(kwargs, culprit) -> None:
    """target_modules matches, then exclude_modules / layers_to_transform / modules_to_save take every match away:
    the error says which, instead of claiming that nothing matched."""
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ak.TargetError, match=r"target_modules=\['q_proj'\] matches 2 module\(s\) \(e\.g\. "
                                             r"model\.layers\.0\.self_attn\.q_proj\), but " + culprit):
        ak.attach(model, ak.LoraConfig(target_modules=["q_proj"], **kwargs))
    assert_unchanged(model, before)


def test_unsupported_layer_type_is_refused() -> None:
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ak.TargetError, match="LlamaRMSNorm"):
        ak.attach(model, ak.LoraConfig(target_modules=["input_layernorm"]))
    assert_unchanged(model, before)


def test_modules_to_save_that_matches_nothing() -> None:
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ak.TargetError, match="classifier"):
        ak.attach(model, ak.LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))
    assert_unchanged(model, before)
    assert not any(p.requires_grad is False for p in model.parameters())


def test_targeted_modules_are_wrapped_in_place() -> None:
    model = build("llama")
    q = model.model.layers[0].self_attn.q_proj
    ak.attach(model, ak.LoraConfig(target_modules=["q_proj"]))
    wrapper = model.model.layers[0].self_attn.q_proj
    assert wrapper.base_layer is q
    factor = wrapper.lora_A["default"]
    assert factor.weight.shape == (8, q.in_features) and (factor.in_features, factor.out_features) == (q.in_features, 8)
    # A factor is not an nn.Linear: scans of the model for linear layers (quantizers, "all-linear") must skip it.
    assert not isinstance(factor, torch.nn.Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in wrapper.lora_B.modules())


def test_exact_name_bypasses_the_layer_filter() -> None:
    # PEFT: a module named exactly in target_modules is targeted whatever layers_to_transform says (lm_head has no
    # layer index); suffix matches are filtered by layer.
    kwargs = {"target_modules": ["q_proj", "lm_head"], "layers_to_transform": [1], "layers_pattern": "layers"}
    model = ak.attach(build("llama"), ak.LoraConfig(**kwargs))
    ours = set(adapter_state(model).wrappers)
    assert ours == {"lm_head", "model.layers.1.self_attn.q_proj"}
    assert ours == _peft_targets(build("llama"), kwargs)


def test_all_linear_honours_layers_to_transform():
    """PEFT expands all-linear to full paths and then skips the layer filter for them; adapterkit filters while
    expanding, so only the chosen layers get adapters and the saved list reloads identically in PEFT."""
    import adapterkit as ak
    from helpers import tiny_llama

    model = tiny_llama()
    ak.attach(model, ak.LoraConfig(r=2, target_modules="all-linear", layers_to_transform=[1]))
    adapted = [name for name, m in model.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(".layers.1." in name for name in adapted)
    saved = ak.adapters(model)["default"].target_modules
    assert saved and all(".layers.1." in name for name in saved)
