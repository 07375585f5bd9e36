"""`adapterkit generate` with several adapters: one mixed batch whose replies equal each adapter run alone."""

from __future__ import annotations

import re

import torch

import adapterkit as ak


def random_adapter(model_dir, out, seed, targets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    ak.attach(model, ak.LoraConfig(r=4, lora_alpha=64, init_lora_weights=False, target_modules=targets))
    ak.save(model, out)
    return out


def replies(out: str) -> dict[tuple[str, str], str]:
    """{(prompt, label): reply} from the command's output."""
    found, prompt = {}, None
    for line in out.splitlines():
        if line.startswith("> "):
            prompt = line[2:]
        elif m := re.match(r"  (base|\S+?): (.*)$", line):
            found[(prompt, m.group(1))] = m.group(2).strip()
    return found


def test_several_adapters_in_one_batch_match_each_alone(cli, tiny_model_dir, tmp_path):
    a = random_adapter(tiny_model_dir, tmp_path / "one", 1, ["q_proj", "v_proj", "embed_tokens"])
    b = random_adapter(tiny_model_dir, tmp_path / "two", 2, "all-linear")
    prompts = ["Hi", "What is fact 3, and why?"]  # different lengths: the batch is left-padded
    code, out, err = cli("generate", "--model", tiny_model_dir, "-a", a, "-a", b, "--compare",
                         "--max-new-tokens", "6", *prompts)
    assert code == 0, err
    mixed = replies(out)
    assert len(mixed) == 6
    for path in (a, b):
        code, out, err = cli("generate", "--model", tiny_model_dir, "-a", path, "--compare", "--max-new-tokens", "6",
                             *prompts)
        assert code == 0, err
        alone = replies(out)
        for prompt in prompts:
            assert mixed[(prompt, str(path))] == alone[(prompt, "adapter")]
            assert mixed[(prompt, "base")] == alone[(prompt, "base")]
    assert len({mixed[(prompts[1], label)] for label in ("base", str(a), str(b))}) > 1


def test_adapters_of_different_bases_need_model(cli, tiny_model_dir, other_model_dir, tmp_path):
    a = random_adapter(tiny_model_dir, tmp_path / "one", 1, ["q_proj"])
    b = random_adapter(other_model_dir, tmp_path / "two", 2, ["q_proj"])
    code, out, err = cli("generate", "-a", a, "-a", b, "Hi")
    assert code == 1 and "record different base models" in err
