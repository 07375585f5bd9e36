"""The `adapterkit` sub-commands on a tiny Llama model: what each writes and prints."""

from __future__ import annotations

import json
import re

import pytest
import torch

import adapterkit as ak


@pytest.mark.parametrize("command", ["train", "generate", "inspect", "verify", "merge"])
def test_help(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0
    assert "Usage" in out


def test_train_writes_adapter_plot_and_log(trained_adapter):
    names = {p.name for p in trained_adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "loss.png", "training.json"} <= names
    log = json.loads((trained_adapter / "training.json").read_text())
    assert log["completed_steps"] == 4 and not log["interrupted"]
    assert log["eval_before"] is not None and log["eval_after"] is not None
    assert len(log["steps"]) == 4 and all(s["loss"] > 0 for s in log["steps"])
    cfg = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted({t.rsplit(".", 1)[-1] for t in cfg["target_modules"]}) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # all-linear, head excluded


def test_train_is_deterministic_and_accumulates(cli, tmp_path, tiny_model_dir, chat_data):
    from safetensors.torch import load_file

    common = ["train", "--model", tiny_model_dir, "--data", chat_data, "--max-steps", "2", "--r", "2",
              "--targets", "q_proj,v_proj", "--seed", "3"]
    assert cli(*common, "--out", tmp_path / "a", "--batch-size", "4")[0] == 0
    assert cli(*common, "--out", tmp_path / "b", "--batch-size", "4")[0] == 0
    assert cli(*common, "--out", tmp_path / "c", "--batch-size", "2", "--grad-accum", "2")[0] == 0
    a, b, c = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "abc")
    assert a.keys() == b.keys() == c.keys() and len(a) == 2 * 2 * 2
    for key in a:
        assert torch.equal(a[key], b[key])
        # Two micro-batches of 2 see the same 4 examples as one batch of 4, weighted per token: same update.
        torch.testing.assert_close(a[key], c[key], rtol=1e-4, atol=1e-6)


def test_train_interrupt_saves_last_completed_step(cli, tmp_path, tiny_model_dir, chat_data, monkeypatch):
    import adapterkit.train as T

    real = T._lr_at

    def interrupt_at_third(step, cfg, elapsed=0.0):
        if step == 2:
            raise KeyboardInterrupt
        return real(step, cfg, elapsed)

    monkeypatch.setattr(T, "_lr_at", interrupt_at_third)
    out = tmp_path / "ad"
    code, text, _ = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", out, "--max-steps", "10",
                        "--r", "2")
    assert code == 0
    assert "interrupted" in text
    log = json.loads((out / "training.json").read_text())
    assert log["interrupted"] and log["completed_steps"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert ak.load(model, out).ok


def test_train_text_and_prompt_completion_data(cli, tmp_path, tiny_model_dir):
    text = tmp_path / "notes.txt"
    text.write_text("The kettle is blue.\n\nIt costs 89 euros.\n", encoding="utf-8")
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "Colour: ", "completion": "blue"}) + "\n"
                  + json.dumps({"prompt": "Price: ", "completion": "89"}) + "\n", encoding="utf-8")
    for data in (text, pc):
        code, _, err = cli("train", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / data.stem,
                           "--max-steps", "1", "--r", "2")
        assert code == 0, err


def test_train_max_time_stops_early(cli, tmp_path, tiny_model_dir, chat_data):
    out = tmp_path / "ad"
    code, text, _ = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", out, "--max-steps", "1000",
                        "--max-time", "0.01", "--r", "2")
    assert code == 0
    log = json.loads((out / "training.json").read_text())
    assert log["stopped_by_time"] and 1 <= log["completed_steps"] < 1000
    assert "time budget" in text


def test_generate_and_compare(cli, trained_adapter, tiny_model_dir):
    code, out, err = cli("generate", "--model", tiny_model_dir, "--max-new-tokens", "4", "Hello?", "What is fact 1?")
    assert code == 0, err
    assert "> Hello?" in out and "> What is fact 1?" in out
    # The adapter records its base directory: no --model needed.
    code, out, err = cli("generate", "--adapter", trained_adapter, "--compare", "--max-new-tokens", "4", "Hi")
    assert code == 0, err
    assert "base:" in out and "adapter:" in out


def test_inspect_reports_and_plots(cli, trained_adapter, tmp_path):
    plot = tmp_path / "heat.png"
    code, out, err = cli("inspect", trained_adapter, "--plot", plot, "--tensors")
    assert code == 0, err
    for word in ("LORA (r=4, alpha=8", "trainable params", "file size", "base fingerprint", "||ΔW|| total",
                 "lora_A.weight"):
        assert word in out
    assert plot.is_file() and plot.stat().st_size > 1000


