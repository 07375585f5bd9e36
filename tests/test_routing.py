"""Per-row routing: a mixed batch equals each row run alone with its adapter, forward and generate; refusals;
fixed-capacity serving tables (put / replace / remove by copy) and no recompiles under torch.compile."""

from __future__ import annotations

import inspect

import os
import time

import pytest
import torch

import adapterkit as ak
from helpers import input_ids, snapshot, tiny_gpt2, tiny_llama

ATOL = 1e-5


def cfg(**kw) -> ak.LoraConfig:
    kw.setdefault("init_lora_weights", False)  # non-zero B: every adapter changes the outputs
    return ak.LoraConfig(**kw)


def llama_with_adapters():
    model = tiny_llama()
    ak.attach(model, cfg(r=4, lora_alpha=8, target_modules="all-linear"), name="a")
    ak.attach(model, cfg(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
              name="b")
    ak.attach(model, cfg(r=2, lora_alpha=3, target_modules=["o_proj", "down_proj", "lm_head"]), name="c")
    return model


@torch.no_grad()
def alone(model, ids, rows):
    """Logits of each row run by itself with its adapter active (None: adapters disabled)."""
    out = []
    for i, name in enumerate(rows):
        if name is None:
            with ak.disabled(model):
                out.append(model(input_ids=ids[i:i + 1]).logits)
        else:
            ak.set_active(model, name)
            out.append(model(input_ids=ids[i:i + 1]).logits)
    return torch.cat(out)


@torch.no_grad()
def routed_logits(model, ids, rows):
    with ak.routed(model, rows):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("rows", [["a", "b", None, "a"], ["c", "c", "b", None], [None, None], ["b"]])
def test_llama_forward_matches_each_row_alone(rows):
    model = llama_with_adapters()
    ids = input_ids(batch=len(rows), length=6)
    got = routed_logits(model, ids, rows)
    want = alone(model, ids, rows)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # Rows really differ by adapter (otherwise the test could not fail).
    if rows == ["a", "b", None, "a"]:
        with ak.disabled(model):
            base = model(input_ids=ids).logits
        assert (got[1] - base[1]).abs().max() > 1e-3 and (got[0] - base[0]).abs().max() > 1e-3


def test_gpt2_conv1d_and_tied_embedding_rows():
    model = tiny_gpt2()
    ak.attach(model, cfg(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"]), name="a")
    ak.attach(model, cfg(r=6, lora_alpha=12, target_modules=["c_attn", "wte"]), name="b")
    rows = ["b", "a", None]
    ids = input_ids(batch=3, length=5)
    torch.testing.assert_close(routed_logits(model, ids, rows), alone(model, ids, rows), atol=ATOL, rtol=0)


def test_generate_with_kv_cache_matches_each_row_alone():
    model = llama_with_adapters()
    rows = ["a", None, "b", "c", "a"]
    ids = input_ids(batch=len(rows), length=5, seed=3)
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad(), ak.routed(model, rows):
        mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    for i, name in enumerate(rows):
        one = ids[i:i + 1]
        with torch.no_grad(), (ak.disabled(model) if name is None else _active(model, name)):
            single = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw)
        assert torch.equal(mixed.sequences[i], single.sequences[0]), f"row {i} ({name})"
        for step_mixed, step_single in zip(mixed.scores, single.scores):
            torch.testing.assert_close(step_mixed[i], step_single[0], atol=ATOL, rtol=0)
    assert len({tuple(s.tolist()) for s in mixed.sequences[:, 5:]}) > 1


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the decode kernel needs CUDA (or TRITON_INTERPRET=1)")
def test_decode_step_runs_the_kernel_and_matches_each_row_alone():
    pytest.importorskip("triton", reason="triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = llama_with_adapters().to(device)
    rows = ["a", None, "b", "c"]
    ids = input_ids(batch=len(rows), length=6, seed=4).to(device)
    calls = []
    with torch.no_grad(), ak.routed(model, rows):
        for w in ak.routing.require_state(model).wrappers.values():
            routed = getattr(w, "_routed", None)
            if isinstance(routed, ak.routing.RoutedLinear):
                launch = routed.decode
                routed.decode = lambda x, index, out, launch=launch: (calls.append(x.shape), launch(x, index, out))
        cache = model(input_ids=ids[:, :5], use_cache=True).past_key_values  # prefill: the gather path
        assert not calls
        # transformers renamed forward's `past_key_values` to `cache` (5.24 has `cache`, 5.17 the old name)
        name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        got = model(input_ids=ids[:, 5:], use_cache=True, **{name: cache}).logits[:, -1]
    assert len(calls) == 2 * 7 + 1  # every adapted linear of the step: 2 layers x 7, and lm_head (adapter c)
    want = alone(model, ids, rows)[:, -1]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


class _active:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        ak.set_active(self.model, self.name)

    def __exit__(self, *exc):
        return False


def test_state_restored_after_block_and_after_error():
    model = llama_with_adapters()
    ids = input_ids(batch=2)
    ak.set_active(model, "a")
    before = model(input_ids=ids).logits.detach()
    with ak.routed(model, ["b", "c"]):
        pass
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)
    with pytest.raises(ak.ConfigError, match="routed batch has 3 rows"):
        with ak.routed(model, ["a", "b", None]):
            model(input_ids=ids)
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)
    wrappers = ak.routing.require_state(model).wrappers.values()
    assert all(getattr(w, "_routed", None) is None for w in wrappers)


def test_different_ranks_scales_and_dtypes_bf16():
    model = tiny_llama().to(torch.bfloat16)
    ak.attach(model, cfg(r=3, lora_alpha=5, target_modules=["q_proj", "gate_proj"]), name="a")
    ak.attach(model, cfg(r=16, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "up_proj"]), name="b")
    rows = ["b", "a"]
    ids = input_ids(batch=2)
    got, want = routed_logits(model, ids, rows).float(), alone(model, ids, rows).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16: folded scaling rounds differently


