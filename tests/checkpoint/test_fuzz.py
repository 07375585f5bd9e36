"""Fuzzing `load` with damaged copies of valid adapters: every case is a clean adapterkit error with the model exactly
as it was, or a load whose outputs are finite. Never a raw exception, a hang, or a changed model after an error.

Seeded (FUZZ_SEED, FUZZ_CASES environment variables override). The valid adapters are LoRA ones in five layouts and
one adapter of every other method. Last full run (seed 20261201, 3,000 cases, 2 cores, 25 s wall):
  cases 3000, clean errors 2214, loads 786, bad 0
  by mutation (loads/errors): bytes 137/571, config 178/484, header 44/620, layout 127/183, metadata 300/356
Against the loader before its checks, the LoRA cases alone gave 90 bad of 2,000 (raw TypeError / AttributeError /
binascii.Error, non-finite logits, embeddings changed after an error). The other methods' adapters found AdaLoRA's
rank_pattern unchecked when it was not a mapping (a raw AttributeError), now a ConfigError.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.checkpoint.fingerprint import METADATA_KEY
from adapterkit.checkpoint.format import ALIASES_METADATA_KEY
from adapterkit.state import adapter_state
from adapterkit.vocab import VOCAB_METADATA_KEY, find_ties
from helpers import VOCAB, bit_equal, build, perturb

SEED = int(os.environ.get("FUZZ_SEED", "20261201"))
CASES = int(os.environ.get("FUZZ_CASES", "3000"))
CASE_SECONDS = 10  # a load of these few-hundred-KB adapters takes milliseconds; this long is a hang
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
IDS = torch.tensor([[1, 5, 9, 127]])


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` in the code under test swallows it."""