def _rewrite_weights(folder, change) -> None:
    """Rewrite an adapter's tensors through `change(tensors)`, keeping the file's metadata (a hand-edited file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_inspect_names_pairs_that_do_not_fit_and_reports_the_rest(cli, trained_adapter, tmp_path):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(trained_adapter, folder)
    keys = []

    def shrink_one_b(tensors):
        keys.extend(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
        tensors[keys[0]] = tensors[keys[0]][:, :2].contiguous()  # rank 2 against its A's rank 4

    _rewrite_weights(folder, shrink_one_b)
    code, out, err = cli("inspect", folder)
    assert code == 0, err
    module = keys[0].removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    assert "unreadable" in out and f"1 module(s) left out of ||ΔW||: {module}: A 4x" in out
    assert re.search(rf"{re.escape(module)}: A 4x\d+, B \d+x2 do not fit together \(A is \(r, in\)", out)
    assert "||ΔW|| total" in out  # the other pairs still counted


def test_inspect_of_a_loha_file_missing_a_tensor(cli, tmp_path):
    from helpers import build

    folder = tmp_path / "loha"
    ak.save(ak.attach(build("llama"), ak.LoHaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)),
            folder)
    dropped = []

    def drop_one(tensors):
        dropped.append(sorted(k for k in tensors if k.endswith("hada_w1_b"))[0])
        del tensors[dropped[0]]

    _rewrite_weights(folder, drop_one)
    code, out, err = cli("inspect", folder)
    assert code == 0, err
    module = dropped[0].removeprefix("base_model.model.").rsplit(".", 1)[0]
    assert f"1 module(s) left out of ||ΔW||: {module}: no hada_w1_b tensor" in out


def test_delta_norm_matches_dense_product():
    from adapterkit.cli.inspect import delta_norm

    a, b = torch.randn(4, 20), torch.randn(30, 4)
    assert delta_norm(a, b, 0.5) == pytest.approx(float((0.5 * b @ a).norm()), rel=1e-6)


def test_verify_fits(cli, trained_adapter):
    code, out, err = cli("verify", trained_adapter)
    assert code == 0, out + err
    assert out.splitlines()[0].startswith("fits:")


def test_verify_other_base_does_not_fit(cli, trained_adapter, other_model_dir):
    code, out, _ = cli("verify", trained_adapter, "--model", other_model_dir)
    assert code == 1
    assert out.splitlines()[0].startswith("does not fit:")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_loads_in_plain_transformers(cli, trained_adapter, tiny_model_dir, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, text, err = cli("merge", trained_adapter, "--out", out, "--dtype", dtype)
    assert code == 0, text + err
    assert "ok" in text
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ak.load(base, trained_adapter)
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        want, got = base(ids).logits, merged(ids).logits.float()
    tol = 1e-5 if dtype == "float32" else 5e-2
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert (out / "tokenizer_config.json").is_file()


def test_embedded_name_maps_back():
    from adapterkit.cli.common import model_spec_for_adapter

    assert model_spec_for_adapter("HuggingFaceTB/SmolLM2-135M-Instruct", None) == "smollm2-135m-instruct"
    assert model_spec_for_adapter("HuggingFaceTB/SmolLM2-135M-Instruct", "/x") == "/x"
    assert model_spec_for_adapter("/some/dir", None) == "/some/dir"
    assert model_spec_for_adapter(None, None) is None


def test_train_add_tokens_saves_tokenizer_and_new_rows(cli, tmp_path, tiny_model_dir, chat_data):
    out = tmp_path / "ad"
    code, text, err = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", out, "--max-steps", "1",
                          "--r", "2", "--targets", "q_proj", "--add-tokens", "<kettle>,<fjord>")
    assert code == 0, text + err
    assert "added 2 token(s)" in text
    assert (out / "tokenizer_config.json").is_file()
    code, text, err = cli("verify", out)
    assert code == 0, text + err


def test_train_layers_filter_applies_to_all_linear(cli, tmp_path, tiny_model_dir, chat_data):
    from safetensors.torch import load_file

    out = tmp_path / "ad"
    code, text, err = cli("train", "--model", tiny_model_dir, "--data", chat_data, "--out", out, "--max-steps", "1",
                          "--r", "2", "--layers", "1")
    assert code == 0, text + err
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert len(keys) == 2 * 7 and all(".layers.1." in k for k in keys)