# -- refusals ---------------------------------------------------------------------------------------------------
def test_dora_is_refused_naming_layer_and_adapter():
    model = tiny_llama()
    ak.attach(model, cfg(r=4, target_modules=["q_proj"]), name="plain")
    ak.attach(model, cfg(r=4, target_modules=["v_proj"], use_dora=True), name="dd")
    with pytest.raises(ak.ConfigError, match=r"adapter 'dd' is DoRA at 'model\.layers\.0\.self_attn\.v_proj'"):
        with ak.routed(model, ["plain", "dd"]):
            pass
    with ak.routed(model, ["plain", None]):  # the DoRA adapter is not routed: fine
        model(input_ids=input_ids())


def test_merged_adapter_is_refused():
    model = llama_with_adapters()
    ak.set_active(model, "a")
    ak.merge(model)
    with pytest.raises(ak.MergeError, match=r"adapter 'a' is merged into 'model\.layers\.0\.self_attn\.k_proj'"):
        with ak.routed(model, ["b", None]):
            pass
    ak.unmerge(model)


def test_modules_to_save_and_trainable_tokens_are_refused():
    model = tiny_llama()
    ak.attach(model, cfg(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), name="m")
    ak.attach(model, cfg(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]), name="t")
    ak.attach(model, cfg(r=4, target_modules=["k_proj"]), name="plain")
    with pytest.raises(ak.ConfigError, match=r"adapter 'm' has a modules_to_save layer at 'lm_head'"):
        with ak.routed(model, ["m"]):
            pass
    with pytest.raises(ak.ConfigError, match=r"adapter 't' has a trainable_tokens layer at 'model\.embed_tokens'"):
        with ak.routed(model, ["t"]):
            pass


def test_other_method_layers_are_off_in_the_block_and_restored():
    model = tiny_llama()
    ak.attach(model, cfg(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), name="m")
    ak.attach(model, cfg(r=4, target_modules=["k_proj"]), name="plain")
    with torch.no_grad():
        model.lm_head.modules_to_save["m"].weight.mul_(2)  # the copy differs from the base head
    ids = input_ids(batch=2)
    with torch.no_grad():
        got = routed_logits(model, ids, ["plain", None])
        want = alone(model, ids, ["plain", None])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        ak.set_active(model, "m")
        assert model.lm_head._current is model.lm_head.modules_to_save["m"]