# -- the valid adapters the mutations start from ------------------------------------------------------------------
def _adapters(root: Path) -> dict[str, tuple[Path, str, torch.nn.Module]]:
    """name -> (folder, adapter name to load, the model to load onto: a fresh base or one carrying an adapter)."""
    out = {}
    torch.manual_seed(0)
    qwen = build("qwen2")  # tied embeddings
    lora = ak.attach(copy.deepcopy(qwen), ak.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False))
    ak.save(lora, root / "lora_emb")
    out["lora_emb"] = (root / "lora_emb", "default", qwen)

    llama = build("llama")
    rich = ak.attach(copy.deepcopy(llama), ak.LoraConfig(
        r=2, target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"], trainable_token_indices=[1, 2, 3],
        rank_pattern={"o_proj": 3}, alpha_pattern={"o_proj": 6}, use_rslora=True, init_lora_weights=False))
    perturb([rich.lm_head.modules_to_save["default"].weight], scale=0.1)
    ak.save(rich, root / "copies_tokens")
    out["copies_tokens"] = (root / "copies_tokens", "default", llama)

    # Tokens added before training, tied modules_to_save copies (one tensor and an alias), on the tied model.
    grown = copy.deepcopy(qwen)
    grown.resize_token_embeddings(VOCAB + 12)
    ak.attach(grown, ak.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]))
    perturb([grown.lm_head.modules_to_save["default"].weight], scale=0.1)
    ak.save(grown, root / "resized_tied")
    out["resized_tied"] = (root / "resized_tied", "default", qwen)

    # Two named adapters in one folder; "second" is loaded onto a model already carrying "default".
    two = ak.attach(copy.deepcopy(qwen), ak.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    ak.attach(two, ak.LoraConfig(r=3, target_modules=["v_proj", "q_proj"], init_lora_weights=False), name="second")
    ak.save(two, root / "two")
    carrying = copy.deepcopy(qwen)
    ak.load(carrying, root / "two")
    out["two"] = (root / "two", "second", carrying)
    out["two_fresh"] = (root / "two", "second", qwen)

    # One adapter of every other method: their own tensors (magnitudes, Kronecker factors, vectors, rotations,
    # triplets with rank masks, virtual tokens) and config keys get the same damage.
    gpt2 = build("gpt2")
    others = {
        "dora": (llama, ak.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                      init_lora_weights=False)),
        "dora_conv1d": (gpt2, ak.LoraConfig(r=4, use_dora=True, target_modules=["c_attn"], init_lora_weights=False)),
        "loha": (llama, ak.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)),
        "lokr": (llama, ak.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)),
        "ia3": (llama, ak.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"])),
        "vera": (llama, ak.VeraConfig(r=4, target_modules=["q_proj", "v_proj"])),
        "oft": (llama, ak.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj", "v_proj"])),
        "adalora": (llama, ak.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"])),
        "prompt_tuning": (llama, ak.PromptTuningConfig(num_virtual_tokens=4)),
    }
    for name, (base, config) in others.items():
        model = ak.attach(copy.deepcopy(base), config)
        perturb(ak.trainable_parameters(model), scale=0.05)
        ak.save(model, root / name)
        out[name] = (root / name, "default", base)
    return out


# -- mutations ----------------------------------------------------------------------------------------------------
DEEP = "__deep__"
HOSTILE = [
    None, True, False, 0, -1, 1, 3, 2**31, 10**9, 10**30, -(10**30), 0.5, 1e6, -1e6, 1e308, float("nan"),
    float("inf"),
    "", "x", "16", "yes", "(", "(a+)+$", "\\2", "[z-a]", "a" * 20_000, "lm_head", "q_proj", "\udcff".encode(
        "utf-8", "surrogatepass").decode("latin-1"), [], [1], [-5], ["q_proj"], [[["x"]]], [None], {}, {"a": 1},
    {"q_proj": 10**9}, {"(": 2}, {"shape": 5}, DEEP,
]
CONFIG_KEYS = [
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save", "rank_pattern",
    "alpha_pattern", "trainable_token_indices", "layers_to_transform", "layers_pattern", "use_rslora", "use_dora",
    "init_lora_weights", "peft_type", "bias", "fan_in_fan_out", "task_type", "lora_bias", "layer_replication",
    "inference_mode", "base_model_name_or_path", "megatron_config", "peft_version", "some_future_key",
]


def _dump(obj) -> str:
    return json.dumps(obj).replace(json.dumps(DEEP), "[" * 1000 + "]" * 1000)


def _mutate_json(obj, rng: random.Random):
    """Replace, delete or retype one randomly chosen node of a JSON document (returns the new document)."""
    nodes = [((), obj)]
    stack = [((), obj)]
    while stack and len(nodes) < 5000:
        path, node = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            nodes.append((path + (key,), child))
            stack.append((path + (key,), child))
    path, _ = rng.choice(nodes)
    if not path:
        return rng.choice(HOSTILE)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    action = rng.random()
    if action < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif action < 0.25 and isinstance(parent, list):
        parent.append(rng.choice(HOSTILE))
    else:
        parent[path[-1]] = rng.choice(HOSTILE)
    return obj


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    text = _dump(header).encode("utf-8", "surrogatepass")
    return len(text).to_bytes(8, "little") + text + data


def mutate_bytes(folder: Path, rng: random.Random) -> str:
    path = folder / WEIGHTS
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    kind = rng.choice(["flip", "flip_header", "truncate", "run", "insert", "length"])
    if kind in ("flip", "flip_header"):
        end = 8 + n if kind == "flip_header" else len(raw)
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            i = rng.randrange(end)
            raw[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        raw = raw[: rng.randrange(len(raw))]
    elif kind == "run":
        i = rng.randrange(len(raw))
        size = rng.choice([1, 4, 16, 256])
        raw[i : i + size] = bytes([rng.choice([0, 0xFF, 0x7F, rng.randrange(256)])]) * size
    elif kind == "insert":
        i = rng.randrange(len(raw))
        raw[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 8])))
    else:
        raw[:8] = rng.choice([0, 1, n - 1, n + 1, len(raw), 2**40, 2**64 - 1]).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    return f"bytes:{kind}"


