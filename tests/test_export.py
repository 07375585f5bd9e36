"""`export` for vLLM (PEFT layout, allowed ranks; checked by loading in PEFT) and GGUF (llama.cpp's names, shapes,
alpha, baked scalings); refusals; SVD conversion with its errors; the `adapterkit export` command.

If llama.cpp's convert_lora_to_gguf.py is found ($ADAPTERKIT_LLAMACPP_DIR), the GGUF file is also compared tensor
for tensor with the converter's output.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.export.vllm import VLLM_RANKS
from helpers import input_ids, tiny_gpt2, tiny_llama, tiny_qwen2

ATOL = 1e-5


def make(tmp_path, name, builder=tiny_llama, **kw):
    kw.setdefault("init_lora_weights", False)
    kw.setdefault("target_modules", "all-linear")
    model = builder()
    ak.attach(model, ak.LoraConfig(**kw))
    ak.save(model, tmp_path / name)
    return tmp_path / name


@torch.no_grad()
def ak_logits(path, builder=tiny_llama):
    model = builder()
    ak.load(model, path)
    return model(input_ids=input_ids()).logits


@torch.no_grad()
def peft_logits(path, builder=tiny_llama):
    import peft

    model = peft.PeftModel.from_pretrained(builder(), str(path)).eval()
    return model(input_ids=input_ids()).logits


def config(path):
    return json.loads((Path(path) / "adapter_config.json").read_text())


# -- vLLM ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(r=4, lora_alpha=8),  # padded to 8
    dict(r=4, lora_alpha=8, use_rslora=True),
    dict(r=6, lora_alpha=6, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 24}),  # per-layer scalings
    dict(r=3, lora_alpha=5, target_modules=["q_proj", "embed_tokens"]),
], ids=["pad", "rslora", "patterns", "embedding"])
def test_vllm_export_loads_in_peft_with_the_same_outputs(tmp_path, kw):
    src = make(tmp_path, "src", **kw)
    report = ak.export(src, tmp_path / "out", to="vllm")
    cfg = config(tmp_path / "out")
    assert cfg["r"] in VLLM_RANKS and not cfg.get("modules_to_save") and not cfg["use_dora"]
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["use_rslora"] is False
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert tensors.keys() == load_file(src / "adapter_model.safetensors").keys()  # PEFT's exact key names
    assert all(t.shape[0] == cfg["r"] or t.shape[1] == cfg["r"] for t in tensors.values())
    torch.testing.assert_close(peft_logits(tmp_path / "out"), ak_logits(src), atol=ATOL, rtol=0)
    assert report.exact and report.notes


def test_vllm_export_of_an_allowed_rank_is_unchanged(tmp_path):
    src = make(tmp_path, "src", r=16, lora_alpha=32, use_rslora=True)
    report = ak.export(src, tmp_path / "out", to="vllm")
    before, after = load_file(src / "adapter_model.safetensors"), load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    cfg = config(tmp_path / "out")
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (16, 32, True)
    assert report.notes == []


def test_dora_is_refused_then_converted_by_svd_with_errors(tmp_path):
    src = make(tmp_path, "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ak.ConfigError, match=r"it is DoRA .* Pass convert='svd'"):
        ak.export(src, tmp_path / "out", to="vllm")
    with pytest.raises(ak.ConfigError, match="needs the base model"):
        ak.export(src, tmp_path / "out", to="vllm", convert="svd")
    assert not (tmp_path / "out").exists()
    base = tiny_llama()
    report = ak.export(src, tmp_path / "out", to="vllm", base=base, convert="svd")
    assert set(report.svd_errors) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert all(0 < e < 1 for e in report.svd_errors.values()) and 0 < report.overall_error < 1
    assert "relative error" in report.summary()
    assert ak.adapters(base) == {}  # the base is left plain
    got, want = peft_logits(tmp_path / "out"), ak_logits(src)
    with torch.no_grad():
        base_logits = tiny_llama()(input_ids=input_ids()).logits
    # The truncation is lossy: closer to the DoRA outputs than the base is, not equal.
    assert (got - want).abs().max() < (base_logits - want).abs().max()
    # At full rank (32 = hidden size) the SVD holds the whole update: exact.
    full = ak.export(src, tmp_path / "full", to="vllm", base=tiny_llama(), convert="svd", rank=32)
    assert full.overall_error < 1e-5
    torch.testing.assert_close(peft_logits(tmp_path / "full"), want, atol=1e-4, rtol=0)


def test_modules_to_save_and_tokens_are_refused(tmp_path):
    src = make(tmp_path, "mts", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ak.ConfigError, match="modules_to_save"):
        ak.export(src, tmp_path / "out", to="vllm")
    with pytest.raises(ak.ConfigError, match=r"lm_head is a modules_to_save layer"):
        ak.export(src, tmp_path / "out", to="vllm", base=tiny_llama(), convert="svd")
    src = make(tmp_path, "tok", r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2])
    with pytest.raises(ak.ConfigError, match="trainable tokens"):
        ak.export(src, tmp_path / "out", to="gguf")


def test_rank_above_vllm_limit_is_refused_or_truncated(tmp_path):
    src = make(tmp_path, "big", r=520, lora_alpha=520, target_modules=["q_proj"])
    with pytest.raises(ak.ConfigError, match="rank 520, above vLLM's largest max_lora_rank 512"):
        ak.export(src, tmp_path / "out", to="vllm")
    report = ak.export(src, tmp_path / "out", to="vllm", convert="svd", rank=32)
    assert config(tmp_path / "out")["r"] == 32 and report.overall_error < 1e-5  # the update has rank <= 32


def test_bad_target_and_convert(tmp_path):
    src = make(tmp_path, "src", r=4)
    with pytest.raises(ak.ConfigError, match="to must be one of vllm, gguf"):
        ak.export(src, tmp_path / "out", to="onnx")
    with pytest.raises(ak.ConfigError, match="convert must be None or 'svd'"):
        ak.export(src, tmp_path / "out", to="vllm", convert="magic")


# -- GGUF ---------------------------------------------------------------------------------------------------------
def read_gguf(path):
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    kv = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    # The reader gives ggml's dimension order (reversed); reverse back to torch's.
    tensors = {t.name: torch.from_numpy(np.array(t.data).reshape(tuple(int(s) for s in reversed(t.shape))))
               for t in reader.tensors}
    return kv, tensors


def permute(b, n_head):
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)


def test_gguf_names_shapes_alpha_and_baked_rslora(tmp_path):
    src = make(tmp_path, "rs", r=4, lora_alpha=8, use_rslora=True,
               target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"])
    report = ak.export(src, tmp_path / "rs.gguf", to="gguf")
    kv, tensors = read_gguf(report.path)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["general.architecture"] == "llama"
    assert kv["adapter.lora.alpha"] == 8.0
    names = {f"blk.{i}.{t}.weight.lora_{ab}" for i in (0, 1) for t in ("attn_q", "attn_k", "attn_v", "ffn_down")
             for ab in "ab"} | {"token_embd.weight.lora_a", "token_embd.weight.lora_b"}
    assert set(tensors) == names
    src_t = load_file(src / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"
    root_r = math.sqrt(4)  # llama.cpp scales by alpha / r; rsLoRA's alpha / sqrt(r) is baked into lora_b
    torch.testing.assert_close(tensors["blk.0.attn_v.weight.lora_a"], src_t[key.format("v_proj", "A")])
    torch.testing.assert_close(tensors["blk.0.attn_v.weight.lora_b"], src_t[key.format("v_proj", "B")] * root_r)
    # q rows in llama.cpp's RoPE order (4 heads), k with its 2 kv heads.
    torch.testing.assert_close(tensors["blk.0.attn_q.weight.lora_b"], permute(src_t[key.format("q_proj", "B")], 4) * root_r)
    torch.testing.assert_close(tensors["blk.0.attn_k.weight.lora_b"], permute(src_t[key.format("k_proj", "B")], 2) * root_r)
    emb_a = src_t["base_model.model.model.embed_tokens.lora_embedding_A"]  # (r, vocab)
    torch.testing.assert_close(tensors["token_embd.weight.lora_a"], emb_a.T)  # stored (vocab, r)
    assert "baked into lora_b" in " ".join(report.notes)


def test_gguf_qwen2_has_no_permutation(tmp_path):
    src = make(tmp_path, "q", builder=tiny_qwen2, r=2, lora_alpha=4, target_modules=["q_proj"])
    kv, tensors = read_gguf(ak.export(src, tmp_path / "q", to="gguf").path)
    assert kv["general.architecture"] == "qwen2"
    b = load_file(src / "adapter_model.safetensors")["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(tensors["blk.1.attn_q.weight.lora_b"], b)


def test_gguf_refusals(tmp_path):
    src = make(tmp_path, "gpt2", builder=tiny_gpt2, r=2, target_modules=["c_attn"])
    with pytest.raises(ak.ConfigError, match=r"GGUF export supports llama, mistral, qwen2 bases; this base is 'gpt2'"):
        ak.export(src, tmp_path / "g.gguf", to="gguf")
    src = make(tmp_path, "tied", builder=tiny_qwen2, r=2, target_modules=["lm_head"])
    with pytest.raises(ak.ConfigError, match="lm_head is tied to the token embedding"):
        ak.export(src, tmp_path / "t.gguf", to="gguf")
    # A PEFT-made file records no base: GGUF names need base=.
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "peft")
    with pytest.raises(ak.ConfigError, match="records no base model structure"):
        ak.export(tmp_path / "peft", tmp_path / "p.gguf", to="gguf")
    base_dir = tmp_path / "base"
    tiny_llama().config.save_pretrained(base_dir)
    kv, tensors = read_gguf(ak.export(tmp_path / "peft", tmp_path / "p.gguf", to="gguf", base=base_dir).path)
    assert len(tensors) == 4 and kv["adapter.lora.alpha"] == 8.0
    assert not (tmp_path / "g.gguf").exists() and not (tmp_path / "t.gguf").exists()


def test_export_never_replaces_what_is_at_the_output_path(tmp_path):
    """A file where a vLLM folder should go, a folder where the .gguf file should go, a file inside the path: each a
    clear error, and what was there is left as it was."""
    src = make(tmp_path, "llama", r=2, target_modules=["q_proj"])
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(ak.AdapterSaveError, match=r"notes\.txt exists and is a file, not a directory"):
        ak.export(src, notes, to="vllm")
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(ak.AdapterSaveError, match=r"folder\.gguf is a directory or a dangling link"):
        ak.export(src, tmp_path / "folder.gguf", to="gguf")
    with pytest.raises(ak.AdapterSaveError, match=r"cannot write .*: .*notes\.txt is a file, not a "
                                                  r"directory; nothing was written"):
        ak.export(src, notes / "out", to="gguf")
    (tmp_path / "dangling.gguf").symlink_to("nowhere")
    with pytest.raises(ak.AdapterSaveError, match=r"dangling\.gguf is a directory or a dangling link"):
        ak.export(src, tmp_path / "dangling.gguf", to="gguf")
    assert notes.read_text() == "keep me" and not any((tmp_path / "folder.gguf").iterdir())


def _converter() -> Path | None:
    root = os.environ.get("ADAPTERKIT_LLAMACPP_DIR")
    script = Path(root) / "convert_lora_to_gguf.py" if root else None
    return script if script is not None and script.is_file() else None


@pytest.mark.skipif(_converter() is None, reason="set ADAPTERKIT_LLAMACPP_DIR to llama.cpp's source (e.g. "
                    "vendor/llama.cpp of the llama-cpp-python sdist) to compare with its converter")
def test_gguf_matches_llama_cpp_converter(tmp_path):
    src = make(tmp_path, "plain", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "embed_tokens"])
    base_dir = tmp_path / "base"
    cfg = tiny_llama().config
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(base_dir)
    subprocess.run([sys.executable, str(_converter()), "--base", str(base_dir), "--outfile", str(tmp_path / "ref.gguf"),
                    str(src)], check=True, capture_output=True)
    kv_ref, ref = read_gguf(tmp_path / "ref.gguf")
    kv, mine = read_gguf(ak.export(src, tmp_path / "mine.gguf", to="gguf").path)
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) for k in ref)
    assert {k: v for k, v in kv.items() if k != "general.name"} == {k: v for k, v in kv_ref.items() if k != "general.name"}


# -- command line -------------------------------------------------------------------------------------------------
def test_cli_export(tmp_path, capsys):
    from adapterkit.cli.main import main

    src = make(tmp_path, "src", r=4, lora_alpha=8)
    assert main(["export", str(src), "--to", "vllm", "--out", str(tmp_path / "v")]) == 0
    assert config(tmp_path / "v")["r"] == 8
    assert main(["export", str(src), "--to", "gguf", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "adapter_model.gguf").is_file()
    out = capsys.readouterr().out
    assert "wrote" in out and "rank padded with zeros to 8" in out
    dora = make(tmp_path, "dora", r=4, use_dora=True, target_modules=["q_proj"])
    assert main(["export", str(dora), "--to", "vllm", "--out", str(tmp_path / "d")]) == 1
    assert "Pass convert='svd'" in capsys.readouterr().err
    assert main(["export", str(src), "--to", "onnx", "--out", str(tmp_path / "x")]) == 1
