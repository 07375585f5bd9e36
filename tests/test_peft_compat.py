"""Both directions against the real `peft` package: PEFT-made adapters load in adapterkit, ours load in PEFT.

Each case builds the same tiny model (same seed) several times, makes a non-trivial adapter (init_lora_weights=False,
modules_to_save copies perturbed) on one side, saves, loads on the other side and compares fp32 logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import adapterkit as ak
from adapterkit.state import adapter_state
from helpers import assert_state_equal, build, input_ids, logits, perturb

peft = pytest.importorskip("peft")

ARCHS = ["gpt2", "llama", "opt", "qwen2"]
ATTN = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}
EMBED = {"gpt2": "wte", "llama": "embed_tokens", "opt": "embed_tokens", "qwen2": "embed_tokens"}
LAYERS = {"gpt2": "h", "llama": "layers", "opt": "layers", "qwen2": "layers"}
# A module trained as a full copy (suffix rule: "norm" also matches every *_layernorm in Llama/Qwen2).
SAVE = {"gpt2": ["ln_f"], "llama": ["lm_head"], "opt": ["final_layer_norm"], "qwen2": ["norm"]}
REGEX = {
    "gpt2": r".*\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)",
    "llama": r".*\.layers\.\d+\.(self_attn\.(q|k)_proj|mlp\.up_proj)",
    "opt": r".*\.layers\.\d+\.(self_attn\.out_proj|fc1)",
    "qwen2": r".*\.layers\.\d+\.(self_attn\.(q|o)_proj|mlp\.down_proj)",
}


def case_kwargs(arch: str, case: str) -> dict:
    """PEFT LoraConfig kwargs (the same names adapterkit takes) for one named case."""
    base = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ATTN[arch]}
    first = ATTN[arch][0]
    extra = {
        "attn": {},
        "all_linear_rslora": {"target_modules": "all-linear", "use_rslora": True, "r": 8, "lora_alpha": 16},
        "patterns": {"rank_pattern": {first: 2}, "alpha_pattern": {first: 3.0}, "r": 6},
        "regex": {"target_modules": REGEX[arch]},
        "modules_to_save": {"modules_to_save": SAVE[arch]},
        "embedding": {"target_modules": [EMBED[arch], first]},
        "dropout": {"lora_dropout": 0.2},
        "layers": {"layers_to_transform": [1], "layers_pattern": LAYERS[arch]},
        "exclude": {"target_modules": "all-linear", "exclude_modules": [first, "fc2" if arch == "opt" else "zz"]},
    }[case]
    return {**base, **extra}


CASES = ["attn", "all_linear_rslora", "patterns", "regex", "modules_to_save", "embedding", "dropout", "layers", "exclude"]


def _perturb_copies(model: torch.nn.Module) -> None:
    perturb([p for n, p in model.named_parameters() if ".modules_to_save." in n])


def _file_shapes(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_both_directions(arch: str, case: str, tmp_path) -> None:
    kwargs = case_kwargs(arch, case)
    ids = input_ids()

    # PEFT -> adapterkit
    peft_model = peft.get_peft_model(build(arch), peft.LoraConfig(**kwargs))
    _perturb_copies(peft_model)
    peft_model.eval()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = build(arch)
    report = ak.load(ours, tmp_path / "peft")
    assert not report.missing and not report.unexpected and not report.refused
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=0)

    # adapterkit -> PEFT
    model = build(arch)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ak.attach(model, ak.LoraConfig(**kwargs))
    _perturb_copies(model)
    model.eval()
    ours_logits = logits(model, ids)
    assert not torch.allclose(ours_logits, logits(build(arch), ids), atol=1e-4), "adapter is a no-op"
    ak.save(model, tmp_path / "ak")
    loaded = peft.PeftModel.from_pretrained(build(arch), tmp_path / "ak").eval()
    torch.testing.assert_close(logits(loaded, ids), ours_logits, atol=1e-5, rtol=0)
    peft.LoraConfig.from_pretrained(tmp_path / "ak")  # our JSON is a valid PEFT config

    # File format parity: the same tensor names and shapes as PEFT writes, minus PEFT's base-weight bloat.
    ours_shapes = _file_shapes(tmp_path / "ak")
    peft_model2 = peft.get_peft_model(build(arch), peft.LoraConfig(**kwargs))
    peft_model2.save_pretrained(tmp_path / "peft2")
    peft_shapes = _file_shapes(tmp_path / "peft2")
    base_names = {f"base_model.model.{n}" for n, _ in build(arch).named_parameters()}
    base_names |= {n.replace(".weight", ".base_layer.weight") for n in base_names}
    if case == "embedding":
        peft_shapes = {k: v for k, v in peft_shapes.items() if k not in base_names}
    assert not (set(ours_shapes) & base_names - {f"base_model.model.{m}" for m in _copy_keys(model)})
    assert ours_shapes == peft_shapes

    # Merge, unmerge, unload.
    ak.merge(model)
    torch.testing.assert_close(logits(model, ids), ours_logits, atol=1e-4, rtol=0)
    ak.unmerge(model)
    assert torch.equal(logits(model, ids), ours_logits)
    ak.unload(model)
    assert_state_equal(model.state_dict(), original)
    assert not any(p.requires_grad is False for p in model.parameters())


def _copy_keys(model: torch.nn.Module) -> set[str]:
    """Plain-model parameter names of the modules_to_save copies (saved under the module's own key, as PEFT does)."""
    state = adapter_state(model)
    out = set()
    for path, wrapper in state.wrappers.items():
        if wrapper.method == "modules_to_save":
            out |= {f"{path}.{k}" for k in wrapper.base_layer.state_dict()}
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropout_active_in_train_mode(arch: str) -> None:
    base = build(arch)
    for m in base.modules():  # silence the base model's own dropout: only the adapter's may randomise
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model = ak.attach(base, ak.LoraConfig(**case_kwargs(arch, "dropout")))
    ids = input_ids()
    a = logits(model, ids)  # eval mode (the model was in eval when attached): deterministic
    assert torch.equal(a, logits(model, ids))
    model.train()
    b, c = logits(model, ids), logits(model, ids)
    assert not torch.allclose(b, c, atol=1e-5)
    with ak.disabled(model):
        assert torch.equal(logits(model, ids), logits(model, ids))


def _two_adapter_kwargs(arch: str) -> tuple[dict, dict]:
    first = case_kwargs(arch, "attn")
    second = {**case_kwargs(arch, "all_linear_rslora"), "r": 2, "lora_alpha": 5}
    return first, second


@pytest.mark.parametrize("arch", ARCHS)
def test_two_named_adapters(arch: str, tmp_path) -> None:
    kw1, kw2 = _two_adapter_kwargs(arch)
    ids = input_ids()

    # adapterkit -> PEFT: "default" at the top level, "other" in a sub-folder.
    model = build(arch)
    ak.attach(model, ak.LoraConfig(**kw1))
    ak.attach(model, ak.LoraConfig(**kw2), name="other")
    model.eval()
    ours = {}
    for name in ("default", "other"):
        ak.set_active(model, name)
        ours[name] = logits(model, ids)
    assert not torch.allclose(ours["default"], ours["other"], atol=1e-4)
    ak.save(model, tmp_path / "ak")
    assert (tmp_path / "ak" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ak" / "other" / "adapter_model.safetensors").is_file()
    pm = peft.PeftModel.from_pretrained(build(arch), tmp_path / "ak")
    pm.load_adapter(tmp_path / "ak" / "other", adapter_name="other")
    pm.eval()
    for name in ("default", "other"):
        pm.set_adapter(name)
        torch.testing.assert_close(logits(pm, ids), ours[name], atol=1e-5, rtol=0)

    # PEFT -> adapterkit: PEFT's own two-adapter layout.
    pm = peft.get_peft_model(build(arch), peft.LoraConfig(**kw1))
    pm.add_adapter("other", peft.LoraConfig(**kw2))
    pm.eval()
    theirs = {}
    for name in ("default", "other"):
        pm.set_adapter(name)
        theirs[name] = logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "other" / "adapter_config.json").is_file()
    model = build(arch)
    ak.load(model, tmp_path / "peft")
    ak.load(model, tmp_path / "peft", name="other")
    for name in ("default", "other"):
        ak.set_active(model, name)
        torch.testing.assert_close(logits(model, ids), theirs[name], atol=1e-5, rtol=0)


def test_config_json_round_trips_through_peft(tmp_path) -> None:
    model = ak.attach(build("llama"), ak.LoraConfig(**case_kwargs("llama", "patterns"), lora_dropout=0.1))
    ak.save(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg = peft.LoraConfig.from_pretrained(tmp_path)
    assert cfg.r == data["r"] == 6
    assert cfg.rank_pattern == {"q_proj": 2} and cfg.alpha_pattern == {"q_proj": 3.0}
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert cfg.lora_dropout == 0.1
