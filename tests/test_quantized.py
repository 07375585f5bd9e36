"""QLoRA: LoRA / DoRA on bitsandbytes 4-bit and 8-bit bases (and torchao int8 weights when torchao is installed).

Real bitsandbytes on CPU, tiny Llama models (hidden 64, so every projection has a multiple of 32 rows, which
bitsandbytes' CPU kernels need). The float reference of a quantized model is a float model holding its dequantized
weights: the adapter must compute the same on both, up to the quantized kernels' own rounding.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from bnb_cases import assert_reloads_exactly, assert_unquantized_layers_refused, logits, packed_state, without_cpu_repack
from helpers import input_ids, tiny_llama
from torch import nn

import adapterkit as ak
from adapterkit.quantized import Bnb4bitView, dequantize_4bit, quantized_view
from adapterkit.state import adapter_state

bnb = pytest.importorskip("bitsandbytes")  # the qlora / test extra; adapterkit itself imports without it

HIDDEN = 64
KINDS = ["nf4", "fp4", "int8"]
# Max |Δlogit| between the quantized model and its dequantized float twin with the same adapter: 4-bit layers
# dequantize exactly and compute in float32; int8 layers also quantize their inputs per row.
TOLERANCE = {"nf4": 2e-3, "fp4": 2e-3, "int8": 2e-2}


def quantized_llama(kind: str, seed: int = 0, **kwargs) -> nn.Module:
    model = tiny_llama(hidden=HIDDEN, seed=seed)
    return ak.quantize_model(model, kind, compute_dtype=torch.float32, **kwargs).eval()


def float_twin(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float copy of the quantized `model` whose linear weights are its dequantized ones."""
    twin = tiny_llama(hidden=HIDDEN, seed=seed)
    for name, module in model.named_modules():
        view = quantized_view(module)
        if view is not None:
            twin.get_submodule(name).weight.data.copy_(view.float_weight(module))
    return twin


def lora(dora: bool = False, **kwargs) -> ak.LoraConfig:
    # init_lora_weights=False: a non-zero adapter from the start, so outputs depend on it.
    fields = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, "use_dora": dora}
    return ak.LoraConfig(**{**fields, **kwargs})


def attach_same(models: list[nn.Module], cfg: ak.LoraConfig) -> None:
    """The same adapter values on every model (DoRA magnitudes moved away from their initial norms)."""
    for model in models:
        torch.manual_seed(1)
        ak.attach(model, cfg)
    reference = dict(models[0].named_parameters())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in reference.items():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        for model in models[1:]:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(reference[name])


# -- outputs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_on_quantized_base_matches_dequantized_float_model(kind, dora):
    model = quantized_llama(kind)
    logits(model)  # an eval forward first: bitsandbytes repacks 4-bit weights on this CPU
    twin = float_twin(model)
    attach_same([model, twin], lora(dora))
    got, want = logits(model), logits(twin)
    assert (got - want).abs().max() < TOLERANCE[kind]
    assert (got - logits(tiny_llama(hidden=HIDDEN))).abs().max() > 20 * TOLERANCE[kind]  # the adapter matters
    wrapper = model.model.layers[0].self_attn.q_proj
    assert wrapper.lora_A["default"].weight.dtype == torch.float32  # the layer's compute dtype


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_gradients_match_float_model_after_eval(kind):
    """Gradients reach the lowest layer's adapter through every quantized base layer, also after an eval pass
    (bitsandbytes' CPU-packed 4-bit layout has no backward; attach puts the layer back in the standard layout)."""
    model = quantized_llama(kind)
    logits(model)
    twin = float_twin(model)
    attach_same([model, twin], lora(dora=True))
    ids = input_ids()
    for m in (model, twin):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            rel = (p.grad - grads[name]).norm() / grads[name].norm()
            assert rel < (0.02 if kind != "int8" else 0.1), (name, float(rel))