def test_bad_rows_unknown_names_and_nesting():
    model = llama_with_adapters()
    for rows, msg in (([], "non-empty list"), ("a", "non-empty list"), ([1], "adapter names"),
                      (["zz"], "no adapter named 'zz'")):
        with pytest.raises(ak.ConfigError, match=msg):
            with ak.routed(model, rows):
                pass
    with ak.routed(model, ["a"]):
        with pytest.raises(ak.ConfigError, match="do not nest"):
            with ak.routed(model, ["b"]):
                pass
    with pytest.raises(ak.ConfigError, match="no adapters attached"):
        with ak.routed(tiny_llama(), ["a"]):
            pass


def test_dropout_while_training_is_refused():
    model = tiny_llama()
    ak.attach(model, cfg(r=4, target_modules=["q_proj"], lora_dropout=0.1), name="a")
    model.train()
    with pytest.raises(ak.ConfigError, match="model.eval"):
        with ak.routed(model, ["a"]):
            pass


# -- serving tables: slots, hot swap ------------------------------------------------------------------------------
def saved_adapter(tmp_path, name, seed, r=4, layers=2, **kw):
    model = tiny_llama(layers=layers)
    torch.manual_seed(seed)
    ak.attach(model, cfg(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "up_proj"], **kw), name="default")
    ak.save(model, tmp_path / name)
    return tmp_path / name


def test_table_from_disk_matches_loaded_adapter(tmp_path):
    d1, d2 = saved_adapter(tmp_path, "one", 1), saved_adapter(tmp_path, "two", 2, r=2, use_rslora=True)
    server = tiny_llama()
    ak.attach(server, cfg(r=1, target_modules=["q_proj", "v_proj", "up_proj"]), name="placeholder")
    table = ak.serving_table(server, capacity=4, max_rank=8)
    table.put("one", d1)
    table.put("two", d2)
    reference = tiny_llama()
    ak.load(reference, d1, name="one")
    ak.load(reference, d2, name="two")
    rows = ["two", None, "one"]
    ids = input_ids(batch=3)
    torch.testing.assert_close(routed_logits(server, ids, rows), alone(reference, ids, rows), atol=ATOL, rtol=0)
    ak.drop_serving_table(server)


def test_table_refusals(tmp_path):
    server = tiny_llama()
    ak.attach(server, cfg(r=1, target_modules=["q_proj"]), name="placeholder")
    table = ak.serving_table(server, capacity=1, max_rank=4)
    with pytest.raises(ak.ConfigError, match=r"model\.layers\.0\.mlp\.up_proj\.lora_A\.weight has no LoRA layer"):
        table.put("x", saved_adapter(tmp_path, "wide", 1))
    model = tiny_llama()
    ak.attach(model, cfg(r=8, target_modules=["q_proj"]), name="default")
    ak.save(model, tmp_path / "r8")
    with pytest.raises(ak.ConfigError, match="rank 8 .* above the table's max_rank 4"):
        table.put("r8", tmp_path / "r8")
    model = tiny_llama()
    ak.attach(model, cfg(r=2, target_modules=["q_proj"], use_dora=True), name="default")
    ak.save(model, tmp_path / "dora")
    with pytest.raises(ak.ConfigError, match="use_dora is set"):
        table.put("d", tmp_path / "dora")
    table.put("placeholder")
    model = tiny_llama()
    ak.attach(model, cfg(r=2, target_modules=["q_proj"]), name="default")
    ak.save(model, tmp_path / "r2")
    with pytest.raises(ak.ConfigError, match="table is full"):
        table.put("other", tmp_path / "r2")
    with pytest.raises(ak.ConfigError, match="holds no adapter 'nope'"):
        with ak.routed(server, ["nope"]):
            pass
    with pytest.raises(ak.ConfigError, match="holds no adapter 'nope'"):
        table.remove("nope")
    assert table.slots == {"placeholder": 1}  # nothing changed by the refusals
    with pytest.raises(ak.ConfigError, match="positive integers"):
        ak.serving_table(server, capacity=0, max_rank=4)


