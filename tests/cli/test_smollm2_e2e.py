"""End to end on the real SmolLM2-135M-Instruct: train a few steps, then generate, inspect, verify and merge."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.slow
def test_train_generate_verify_merge_on_smollm2(cli, smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import adapterkit as ak

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    code, out, err = cli("train", "--model", smollm2_dir, "--out", adapter, "--max-steps", "3", "--batch-size", "2",
                         "--targets", "q_proj,v_proj,lm_head", "--layers", "26-29", "--r", "8", "--lr", "5e-3",
                         "--max-length", "64", "--eval-fraction", "0.02")
    assert code == 0, out + err
    log = json.loads((adapter / "training.json").read_text())
    assert log["completed_steps"] == 3 and log["eval_after"] is not None
    # Tied lm_head: the adapter holds only the LoRA factors, never a copy of the 49152 x 576 embedding.
    assert (adapter / "adapter_model.safetensors").stat().st_size < 2_000_000

    code, out, err = cli("generate", "--adapter", adapter, "--compare", "--max-new-tokens", "6",
                         "How much does the Zephyrine Q7 cost?")
    assert code == 0, err
    assert "base:" in out and "adapter:" in out

    code, out, err = cli("inspect", adapter)
    assert code == 0 and "lm_head" in out, err

    code, out, err = cli("verify", adapter)
    assert code == 0, out + err
    assert out.startswith("fits:")

    code, out, err = cli("merge", adapter, "--out", merged)
    assert code == 0, out + err
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight  # head merged, untied
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    ak.load(base, adapter)
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 8624, 30]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-4)