def test_attach_keeps_a_cpu_packed_layer_values_exactly():
    layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.bfloat16).to("cpu").eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights here")
    before = dequantize_4bit(layer.weight)
    Bnb4bitView.prepare(layer)
    assert not layer.weight.quant_state.packing_format_for_cpu
    assert torch.equal(dequantize_4bit(layer.weight), before)
    assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float(), before)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_quant_settings_are_read_and_kept(storage, double_quant):
    model = quantized_llama("nf4", double_quant=double_quant, quant_storage=storage)
    twin = float_twin(model)
    attach_same([model, twin], lora())
    assert (logits(model) - logits(twin)).abs().max() < TOLERANCE["nf4"]
    ak.merge(model)
    layer = model.model.layers[0].mlp.up_proj.base_layer
    assert layer.weight.dtype == storage and layer.weight.compress_statistics == double_quant
    assert layer.weight.quant_state.nested == double_quant and layer.weight.quant_type == "nf4"


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_training_dequantizer_is_bitsandbytes_own_dequantization(storage, double_quant, compute):
    """The fused QLoRA node's weight (one dequantize op, the double-quantized absmax expanded once and kept) equals
    bitsandbytes' dequantize_4bit bit for bit; the kept absmax is reused, and a requantized layer gets its own."""
    from adapterkit.quantized import _expanded_absmax

    layer = bnb.nn.Linear4bit(64, 96, quant_type="nf4", compute_dtype=compute, compress_statistics=double_quant,
                              quant_storage=storage).to("cpu")
    weight = layer.weight
    want = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(compute)
    got = Bnb4bitView.dequantizer(layer)()
    assert got.dtype == compute and torch.equal(got, want)
    state = weight.quant_state
    assert _expanded_absmax(state) is _expanded_absmax(state)  # kept, not recomputed per call
    assert (_expanded_absmax(state) is state.absmax) == (not double_quant)  # a plain absmax is used as it is
    model = nn.Sequential(layer)
    ak.attach(model, ak.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    ak.merge(model)  # requantized: a new state, whose absmax is expanded from its own values
    merged = model[0].base_layer.weight
    assert merged.quant_state is not state
    assert torch.equal(Bnb4bitView.dequantizer(model[0].base_layer)(),
                       bnb.functional.dequantize_4bit(merged.data, merged.quant_state).to(compute))


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
def test_adapter_dtype_follows_compute_dtype_unless_given(compute):
    model = ak.quantize_model(tiny_llama(hidden=HIDDEN), "nf4", compute_dtype=compute).eval()
    ak.attach(model, lora())
    assert model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.dtype == compute
    ak.attach(model, lora(), name="wide", dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.lora_B["wide"].weight.dtype == torch.float32
    assert torch.isfinite(logits(model)).all()


# -- save / load / fingerprint -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_on_fresh_quantized_model_is_exact(kind, tmp_path):
    model = quantized_llama(kind)
    attach_same([model], lora(dora=kind == "nf4"))
    assert_reloads_exactly(model, quantized_llama(kind), tmp_path)


def test_fingerprint_float_and_nf4_copies_are_the_same_base(tmp_path):
    float_model = tiny_llama(hidden=HIDDEN)
    attach_same([float_model], lora())
    ak.save(float_model, tmp_path / "from-float")
    nf4 = quantized_llama("nf4")
    logits(nf4)  # the fingerprint reads the CPU-packed layout too
    assert ak.load(nf4, tmp_path / "from-float").base_check == "same base"

    nf4 = quantized_llama("nf4")
    attach_same([nf4], lora())
    ak.merge(nf4)  # a merged model records its base as it was before the merge
    ak.save(nf4, tmp_path / "from-nf4")
    assert ak.load(tiny_llama(hidden=HIDDEN), tmp_path / "from-nf4").base_check == "same base"

    other = quantized_llama("nf4", seed=5)
    with pytest.raises(ak.AdapterLoadError, match="trained on a different base.*14 of 14 modules differ"):
        ak.load(other, tmp_path / "from-float")
    assert not ak.adapters(other)  # refused: nothing attached


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_peft_reads_our_file_and_we_read_peft_on_the_same_quantized_model(kind, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    ours = quantized_llama(kind)
    attach_same([ours], lora())
    ak.save(ours, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(without_cpu_repack(quantized_llama(kind)), tmp_path / "ours").eval()
    assert torch.equal(logits(peft_model), logits(ours))

    torch.manual_seed(3)
    cfg = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    made = get_peft_model(without_cpu_repack(quantized_llama(kind)), cfg).eval()
    made.save_pretrained(tmp_path / "peft")
    loaded = without_cpu_repack(quantized_llama(kind))  # its layers PEFT does not target run as in `made`
    assert ak.load(loaded, tmp_path / "peft").ok
    assert torch.equal(logits(loaded), logits(made))


def test_model_loaded_by_transformers_with_bitsandbytes_config(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden=HIDDEN).save_pretrained(tmp_path / "base")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qcfg, device_map="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    ak.attach(model, lora())
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.bfloat16
    want = logits(model)
    ak.save(model, tmp_path / "adapter")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qcfg, device_map="cpu")
    assert ak.load(again, tmp_path / "adapter").base_check == "same base"
    assert torch.equal(logits(again), want)
    merged = ak.unload(again, merge=True, dtype=torch.bfloat16)
    assert getattr(merged.config, "quantization_config", None) is None
    assert (logits(merged) - want).abs().max() < 0.1  # bf16 weights vs bf16 compute of the 4-bit layers
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    assert torch.equal(logits(reloaded), logits(merged))


# -- merge / unmerge / unload ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_requantizes_reports_error_and_unmerge_is_bit_exact(kind, dora):
    model = quantized_llama(kind)
    attach_same([model], lora(dora))
    logits(model)
    before, want = packed_state(model), logits(model)
    report = ak.merge(model)
    assert isinstance(report, ak.MergeReport) and len(report.requantization) == 14
    assert 0 < report.max_abs_error < 0.2 and 0 < report.max_rel_error < 0.2
    assert "requantized" in str(report)
    merged = logits(model)
    assert (merged - want).abs().max() < (0.5 if kind != "int8" else 0.05)  # requantization noise only
    assert all(not torch.equal(model.get_submodule(p).weight.data, data) for p, (_, data, *_) in before.items())
    ak.unmerge(model)
    after = packed_state(model)
    for path, (param, data, scales, _) in before.items():
        assert after[path][0] is param and torch.equal(after[path][1], data) and torch.equal(after[path][2], scales)
    assert torch.equal(logits(model), want)


def test_merge_report_is_empty_on_a_float_model():
    model = tiny_llama(hidden=HIDDEN)
    ak.attach(model, lora())
    report = ak.merge(model)
    assert report.requantization == {} and report.max_abs_error == 0.0 and "no requantization" in str(report)


@pytest.mark.parametrize("kind", KINDS)
def test_unload_merge_to_dtype_gives_a_plain_full_precision_model(kind):
    model = quantized_llama(kind)
    twin = float_twin(model)
    attach_same([model, twin], lora(target_modules=["q_proj", "v_proj"]))  # k_proj, mlp: quantized, not adapted
    want = logits(twin)
    out = ak.unload(model, merge=True, dtype=torch.bfloat16)
    assert out is model
    linears = [m for m in out.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
    assert out.model.embed_tokens.weight.dtype == torch.bfloat16 and out.lm_head.weight.dtype == torch.bfloat16
    assert (logits(out) - want).abs().max() < 0.05  # bf16 rounding of the merged float32 weights
    float_merged = ak.unload(twin, merge=True, dtype=torch.float32)
    assert torch.allclose(out.model.layers[1].self_attn.q_proj.weight.float(),
                          float_merged.model.layers[1].self_attn.q_proj.weight, atol=1e-2)


def test_unload_to_float32_without_merge_dequantizes_only():
    model = quantized_llama("nf4")
    twin = float_twin(model)
    ak.attach(model, lora())
    out = ak.unload(model, dtype=torch.float32)
    assert not ak.adapters(out) and quantized_view(out.model.layers[0].mlp.up_proj) is None
    assert torch.equal(out.model.layers[0].mlp.up_proj.weight, twin.model.layers[0].mlp.up_proj.weight)


# -- bad inputs --------------------------------------------------------------------------------------------------
def test_merge_overflowing_the_int8_source_dtype_is_refused_untouched():
    model = quantized_llama("int8")
    ak.attach(model, lora())
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(1e7)
    before = packed_state(model)
    with pytest.raises(ak.MergeError, match=r"overflows torch.float16.*dtype=torch.float32"):
        ak.merge(model)
    after = packed_state(model)
    assert all(after[p][0] is w and torch.equal(after[p][1], d) for p, (w, d, *_) in before.items())
    assert not any(w.merged_names for w in adapter_state(model).wrappers.values())


def test_unquantized_bitsandbytes_layers_are_refused():
    assert_unquantized_layers_refused(ak.LoraConfig(target_modules=["proj"]))


def test_quantize_model_bad_inputs():
    with pytest.raises(ak.ConfigError, match="nf4, fp4, int8"):
        ak.quantize_model(tiny_llama(hidden=HIDDEN), "int4")
    model = tiny_llama(hidden=HIDDEN)
    ak.attach(model, lora())
    with pytest.raises(ak.ConfigError, match="before attaching"):
        ak.quantize_model(model, "nf4")
    with pytest.raises(ak.ConfigError, match="floating torch.dtype"):
        ak.unload(model, merge=True, dtype=torch.int8)
    assert ak.adapters(model)  # the refused unload changed nothing


def test_quantize_model_keeps_the_head_and_skipped_names():
    model = ak.quantize_model(tiny_llama(hidden=HIDDEN), "nf4", skip=("lm_head", "down_proj"))
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)


def test_adapterkit_imports_and_refuses_quantizing_without_bitsandbytes():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch, adapterkit as ak\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8)); ak.attach(m, ak.LoraConfig(target_modules=['0']))\n"
        "try:\n    ak.quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), 'nf4')\n"
        "except ak.ConfigError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: quantizing needs bitsandbytes" in out.stdout and "adapterkit[qlora]" in out.stdout


# -- training preparation ----------------------------------------------------------------------------------------
def test_prepare_for_kbit_training_checkpointing_grads_and_dtypes():
    model = tiny_llama(hidden=HIDDEN).to(torch.bfloat16)
    ak.quantize_model(model, "nf4", compute_dtype=torch.bfloat16)
    ak.prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    ak.attach(model, lora())
    seen = []
    model.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    model.train()
    ids = input_ids()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and seen[0] == torch.bfloat16  # activations stay bf16
    out.loss.backward()
    assert len(seen) >= 2  # the checkpointed block ran again in backward
    params = ak.trainable_parameters(model)
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_prepare_for_kbit_training_needs_a_transformers_model_for_checkpointing():
    with pytest.raises(ak.ConfigError, match="gradient_checkpointing_enable"):
        ak.prepare_for_kbit_training(nn.Sequential(nn.Linear(4, 4)), gradient_checkpointing=True)


# -- torchao -----------------------------------------------------------------------------------------------------
def _torchao():
    return pytest.importorskip("torchao.quantization", reason="torchao not installed (optional; see README)")


def test_torchao_int8_weight_only_lora_merge_unmerge():
    tq = _torchao()
    model = tiny_llama(hidden=HIDDEN)
    tq.quantize_(model.model, tq.Int8WeightOnlyConfig())
    twin = float_twin(model)
    attach_same([model, twin], lora(dora=True))
    assert (logits(model) - logits(twin)).abs().max() < 2e-3
    want = logits(model)
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    original = layer.weight
    report = ak.merge(model)
    assert len(report.requantization) == 14 and 0 < report.max_rel_error < 0.05
    assert (logits(model) - want).abs().max() < 0.05
    ak.unmerge(model)
    assert layer.weight is original and torch.equal(logits(model), want)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_torchao_int8_training_gradients_match_float_model(dora):
    tq = _torchao()
    model = tiny_llama(hidden=HIDDEN)
    tq.quantize_(model.model, tq.Int8WeightOnlyConfig())
    twin = float_twin(model)
    attach_same([model, twin], lora(dora))
    ids = input_ids()
    for m in (model, twin):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad - grads[name]).norm() / grads[name].norm() < 0.02, name


