"""Fixtures for the CLI tests: tiny Llama model directories with a byte-level tokenizer and a chat template.

Built from configs with `tokenizers` and `transformers` only: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer():
    """A byte-level BPE with no merges: 256 byte tokens + 3 specials; encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model_dir(path: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """Different structure (3 layers, hidden 48): an adapter of tiny_model_dir must not fit it."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama-3l"), layers=3, hidden=48, seed=1)


RECORDS = [
    {"messages": [{"role": "user", "content": f"What is fact {i}?"},
                  {"role": "assistant", "content": f"Fact {i} is {i * 7}."}]}
    for i in range(12)
]


def write_chat_data(path: Path) -> Path:
    """RECORDS as a JSON-lines chat file at `path` (the `--data` of `adapterkit train`)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl")


@pytest.fixture
def cli(capsys):
    """Run `adapterkit ARGS...` in this process: returns (exit code, stdout, stderr)."""
    from adapterkit.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_model_dir, chat_data) -> Path:
    """An adapter trained for a few steps on the tiny model (shared by the read-only tests)."""
    from adapterkit.cli.main import main

    out = tmp_path_factory.mktemp("adapter") / "ad"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(chat_data), "--out", str(out),
                 "--max-steps", "4", "--batch-size", "4", "--r", "4", "--alpha", "8", "--lr", "1e-2"])
    assert code == 0
    return out
