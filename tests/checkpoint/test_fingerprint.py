"""The base fingerprint: recorded by `save` in the safetensors metadata, checked by `load(check_base=...)`.

Thresholds (checkpoint/fingerprint.py): a module is "identical" at relative difference <= 1%, "close" at correlation
>= 0.9 with RMS ratio in 0.8..1.25, else "different". The synthetic cases below pin where known transformations
land: bf16 cast (rel ~0.003), 4-bit absmax round trip (corr ~0.995), a delta of 30% of the weight (corr ~0.96),
a delta as large as the weight (corr ~0.7), an independent initialisation (corr ~0), a rescaled weight.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn

import adapterkit as ak
from adapterkit.checkpoint import fingerprint as F
from helpers import assert_unchanged, build, logits, perturb, snapshot, tiny_llama

CFG = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])


def _trained(model: nn.Module, **overrides) -> nn.Module:
    return ak.attach(model, ak.LoraConfig(**{**CFG, **overrides}))


def _metadata(folder) -> dict[str, str]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        return fh.metadata()


@torch.no_grad()
def fake_quant_4bit(model: nn.Module, group: int = 64) -> None:
    """Per-group absmax 4-bit round trip (levels -7..7) of every 2-D weight, in place."""
    for p in model.parameters():
        if p.dim() != 2 or p.numel() % group:
            continue
        g = p.reshape(-1, group).float()
        step = g.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7
        p.copy_(((g / step).round().clamp(-7, 7) * step).reshape(p.shape))


# -- what is recorded -------------------------------------------------------------------------------------------------
def test_save_records_fingerprint_as_json_strings(tmp_path):
    model = _trained(build("qwen2"), target_modules=["q_proj", "lm_head"])
    ak.save(model, tmp_path)
    meta = _metadata(tmp_path)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["format"] == "pt"
    fp = json.loads(meta[F.METADATA_KEY])
    assert fp["class"] == "Qwen2ForCausalLM"
    assert fp["config"]["model_type"] == "qwen2" and fp["config"]["num_hidden_layers"] == 2
    assert fp["config"]["vocab_size"] == 128 and fp["config"]["hidden_size"] == 32
    assert not {"torch_dtype", "dtype", "_name_or_path", "architectures"} & set(fp["config"])
    assert fp["embeddings"] == {"input": [128, 32], "output": [128, 32]}
    assert ["lm_head.weight", "model.embed_tokens.weight"] in fp["ties"]  # by tensor identity
    assert set(fp["modules"]) == {"lm_head", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert fp["modules"]["lm_head"]["shape"] == [128, 32]


def test_signature_describes_base_weight_not_copy_nor_merged(tmp_path):
    base = build("llama")
    model = _trained(build("llama"), modules_to_save=["lm_head"])
    perturb([p for n, p in model.named_parameters() if ".modules_to_save." in n], scale=1.0)
    ak.merge(model)  # LoRA folded into q/v; the fingerprint must still describe the unmerged base
    ak.save(model, tmp_path / "a")
    result = F.compare(F.from_metadata(_metadata(tmp_path / "a")), base)
    assert result.verdict == F.SAME, str(result)
    assert {m.status for m in result.modules} == {"identical"}
    assert "lm_head" in {m.path for m in result.modules}


def test_merged_without_original_still_signs_the_base(tmp_path):
    base = build("llama")
    model = _trained(build("llama"))
    ak.merge(model, keep_original=False)
    ak.save(model, tmp_path)
    result = F.compare(F.from_metadata(_metadata(tmp_path)), base)
    assert result.verdict == F.SAME, str(result)


def test_peft_ignores_fingerprint(tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained(build("llama"))
    expected = logits(model)
    ak.save(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path))
    torch.testing.assert_close(logits(theirs), expected)


# -- load outcomes ----------------------------------------------------------------------------------------------------
def test_same_base_loads(tmp_path):
    ak.save(_trained(build("llama")), tmp_path)
    report = ak.load(build("llama"), tmp_path)
    assert report.base_check == "same base"
    assert "same base" in str(report)


@pytest.mark.parametrize("variant", ["bf16", "fp16", "4bit", "4bit_group32"])
def test_cast_or_quantized_base_loads_without_complaint(tmp_path, variant):
    ak.save(_trained(build("llama", hidden=64)), tmp_path)
    target = build("llama", hidden=64)
    if variant in ("bf16", "fp16"):
        target.to(torch.bfloat16 if variant == "bf16" else torch.float16)
    else:
        fake_quant_4bit(target, group=32 if variant.endswith("32") else 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = ak.load(target, tmp_path)
    assert report.base_check == "same base"


def test_independent_base_is_refused_and_model_unchanged(tmp_path):
    ak.save(_trained(build("llama", seed=0)), tmp_path)
    other = build("llama", seed=1)
    before = snapshot(other)
    with pytest.raises(ak.AdapterLoadError) as err:
        ak.load(other, tmp_path)
    message = str(err.value)
    assert "trained on a different base (likely another revision or fine-tune)" in message
    assert "model.layers.0.self_attn.q_proj" in message
    assert "check_base='warn'" in message
    assert_unchanged(other, before)


def test_differently_trained_base_is_refused(tmp_path):
    ak.save(_trained(build("llama", hidden=64)), tmp_path)
    other = build("llama", hidden=64)
    perturb([p for p in other.parameters() if p.dim() == 2], scale=0.03)  # weights moved by ~their own size
    with pytest.raises(ak.AdapterLoadError, match="trained on a different base"):
        ak.load(other, tmp_path)


def test_check_base_warn_loads_with_warning_and_note(tmp_path):
    ak.save(_trained(build("llama", seed=0)), tmp_path)
    with pytest.warns(UserWarning, match="trained on a different base"):
        report = ak.load(build("llama", seed=1), tmp_path, check_base="warn")
    assert report.base_check.startswith("same architecture, different weights (")
    assert any("check_base='warn'" in n for n in report.notes)
    assert report.applied


def test_check_base_off_is_silent(tmp_path):
    ak.save(_trained(build("llama", seed=0)), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = ak.load(build("llama", seed=1), tmp_path, check_base="off")
    assert report.base_check.startswith("not verified")


def test_check_base_bad_value(tmp_path):
    ak.save(_trained(build("llama")), tmp_path)
    with pytest.raises(ak.AdapterLoadError, match="check_base must be one of"):
        ak.load(build("llama"), tmp_path, check_base="strict")


def test_tie_difference_is_a_weight_difference(tmp_path):
    ak.save(_trained(tiny_llama(tie=True)), tmp_path)
    with pytest.raises(ak.AdapterLoadError, match="tie lm_head.weight = model.embed_tokens.weight"):
        ak.load(tiny_llama(tie=False), tmp_path)


def test_peft_made_adapter_is_not_verified(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(**CFG))
    theirs.save_pretrained(str(tmp_path))
    assert F.METADATA_KEY not in (_metadata(tmp_path) or {})
    report = ak.load(build("llama"), tmp_path)
    assert report.base_check == "not verified (no fingerprint in file)"
    assert report.applied


# -- structure: an error whatever check_base says --------------------------------------------------------------------
@pytest.mark.parametrize("check_base", ["error", "warn", "off"])
def test_fewer_layers_names_absent_modules(tmp_path, check_base):
    ak.save(_trained(build("llama", layers=3)), tmp_path)
    small = build("llama", layers=2)
    before = snapshot(small)
    with pytest.raises(ak.AdapterLoadError) as err:
        ak.load(small, tmp_path, check_base=check_base)
    message = str(err.value)
    assert "another structure" in message
    assert "model.layers.2.self_attn.q_proj" in message and "model.layers.2.self_attn.v_proj" in message
    assert "num_hidden_layers" in message
    assert_unchanged(small, before)


def test_more_layers_names_the_extra_modules(tmp_path):
    ak.save(_trained(build("llama", layers=2)), tmp_path)
    with pytest.raises(ak.AdapterLoadError) as err:
        ak.load(build("llama", layers=3), tmp_path, check_base="off")
    assert "num_hidden_layers: adapter's base 2, this model 3" in str(err.value)
    assert "model.layers.2.self_attn.q_proj" in str(err.value)


def test_fused_qkv_names_modules(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    ak.save(_trained(build("llama")), tmp_path)
    fused = Phi3ForCausalLM(
        Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    )
    with pytest.raises(ak.AdapterLoadError) as err:
        ak.load(fused, tmp_path, check_base="off")
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert "model.layers.0.self_attn.qkv_proj" in message  # what this model has instead


def test_other_shapes_name_modules(tmp_path):
    ak.save(_trained(build("llama"), target_modules=["up_proj", "q_proj"]), tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = build("llama").config
    wider = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "intermediate_size": 96}))
    with pytest.raises(ak.AdapterLoadError) as err:
        ak.load(wider, tmp_path, check_base="warn")
    message = str(err.value)
    assert "model.layers.0.mlp.up_proj has shape [96, 32], the adapter's base had [64, 32]" in message
    assert "intermediate_size" in message


# -- compare() and its thresholds --------------------------------------------------------------------------------------
def _linear_stack(seed: int, heavy_tails: bool = False) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
    with torch.no_grad():
        for layer in model:
            w = torch.randn(layer.weight.shape, generator=gen) * 0.02
            if heavy_tails:  # student-t-like: a few large entries, as real LLM weights have
                w = w / (torch.rand(w.shape, generator=gen) + 0.05).sqrt()
            layer.weight.copy_(w)
    return model


def _check(fp: dict, model: nn.Module) -> list[F.ModuleCheck]:
    result = F.compare(fp, model)
    assert len(result.modules) == 2
    return result.modules


@pytest.mark.parametrize("heavy", [False, True])
def test_thresholds(heavy):
    model = _linear_stack(0, heavy)
    fp = F.compute(model, ["0", "1"])
    mods = _check(fp, model)
    assert all(m.status == "identical" and m.rel_diff < 1e-3 for m in mods)

    cast = _linear_stack(0, heavy).to(torch.bfloat16)
    assert all(m.status == "identical" and m.rel_diff < 0.006 for m in _check(fp, cast))

    quant = _linear_stack(0, heavy)
    fake_quant_4bit(quant, group=64)
    mods = _check(fp, quant)
    assert all(m.status == "close" and m.correlation > 0.98 for m in mods), mods

    def moved(scale):
        other = _linear_stack(0, heavy)
        with torch.no_grad():
            for layer in other:
                w = layer.weight
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(7)) * w.std() * scale)
        return _check(fp, other)

    assert all(m.status == "close" and 0.93 < m.correlation < 0.99 for m in moved(0.3))
    assert all(m.status == "different" and 0.6 < m.correlation < 0.8 for m in moved(1.0))

    independent = _check(fp, _linear_stack(1, heavy))
    assert all(m.status == "different" and abs(m.correlation) < 0.3 for m in independent)

    doubled = _linear_stack(0, heavy)
    with torch.no_grad():
        for layer in doubled:
            layer.weight.mul_(2)
    assert all(m.status == "different" and m.correlation > 0.999 and m.scale > 1.9 for m in _check(fp, doubled))


def test_compare_result_prints_per_module_lines():
    model = _linear_stack(0)
    result = F.compare(F.compute(model, ["0", "1"]), _linear_stack(1))
    assert result.verdict == F.DIFFERENT_WEIGHTS
    text = str(result)
    assert text.splitlines()[0].startswith("same architecture, different weights (2 of 2 modules differ")
    assert any(line.strip().startswith("0: different [corr") for line in text.splitlines())
    assert F.compare(None, model).describe() == "not verified (no fingerprint in file)"


def test_metadata_round_trip_and_garbage():
    fp = F.compute(_linear_stack(0), ["0"])
    assert F.from_metadata(F.to_metadata(fp)) == fp
    assert F.from_metadata({}) is None
    # Damaged is an error, not "no fingerprint": skipping it would silently turn the wrong-base check off.
    with pytest.raises(ak.AdapterLoadError, match="base_fingerprint.*not valid JSON"):
        F.from_metadata({F.METADATA_KEY: "{not json"})


def test_vocabulary_rows_only_are_left_to_vocab_handling():
    model = build("llama")
    fp = F.compute(model, ["model.embed_tokens", "lm_head"])
    model.resize_token_embeddings(136)
    result = F.compare(fp, model)
    assert result.verdict == F.SAME, str(result)
    assert any("vocabulary rows differ" in n for n in result.notes)


def test_weights_stored_quantized_are_not_compared():
    model = build("llama")
    fp = F.compute(model, ["model.layers.0.self_attn.q_proj"])
    packed = build("llama")
    layer = packed.model.layers[0].self_attn.q_proj
    del layer.weight
    layer.weight = nn.Parameter(torch.zeros(512, 1, dtype=torch.uint8), requires_grad=False)  # 4-bit packed storage
    result = F.compare(fp, packed)
    assert result.verdict == F.NOT_VERIFIED and result.modules[0].status == "unsigned"
    assert result.describe().startswith("not verified (no module weight could be compared")


@pytest.mark.slow
def test_thresholds_on_real_smollm2_weights(smollm2_dir):
    """Real weights have heavy tails; measured here: 4-bit absmax g64 corr >= 0.985, per-channel >= 0.968,
    bf16 rel diff <= 0.002, an untrained model of the same config |corr| <= 0.16."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    real = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    paths = [n for n, m in real.named_modules() if isinstance(m, nn.Linear)] + ["model.embed_tokens"]
    fp = F.compute(real, paths)
    quant = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    fake_quant_4bit(quant, group=64)
    result = F.compare(fp, quant)
    assert result.verdict == F.SAME and min(m.correlation for m in result.modules) > 0.95
    result = F.compare(fp, real.to(torch.bfloat16))
    assert result.verdict == F.SAME and {m.status for m in result.modules} == {"identical"}
    fresh = LlamaForCausalLM(real.config)
    result = F.compare(fp, fresh)
    assert result.verdict == F.DIFFERENT_WEIGHTS and max(abs(m.correlation) for m in result.modules) < 0.4