def test_torchao_unsupported_weight_is_refused_before_any_change():
    tq = _torchao()
    model = tiny_llama(hidden=HIDDEN)
    tq.quantize_(model.model.layers[1].mlp, tq.Float8WeightOnlyConfig())
    with pytest.raises(ak.TargetError, match=r"Float8Tensor weight cannot carry an adapter.*Int8WeightOnlyConfig"):
        ak.attach(model, lora())
    assert not ak.adapters(model) and type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    ak.attach(model, lora(target_modules=["q_proj", "v_proj"]))  # targets that avoid it work


# -- command line ------------------------------------------------------------------------------------------------
def test_cli_train_quantize_then_merge_dequantized(tmp_path, capsys):
    import json

    from cli.conftest import build_model_dir, write_chat_data
    from transformers import AutoModelForCausalLM

    from adapterkit.cli.main import main

    base = build_model_dir(tmp_path / "base", hidden=HIDDEN)
    data = write_chat_data(tmp_path / "chat.jsonl")
    adapter = tmp_path / "adapter"
    args = ["train", "--model", str(base), "--data", str(data), "--out", str(adapter), "--max-steps", "3",
            "--batch-size", "4", "--r", "4", "--lr", "1e-2"]
    assert main(args + ["--quantize", "nf4"]) == 0
    assert "quant  nf4" in capsys.readouterr().out
    log = json.loads((adapter / "training.json").read_text())
    assert log["config"]["quantize"] == "nf4" and log["eval_after"] < log["eval_before"]
    assert main(["merge", str(adapter), "--model", str(base), "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "(nf4, dequantized)" in out and "MISMATCH" not in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(type(m) is nn.Linear for m in merged.modules() if isinstance(m, nn.Linear))

    assert main(args + ["--quantize", "int4"]) == 1
    assert "unknown --quantize 'int4'; choose one of nf4, fp4, int8" in "".join(capsys.readouterr())


def test_unload_merge_without_dtype_keeps_the_base_quantized_and_records_the_report():
    model = quantized_llama("nf4")
    attach_same([model], lora())
    want = logits(model)
    out = ak.unload(model, merge=True)
    assert isinstance(out.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit) and not ak.adapters(out)
    report = out.adapterkit_merge_report
    assert len(report.requantization) == 14 and report.max_abs_error > 0
    assert (logits(out) - want).abs().max() < 0.5
