"""LoraConfig: PEFT's field names and defaults, JSON round trip, unknown keys kept, unsupported features refused."""

from __future__ import annotations

import json
import math

import pytest

import adapterkit as ak
from adapterkit import LoraConfig

peft = pytest.importorskip("peft")


def test_defaults_match_peft() -> None:
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
                 "use_dora", "layers_to_transform", "layers_pattern", "modules_to_save", "target_modules"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rank_pattern == {} and ours.alpha_pattern == {}


def test_scaling() -> None:
    # alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023); values by hand.
    assert LoraConfig(r=16, lora_alpha=32).scaling_for("x.q_proj") == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling_for("x.q_proj") == 8.0
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 4})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert cfg.rank_for("model.layers.0.self_attn.xq_proj") == 8  # the key is a whole path component
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 8.0  # 16 / 2
    assert cfg.scaling_for("model.layers.1.self_attn.v_proj") == 0.5  # 4 / 8
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == 2.0
    assert math.isclose(LoraConfig(r=8, lora_alpha=8, use_rslora=True).scaling_for("a"), 8 / math.sqrt(8))


def test_json_round_trip_and_peft_reads_it(tmp_path) -> None:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                     rank_pattern={"q_proj": 2}, modules_to_save=["lm_head"])
    cfg.save(tmp_path)
    back = LoraConfig.from_file(tmp_path / "adapter_config.json")
    assert back == cfg
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert theirs.r == 4 and theirs.rank_pattern == {"q_proj": 2} and set(theirs.modules_to_save) == {"lm_head"}


def test_reads_peft_written_json(tmp_path) -> None:
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True).save_pretrained(tmp_path)
    cfg = LoraConfig.from_file(tmp_path / "adapter_config.json")
    assert cfg.r == 4 and cfg.use_rslora and cfg.target_modules == ["q_proj"]
    assert cfg.unknown_keys == {}, f"a key PEFT 0.21 writes is unknown to adapterkit: {cfg.unknown_keys}"


def test_unknown_future_keys_are_kept(tmp_path) -> None:
    data = LoraConfig(target_modules=["q_proj"]).to_dict() | {"shiny_new_option": 3}
    cfg = LoraConfig.from_dict(data)
    assert cfg.unknown_keys == {"shiny_new_option": 3}
    assert cfg.to_dict()["shiny_new_option"] == 3  # written back unchanged


@pytest.mark.parametrize("key, value", [("use_qalora", True), ("loftq_config", {"loftq_bits": 4}),
                                        ("layer_replication", [[0, 2]]), ("lora_bias", True)])
def test_unsupported_feature_in_json_is_refused(key, value) -> None:
    data = LoraConfig(target_modules=["q_proj"]).to_dict() | {key: value}
    with pytest.raises(ak.ConfigError, match=key):
        LoraConfig.from_dict(data)


@pytest.mark.parametrize("kwargs, named", [
    ({"lora_bias": True}, "lora_bias"), ({"r": 0}, "r must"), ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"bias": "all"}, "bias"), ({"init_lora_weights": "corda"}, "init_lora_weights"),
    ({"layers_pattern": "layers"}, "layers_pattern"), ({"peft_type": "IA3"}, "peft_type"),
])
def test_invalid_values_are_refused(kwargs, named) -> None:
    with pytest.raises(ak.ConfigError, match=named):
        LoraConfig(**kwargs)


def test_bad_json_names_the_file(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ak.ConfigError, match="adapter_config.json"):
        LoraConfig.from_file(tmp_path / "adapter_config.json")
    with pytest.raises(ak.ConfigError, match="IA3"):
        LoraConfig.from_dict(json.loads('{"peft_type": "IA3"}'))