def mutate_header(folder: Path, rng: random.Random) -> str:
    path = folder / WEIGHTS
    header, data = _split(path.read_bytes())
    key = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[key]
    kind = rng.choice(["dtype", "shape", "offsets", "rename", "drop", "duplicate", "entry", "count"])
    if kind == "dtype":
        entry["dtype"] = rng.choice(["I32", "I64", "I16", "I8", "U8", "BOOL", "F16", "BF16", "F64", "F8_E4M3", "X", 5])
    elif kind == "shape":
        shape = entry["shape"]
        entry["shape"] = rng.choice([shape[::-1], [shape[0] + 1] + shape[1:], [], [-1, 4], [2**62, 2**62], "4",
                                     shape + [1], [shape[0] // 2, shape[-1] * 2], [0] * 9])
    elif kind == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a + 4, b + 4], [a, 2**62], [-4, b], [a], [a, b, 0], None])
    elif kind == "rename":
        new = rng.choice([key.replace("lora_A", "lora_B"), key + "x", "base_model.model.model.norm.weight",
                          "base_model.model.lm_head.weight", key.replace("base_model.model.", ""), "\u00e9" * 300])
        header[new] = header.pop(key)
    elif kind == "drop":
        del header[key]
    elif kind == "duplicate":
        header[key + ".copy"] = dict(entry)
    elif kind == "entry":
        header[key] = rng.choice([None, 5, "x", [], {"dtype": "F32"}])
    else:
        for i in range(100_001 if rng.random() < 0.1 else 200):  # over MAX_TENSORS (slow to write: rarely)
            header[f"extra.{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    path.write_bytes(_join(header, data))
    return f"header:{kind}"


def mutate_metadata(folder: Path, rng: random.Random) -> str:
    path = folder / WEIGHTS
    header, data = _split(path.read_bytes())
    meta = header.setdefault("__metadata__", {})
    key = rng.choice([METADATA_KEY, METADATA_KEY, VOCAB_METADATA_KEY, ALIASES_METADATA_KEY, "format"])
    kind = rng.choice(["node", "node", "node", "text", "type", "delete"])
    text = meta.get(key)
    if kind == "node" and text is not None:
        try:
            meta[key] = _dump(_mutate_json(json.loads(text), rng))
        except ValueError:
            meta[key] = text[::-1]
    elif kind == "text" and text:
        cut = rng.randrange(len(text))
        meta[key] = rng.choice([text[:cut], text[:cut] + "\\" + text[cut:], text.replace('"', "'", 1), "", "[]",
                                "null", text.replace("A", "!")])
    elif kind == "type":
        meta[key] = rng.choice([5, None, ["x"], {"a": "b"}])
    else:
        meta.pop(key, None)
        if key == VOCAB_METADATA_KEY:
            meta[key] = json.dumps({"input": [rng.choice([1, 100, 127, 129, 10**7, 2**40]), 32], "tied": True})
    path.write_bytes(_join(header, data))
    return f"metadata:{key}:{kind}"


def mutate_config(folder: Path, rng: random.Random) -> str:
    path = folder / CONFIG
    data = json.loads(path.read_text())
    kind = rng.choice(["value", "value", "value", "node", "text"])
    if kind == "value":
        key = rng.choice(CONFIG_KEYS)
        data[key] = rng.choice(HOSTILE)
        path.write_text(_dump(data))
        return f"config:{key}"
    if kind == "node":
        path.write_text(_dump(_mutate_json(data, rng)))
        return "config:node"
    raw = path.read_bytes()
    choice = rng.choice(["utf8", "truncate", "toplevel", "empty", "bom", "huge"])
    if choice == "utf8":
        i = rng.randrange(len(raw))
        raw = raw[:i] + b"\xff\xfe" + raw[i:]
    elif choice == "truncate":
        raw = raw[: rng.randrange(len(raw))]
    elif choice == "toplevel":
        raw = rng.choice([b"[]", b'"LORA"', b"null", b"3", b"[" * 5000 + b"]" * 5000])
    elif choice == "empty":
        raw = b""
    elif choice == "bom":
        raw = b"\xef\xbb\xbf" + raw
    else:
        data["target_modules"] = "q" * 20_000_000
        raw = json.dumps(data).encode()
    path.write_bytes(raw)
    return f"config:{choice}"


def mutate_layout(folder: Path, rng: random.Random) -> str:
    """Damage to the files of the named adapter `second` (or the top level, for the others)."""
    sub = folder / "second" if (folder / "second").is_dir() else folder
    kind = rng.choice(["no_config", "dangling_config", "config_dir", "no_weights", "dangling_weights", "sub_file",
                       "sub_dangling", "no_sub"])
    target = sub / (CONFIG if "config" in kind else WEIGHTS)
    if kind in ("no_config", "no_weights"):
        target.unlink()
    elif kind in ("dangling_config", "dangling_weights"):
        target.unlink()
        target.symlink_to(folder / "nowhere")
    elif kind == "config_dir":
        target.unlink()
        target.mkdir()
    elif sub != folder:
        shutil.rmtree(sub)
        if kind == "sub_file":
            sub.write_text("x")
        elif kind == "sub_dangling":
            sub.symlink_to(folder / "nowhere")
    return f"layout:{kind}"


MUTATIONS = [mutate_bytes, mutate_bytes, mutate_header, mutate_header, mutate_metadata, mutate_metadata,
             mutate_config, mutate_config, mutate_layout]


# -- what "the model is unchanged" compares -------------------------------------------------------------------------
def _record(model: torch.nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modules = [(name, id(m), type(m).__name__) for name, m in model.named_modules(remove_duplicate=False)]
    params = [(name, id(p), p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)]
    adapters = sorted(ak.adapters(model)), ak.active_adapters(model)
    return state, modules, params, find_ties(model), adapters, model.config.vocab_size


def _differences(model: torch.nn.Module, before) -> list[str]:
    state, modules, params, ties, adapters, vocab_size = before
    now_state, now_modules, now_params, now_ties, now_adapters, now_vocab = _record(model)
    problems = [f"tensor {k} changed" for k in state if k not in now_state or not bit_equal(state[k], now_state[k])]
    problems += [f"new tensor {k}" for k in now_state.keys() - state.keys()]
    for label, a, b in (("module tree", modules, now_modules), ("parameters", params, now_params),
                        ("ties", ties, now_ties), ("adapters", adapters, now_adapters),
                        ("config vocab_size", vocab_size, now_vocab)):
        if a != b:
            problems.append(f"{label} changed")
    return problems


def _alarm(signum, frame):
    raise Hang()


def damaged_copy(adapters: dict, rng: random.Random, folder: Path) -> tuple[str, Path, Path, str]:
    """A copy of one of `adapters` (chosen by `rng`) in `folder`, one mutation applied: (which, the folder, the
    files' folder that was damaged (a named adapter's subfolder, most often, for "second"), what the mutation did)."""
    which = rng.choice(sorted(adapters))
    source, adapter_name, _ = adapters[which]
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder, symlinks=True)
    files = folder / "second" if adapter_name == "second" and rng.random() < 0.7 else folder
    return which, folder, files, rng.choice(MUTATIONS)(files, rng)


def test_fuzz_load(tmp_path):
    torch.set_num_threads(1)
    adapters = _adapters(tmp_path / "valid")
    counts = {"cases": 0, "clean errors": 0, "loads": 0, "bad": 0}
    by_kind: dict[str, list[int]] = {}
    bad: list[str] = []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(CASES):
            rng = random.Random(f"{SEED}-{case}")
            which, folder, files, kind = damaged_copy(adapters, rng, tmp_path / "case")
            _, adapter_name, model = adapters[which]
            kwargs = rng.choice([{}, {}, {}, {"strict": False}, {"resize": False}, {"check_base": "warn"},
                                 {"check_base": "off"}, {"allow_base_overwrite": True}])
            fresh = copy.deepcopy(model)
            before = _record(fresh)
            label = f"case {case} ({which}, {kind}, {kwargs})"
            counts["cases"] += 1
            outcome = "load"
            signal.alarm(CASE_SECONDS)
            try:
                ak.load(fresh, folder, name=adapter_name, **kwargs)
            except ak.AdapterError as exc:
                outcome = "error"
                problems = _differences(fresh, before)
                if problems:
                    bad.append(f"{label}: {type(exc).__name__} but the model changed: {problems[:3]}")
                elif str(folder) not in str(exc):
                    bad.append(f"{label}: the message does not name the file: {exc}")
            except Hang:
                outcome = "hang"
                bad.append(f"{label}: no answer within {CASE_SECONDS} s")
            except Exception as exc:  # noqa: BLE001 - any other exception is what this test looks for
                outcome = "raw"
                bad.append(f"{label}: raw {type(exc).__name__}: {str(exc)[:200]}")
            finally:
                signal.alarm(0)
            if outcome == "load":
                try:
                    with torch.no_grad():
                        out = fresh(input_ids=IDS).logits
                    if not torch.isfinite(out).all():
                        bad.append(f"{label}: loaded, but the logits are not finite")
                except Exception as exc:  # noqa: BLE001 - a loaded model that cannot run is a bad case too
                    bad.append(f"{label}: loaded, but the forward raised {type(exc).__name__}: {str(exc)[:200]}")
                if adapter_state(fresh) is None or adapter_name not in ak.adapters(fresh):
                    bad.append(f"{label}: loaded, but no adapter {adapter_name!r} is attached")
            counts["clean errors" if outcome == "error" else "loads" if outcome == "load" else "bad"] += 1
            by_kind.setdefault(kind.split(":")[0], [0, 0])[outcome != "load"] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    counts["bad"] = len(bad)
    print(f"\nfuzz seed {SEED}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("by mutation (loads, errors): " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(by_kind.items())))
    assert not bad, f"{len(bad)} bad case(s) of {counts['cases']}:\n" + "\n".join(bad[:40])
    assert counts["cases"] >= min(CASES, 1000) and counts["clean errors"] > 0 and counts["loads"] > 0