def test_hot_swap_under_torch_compile_does_not_recompile(tmp_path):
    from torch._dynamo.testing import CompileCounter

    dirs = [saved_adapter(tmp_path, f"ad{i}", i, layers=1) for i in range(3)]
    server = tiny_llama(layers=1)
    ak.attach(server, cfg(r=1, target_modules=["q_proj", "v_proj", "up_proj"]), name="placeholder")
    table = ak.serving_table(server, capacity=2, max_rank=4)
    table.put("x", dirs[0])
    table.put("y", dirs[1])
    reference = tiny_llama(layers=1)
    for i, d in enumerate(dirs):
        ak.load(reference, d, name=f"ad{i}")

    storage = [(layer.a.data_ptr(), layer.b.data_ptr()) for layer in table.layers]
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(server, backend=counter)
    ids = input_ids(batch=3)
    rows = ["x", None, "y"]
    with torch.no_grad():
        with ak.routed(server, rows):
            first = compiled(input_ids=ids).logits
        frames = counter.frame_count
        torch.testing.assert_close(first, alone(reference, ids, ["ad0", None, "ad1"]), atol=ATOL, rtol=0)

        timings = []
        for step, (slot_name, d, ref_name) in enumerate([("x", dirs[2], "ad2"), ("y", dirs[0], "ad0")]):
            start = time.perf_counter()
            table.put(slot_name, d)  # replace: a copy into the same slot
            timings.append(time.perf_counter() - start)
            with ak.routed(server, rows):
                got = compiled(input_ids=ids).logits
            want_rows = ["ad2", None, "ad1"] if step == 0 else ["ad2", None, "ad0"]
            torch.testing.assert_close(got, alone(reference, ids, want_rows), atol=ATOL, rtol=0)
        table.remove("x")
        table.put("z", dirs[1])  # reuses the freed slot
        with ak.routed(server, ["z", "z", None]):
            got = compiled(input_ids=ids).logits
        torch.testing.assert_close(got, alone(reference, ids, ["ad1", "ad1", None]), atol=ATOL, rtol=0)
    assert counter.frame_count == frames, "a swap recompiled the model"
    assert storage == [(layer.a.data_ptr(), layer.b.data_ptr()) for layer in table.layers]  # copies, same tensors
    # Control: a table of another shape (built per block, without the serving table) does recompile.
    ak.drop_serving_table(server)
    with torch.no_grad(), ak.routed(server, ["placeholder", None, None]):
        compiled(input_ids=ids)
    assert counter.frame_count > frames
    print(f"\nhot swap (read from disk + copy into a slot, tiny llama, CPU): "
          f"{', '.join(f'{t * 1e3:.2f} ms' for t in timings)}")
    torch._dynamo.reset()


def test_table_index_written_in_and_out_of_inference_mode():
    model = llama_with_adapters()
    ak.serving_table(model, capacity=3, max_rank=8, names=["a", "b", "c"])
    ids = input_ids(batch=2)
    with torch.inference_mode(), ak.routed(model, ["a", "b"]):
        first = model(input_ids=ids).logits.clone()
    with torch.no_grad(), ak.routed(model, ["b", "a"]):  # the same index tensor, written outside inference mode
        second = model(input_ids=ids).logits
    torch.testing.assert_close(first, alone(model, ids, ["a", "b"]), atol=ATOL, rtol=0)
    torch.testing.assert_close(second, alone(model, ids, ["b", "a"]), atol=ATOL, rtol=0)


def test_serving_bench_small_run(tmp_path, monkeypatch):
    """bench/serve.py --small: every row is timed (round by round, the routed rows inside one open block, whose
    entry is timed on its own) and the mixed outputs agree with PEFT's."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["serve.py", "--small", "--iters", "2"])
    bench.main()
    results = json.loads((tmp_path / "serve.json").read_text())
    for phase in ("prefill", "decode"):
        ms = results["ms"][phase]
        assert set(ms) == {"base", "peft one adapter", "peft mixed", "adapterkit one adapter", "adapterkit mixed",
                           "entering and leaving routed() (no forward)"}
        assert all(isinstance(v, float) and v > 0 for v in ms.values())
        assert results[f"{phase}_max_rel_diff_vs_peft"] < 1e-5  # fp32: the same answer as PEFT's mixed batch
        assert results[f"{phase}_adapter_effect"] > 1e-3  # and the adapters change it
    assert set(results["hot_swap_ms"]) == {"put from disk", "put from attached adapter"}
