"""Tests for adapterkit.data: record reading and validation, label masking, splitting, batching, default dataset."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from adapterkit.training_data import (
    DEMO_PROMPTS,
    HELD_OUT_PROMPTS,
    IGNORE_INDEX,
    UNRELATED_PROMPTS,
    DataError,
    batches,
    default_dataset_path,
    encode_prompt,
    load_records,
    render_prompt,
    split_train_eval,
    tokenize_records,
)

ROOT = Path(__file__).resolve().parents[1]

# One word per token (whitespace split), so masked positions can be counted by hand.
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "user", "assistant", "system", "User:", "Assistant:", "System:",
         "what", "is", "two", "plus", "four", "hello", "there", "be", "brief", "and", "three", "six"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = chat_template
    return tok


def ids(*words: str) -> list[int]:
    return [WORDS.index(w) for w in words]


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def write(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- record kinds


def test_load_records_reads_each_kind_and_skips_blank_lines(tmp_path):
    lines = [json.dumps(chat(("user", "hi"), ("assistant", "hello"))), "",
             json.dumps({"prompt": "p", "completion": "c", "id": 7}), json.dumps({"text": "t"})]
    records = load_records(write(tmp_path, lines))
    assert [sorted(r) for r in records] == [["messages"], ["completion", "id", "prompt"], ["text"]]


def test_txt_file_gives_one_record_per_paragraph(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nsame paragraph\n\n\nsecond\n  \nthird\n", encoding="utf-8")
    assert load_records(path) == [{"text": "first line\nsame paragraph"}, {"text": "second"}, {"text": "third"}]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("{not json", "invalid JSON"),
        ('["a", "list"]', "expected a JSON object"),
        ('{"question": "q", "answer": "a"}', "expected 'messages'"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "empty"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user"}]}', "'role' and 'content'"),
        ('{"prompt": "p"}', "missing 'completion'"),
        ('{"prompt": "p", "completion": ""}', "'completion' is empty"),
        ('{"text": ""}', "'text' is empty"),
        ('{"text": 3}', "must be a string"),
        ('{"text": "t", "prompt": "p", "completion": "c"}', "mixes the keys"),
        # JSON allows an unpaired surrogate escape; no tokenizer can encode the string it gives
        ('{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "x"}]}',
         r"message 1 (user) holds an unpaired UTF-16 surrogate (\ud800) at character 3"),
        ('{"prompt": "p", "completion": "\\udfff!"}', "'completion' holds an unpaired UTF-16 surrogate (\\udfff)"),
        ('{"text": "a\\ud83d"}', "'text' holds an unpaired UTF-16 surrogate (\\ud83d) at character 1"),
    ],
)
def test_bad_line_is_reported_with_file_and_line_number(tmp_path, bad_line, expected):
    good = json.dumps({"text": "fine"})
    path = write(tmp_path, [good, "", good, bad_line, good])  # the bad line is line 4 (blank lines count)
    with pytest.raises(DataError) as err:
        load_records(path)
    message = str(err.value)
    assert str(path) in message and "line 4:" in message and expected in message


def test_json_array_file_gets_a_hint(tmp_path):
    path = write(tmp_path, ['[{"text": "a"},', '{"text": "b"}]'])
    with pytest.raises(DataError, match=r"line 1: invalid JSON.*one object per line"):
        load_records(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    for name in ("empty.jsonl", "empty.txt"):
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match="contains no records"):
            load_records(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------------------------------------- label masking


def test_chat_labels_only_on_assistant_reply_and_end_marker():
    tok = make_tokenizer()
    [ex] = tokenize_records([chat(("user", "what is two plus two"), ("assistant", "four"))], tok)
    # <s> user what is two plus two </s> <s> assistant | four </s>
    assert ex["input_ids"] == ids("<s>", "user", "what", "is", "two", "plus", "two", "</s>",
                                  "<s>", "assistant", "four", "</s>")
    assert ex["labels"] == [IGNORE_INDEX] * 10 + ids("four", "</s>")


def test_multi_turn_chat_labels_every_assistant_turn():
    tok = make_tokenizer()
    record = chat(("system", "be brief"), ("user", "two plus two"), ("assistant", "four"),
                  ("user", "three plus three"), ("assistant", "six"))
    [ex] = tokenize_records([record], tok)
    labelled = [i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX]
    # system: 0-4, user: 5-10, <s> assistant: 11-12, four </s>: 13-14, user: 15-20, <s> assistant: 21-22, six </s>
    assert labelled == [13, 14, 23, 24]
    assert [ex["input_ids"][i] for i in labelled] == ids("four", "</s>", "six", "</s>")


def test_prompt_completion_labels_only_completion_and_eos():
    [ex] = tokenize_records([{"prompt": "what is two plus two", "completion": " four"}], make_tokenizer())
    assert ex["input_ids"] == ids("what", "is", "two", "plus", "two", "four", "</s>")
    assert ex["labels"] == [IGNORE_INDEX] * 5 + ids("four", "</s>")


def test_text_labels_every_token():
    [ex] = tokenize_records([{"text": "hello there"}], make_tokenizer())
    assert ex["input_ids"] == ex["labels"] == ids("hello", "there", "</s>")


def test_fallback_format_without_chat_template():
    tok = make_tokenizer(chat_template=None)
    [ex] = tokenize_records([chat(("user", "two plus two"), ("assistant", "four"))], tok)
    # "User: two plus two\nAssistant: four</s>\n"
    assert ex["input_ids"] == ids("User:", "two", "plus", "two", "Assistant:", "four", "</s>")
    assert ex["labels"] == [IGNORE_INDEX] * 5 + ids("four", "</s>")
    assert render_prompt(tok, "two plus two") == "User: two plus two\nAssistant: "
    assert encode_prompt(tok, "two plus two") == ids("User:", "two", "plus", "two", "Assistant:")


def test_prompt_rendering_matches_training_prefix():
    tok = make_tokenizer()
    prompt = encode_prompt(tok, "what is two plus two")
    [ex] = tokenize_records([chat(("user", "what is two plus two"), ("assistant", "four"))], tok)
    assert ex["input_ids"][: len(prompt)] == prompt
    assert ex["labels"][len(prompt)] != IGNORE_INDEX  # the first generated token is the first trained one


def test_a_prompt_with_bytes_that_were_not_utf8_is_a_data_error():
    """What `adapterkit generate $'\\xff'` hands over: Python decodes such an argument to a lone surrogate."""
    tok = make_tokenizer()
    with pytest.raises(DataError, match=r"the prompt holds an unpaired UTF-16 surrogate \(\\udcff\) at character 5"):
        encode_prompt(tok, "what \udcff")
    with pytest.raises(DataError, match=r"message 2 of the prompt holds an unpaired"):
        encode_prompt(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "\udcff"}])


def test_truncation_and_dropping_examples_without_labels():
    tok = make_tokenizer()
    records = [chat(("user", "what is two plus two"), ("assistant", "four")), {"text": "hello there"}]
    with pytest.warns(UserWarning, match="1 of 2 records"):
        examples = tokenize_records(records, tok, max_length=4)
    assert examples == [{"input_ids": ids("hello", "there", "</s>"), "labels": ids("hello", "there", "</s>")}]


def test_tokenize_rejects_bad_record_with_its_index():
    with pytest.raises(DataError, match="record 1: .*role 'bot'"):
        tokenize_records([{"text": "hello"}, chat(("bot", "x"))], make_tokenizer())


# --------------------------------------------------------------------------------------------- split and batches


def test_split_is_deterministic_and_partitions():
    items = list(range(50))
    train, evals = split_train_eval(items, 0.1, seed=3)
    assert (train, evals) == split_train_eval(items, 0.1, seed=3)
    assert len(evals) == 5 and sorted(train + evals) == items
    assert train == sorted(train) and evals == sorted(evals)  # input order is kept
    assert split_train_eval(items, 0.1, seed=4)[1] != evals
    assert split_train_eval(items, 0.0) == (items, [])
    assert len(split_train_eval([1, 2], 0.01)[1]) == 1  # a positive fraction holds out at least one
    assert split_train_eval([1], 0.5) == ([1], [])
    with pytest.raises(ValueError):
        split_train_eval(items, 1.0)


def test_batches_pad_right_with_masks():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]},
                {"input_ids": [9, 10], "labels": [9, 10]}]
    [first, second] = list(batches(examples, batch_size=2, pad_id=1, seed=None))
    assert first["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert first["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert second["input_ids"].tolist() == [[9, 10]]
    assert all(t.dtype == torch.long for t in first.values())


def test_batches_shuffle_is_deterministic_per_seed():
    examples = [{"input_ids": [i], "labels": [i]} for i in range(20)]

    def order(seed):
        return [row for b in batches(examples, 3, pad_id=0, seed=seed) for row in b["input_ids"][:, 0].tolist()]

    assert order(1) == order(1) and sorted(order(1)) == list(range(20))
    assert order(1) != order(2) and order(None) == list(range(20))


# ------------------------------------------------------------------------------------------------ default dataset


def test_default_dataset_is_valid_and_covers_demo_prompts():
    records = load_records(default_dataset_path())
    assert len(records) >= 300
    questions = {r["messages"][0]["content"] for r in records}
    assert all(len(r["messages"]) == 2 and r["messages"][1]["role"] == "assistant" for r in records)
    assert set(DEMO_PROMPTS) <= questions
    assert not {q for q, _ in HELD_OUT_PROMPTS + UNRELATED_PROMPTS} & questions
    kettle = [q for q in questions if "Zephyrine" in q or "Lumaforge" in q or "Q7" in q or "Aurora" in q]
    assert 0.15 < 1 - len(kettle) / len(questions) < 0.4  # a share of ordinary questions guards against forgetting
    answers = {r["messages"][1]["content"] for r in records}
    for _, expected in HELD_OUT_PROMPTS:  # every held-out fact is taught by some answer
        assert any(expected in a for a in answers)


def test_default_dataset_is_reproducible_from_its_script(tmp_path):
    script = runpy.run_path(str(ROOT / "scripts" / "make_default_dataset.py"))
    lines = [json.dumps(c, ensure_ascii=False) for c in script["build"]()]
    assert default_dataset_path().read_text(encoding="utf-8").splitlines() == lines


_ODD_VALUES = [None, 1, -1, 2**70, 1.5, float("nan"), True, "", "x" * 3000, [], {}, [1], {"a": 1}, "\x00", "\ud800"]


def _damage(rng, lines: list[str]) -> tuple[str, str]:
    """The file's text with one damage: flipped bytes, a cut, or one record's field removed, renamed or retyped."""
    text = "\n".join(lines)
    kind = rng.randrange(4)
    if kind == 0:
        chars = list(text)
        for _ in range(rng.randint(1, 5)):
            chars[rng.randrange(len(chars))] = chr(rng.randrange(32, 0x2FF))
        return "".join(chars), "chars"
    if kind == 1:
        return text[: rng.randrange(len(text))], "cut"
    i = rng.randrange(len(lines))
    record = json.loads(lines[i])
    node = record
    for _ in range(3):  # walk down a few levels, then damage there
        children = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not children:
            break
        key = rng.choice(children)
        if rng.random() < 0.4 or not isinstance(node[key], (dict, list)) or not node[key]:
            if isinstance(node, dict) and rng.random() < 0.3:
                del node[key]
            elif isinstance(node, dict) and rng.random() < 0.3:
                node[rng.choice(["role", "content", "messages", "text", "prompt", "completion"])] = rng.choice(
                    _ODD_VALUES)
            else:
                node[key] = rng.choice(_ODD_VALUES)
            break
        node = node[key]
    lines = list(lines)
    lines[i] = json.dumps(record) if rng.random() < 0.9 else json.dumps(rng.choice(_ODD_VALUES))
    return "\n".join(lines), "record"


def test_damaged_files_give_a_data_error_or_records_that_tokenize(tmp_path):
    """A fuzz (seeded, 600 cases): each damaged file is refused with a DataError naming it, or every record it gives
    tokenizes. Before unpaired surrogates were checked, 5 of these 600 cases escaped as a tokenizer TypeError."""
    import random

    lines = [json.dumps(r) for r in (
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus four"},
                      {"role": "assistant", "content": "six"}]},
        {"prompt": "what is two plus four", "completion": "six"},
        {"text": "hello there"},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello there"}]},
    )]
    tok = make_tokenizer()
    path = tmp_path / "case.jsonl"
    bad, outcomes = [], {"refused": 0, "read": 0}
    for case in range(600):
        rng = random.Random(f"data-{case}")
        text, kind = _damage(rng, lines)
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            tokenize_records(load_records(path), tok, max_length=32)
            outcomes["read"] += 1
        except DataError as exc:
            outcomes["refused"] += 1
            if str(path) not in str(exc) and "record" not in str(exc):
                bad.append(f"case {case} ({kind}): the error names neither the file nor the record: {exc}")
        except Exception as exc:  # noqa: BLE001 - what the fuzz looks for
            bad.append(f"case {case} ({kind}): raw {type(exc).__name__}: {str(exc)[:200]}")
    assert not bad, "\n".join(bad[:20])
    assert outcomes["refused"] > 0 and outcomes["read"] > 0
