"""`adapterkit train --method ia3|vera|oft` on the tiny model, then `inspect`, `verify` and `merge` on the result."""

from __future__ import annotations

import json

import pytest

METHODS = {
    "ia3": (["--lr", "3e-2"], "IA3 (", "ia3_l"),
    "vera": (["--r", "8", "--lr", "3e-2"], "VERA (r=8", "vera_lambda_b"),
    "oft": (["--r", "8", "--lr", "1e-2"], "OFT (r=0, oft_block_size=8", "oft_R.weight"),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_inspect_verify_merge(cli, tmp_path, tiny_model_dir, chat_data, method):
    extra, inspect_text, tensor_name = METHODS[method]
    out = tmp_path / "ad"
    code, text, err = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", out, "--max-steps", "3",
                          "--batch-size", "4", "--method", method, *extra)
    assert code == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper()
    log = json.loads((out / "training.json").read_text())
    assert log["config"]["method"] == method and log["completed_steps"] == 3

    code, text, err = cli("inspect", out, "--tensors")
    assert code == 0, err
    assert inspect_text in text and tensor_name in text
    assert "adapted modules" in text and "base_model (" not in text

    code, text, err = cli("verify", out)
    assert code == 0, text + err
    assert text.splitlines()[0].startswith("fits:")

    code, text, err = cli("merge", out, "--out", tmp_path / "merged")
    assert code == 0, err
    assert "ok" in text.splitlines()[-1]


def test_vera_inspect_lists_shared_projections_apart(cli, tmp_path, tiny_model_dir, chat_data):
    out = tmp_path / "ad"
    assert cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", out, "--max-steps", "1",
               "--method", "vera", "--r", "4", "--targets", "q_proj")[0] == 0
    code, text, _ = cli("inspect", out, "--tensors")
    assert code == 0
    line = next(t for t in text.splitlines() if t.startswith("adapted modules"))
    assert line.split()[2:] == ["2", "(q_proj)"]  # the shared projections are no module of their own
    assert "base_model.vera_A" in text
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    assert rows["trainable params"].split()[2] == f"{2 * (32 + 4)}"  # λ_b (32) + λ_d (4) per layer, 2 layers
    assert "shared (frozen)" in rows and "base_model.vera_B" in rows["shared (frozen)"]


def test_bad_method_options_refused(cli, tmp_path, tiny_model_dir, chat_data):
    common = ["train", "--model", tiny_model_dir, "--data", chat_data, "--out", tmp_path / "x", "--max-steps", "1"]
    code, _, err = cli(*common, "--method", "nosuch")
    assert code == 1 and "unknown --method 'nosuch'; adapterkit implements:" in err
    code, _, err = cli(*common, "--method", "ia3", "--layers", "0")
    assert code == 1 and "--layers is not an IA3 option" in err
    code, _, err = cli(*common, "--method", "oft", "--add-tokens", "<new>")
    assert code == 1 and "--add-tokens trains the new embedding rows" in err
    assert not (tmp_path / "x").exists()
