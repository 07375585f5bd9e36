"""`adapterkit train --method`, `inspect`, `verify` and `merge` for methods other than LoRA (LoHa, LoKr), on the tiny
Llama of the CLI fixtures; and the generic config builder behind `--method`."""

from __future__ import annotations

import json

import dataclasses
from typing import ClassVar

import pytest
import torch

import adapterkit as ak
from adapterkit.config import AdapterConfig
from adapterkit.checkpoint import read_adapter
from adapterkit.cli.common import CliError
from adapterkit.cli.inspect import method_rows
from adapterkit.cli.train import config_for_method
from adapterkit.methods.base import AdapterWrapper
from helpers import build


@pytest.mark.parametrize("method, prefix, alpha_key", [("loha", "hada_", "alpha"), ("lokr", "lokr_", "alpha")])
def test_train_inspect_verify_merge(cli, tmp_path, tiny_model_dir, chat_data, method, prefix, alpha_key):
    out = tmp_path / method
    code, stdout, err = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", out, "--method", method,
                            "--max-steps", "3", "--batch-size", "4", "--r", "2", "--alpha", "4", "--lr", "1e-2",
                            "--targets", "q_proj,v_proj")
    assert code == 0, stdout + err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper() and cfg["r"] == 2 and cfg[alpha_key] == 4
    log = json.loads((out / "training.json").read_text())
    assert log["config"]["method"] == method and log["completed_steps"] == 3

    code, stdout, err = cli("inspect", out, "--tensors")
    assert code == 0, err
    assert f"{method.upper()} (r=2, alpha=4, scale=2" in stdout and "||ΔW|| total" in stdout and prefix in stdout

    code, stdout, err = cli("verify", out, "--model", tiny_model_dir)
    assert code == 0, stdout + err
    assert stdout.splitlines()[0].startswith("fits:")

    code, stdout, err = cli("merge", out, "--out", tmp_path / "merged", "--model", tiny_model_dir)
    assert code == 0, stdout + err
    assert "ok" in stdout.splitlines()[-1]


def test_inspect_norm_is_the_update_norm(tmp_path) -> None:
    for config in (ak.LoHaConfig(r=2, alpha=3, target_modules=["q_proj"], init_weights=False),
                   ak.LoKrConfig(r=1, alpha=3, target_modules=["q_proj"], init_weights=False, decompose_both=True)):
        model = ak.attach(build("llama"), config)
        ak.save(model, tmp_path / config.peft_type)
        _, cfg, tensors, _ = read_adapter(tmp_path / config.peft_type)
        rows = dict(method_rows(cfg, tensors))
        wrappers = [m for m in model.modules() if isinstance(m, AdapterWrapper)]
        total = float(torch.stack([w.delta_weight("default").norm() for w in wrappers]).norm())
        assert rows["||ΔW|| total"].startswith(f"{total:.4g} ")


def test_inspect_generic_fallback_for_a_method_without_summary() -> None:
    @dataclasses.dataclass
    class Plain(AdapterConfig):
        r: int = 3
        peft_type: str = "SOMETHING"
        PEFT_TYPE: ClassVar[str] = "SOMETHING"

    rows = method_rows(Plain(target_modules=["q_proj"]), {"k": torch.zeros(2, 3)})
    assert rows == [("method", "SOMETHING (r=3)")]


def test_config_for_method_maps_the_knobs() -> None:
    lora = config_for_method("lora", r=4, alpha=8, dropout=0.1, targets=["q_proj"])
    assert (type(lora), lora.r, lora.lora_alpha, lora.lora_dropout) == (ak.LoraConfig, 4, 8, 0.1)
    assert config_for_method("dora", r=4, alpha=8, dropout=0.0, targets=["q_proj"]).use_dora
    loha = config_for_method("loha", r=4, alpha=8, dropout=0.1, targets=["q_proj"], task_type="CAUSAL_LM")
    assert (type(loha), loha.alpha, loha.rank_dropout, loha.task_type) == (ak.LoHaConfig, 8, 0.1, "CAUSAL_LM")
    assert type(config_for_method("LoKr", r=4, alpha=8, dropout=0.0, targets=["q_proj"])) is ak.LoKrConfig


def test_config_for_method_refusals() -> None:
    with pytest.raises(CliError, match="unknown --method 'nope'; adapterkit implements: .*loha.*lokr.*lora"):
        config_for_method("nope", r=4, alpha=8, dropout=0.0, targets=["q_proj"])
    with pytest.raises(CliError, match=r"--method loha: LoHaConfig: rank_dropout must be in \[0, 1\)"):
        config_for_method("loha", r=4, alpha=8, dropout=1.5, targets=["q_proj"])


def test_train_add_tokens_needs_lora(cli, tmp_path, tiny_model_dir, chat_data):
    code, stdout, err = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", tmp_path / "x",
                            "--method", "loha", "--add-tokens", "<new>")
    assert code != 0
    assert "--add-tokens trains the new embedding rows with LoRA" in stdout + err
    assert not (tmp_path / "x").exists()
