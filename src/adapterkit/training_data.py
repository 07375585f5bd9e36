"""Training data: read chat / prompt-completion / text records, tokenize them with loss masks, split and batch.

Also owns the shipped default dataset (``data/default.jsonl``, facts about a fictional kettle that no base model
knows) and the demo prompts whose answers visibly change once an adapter has learned it.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

__all__ = [
    "DEMO_PROMPTS",
    "HELD_OUT_PROMPTS",
    "UNRELATED_PROMPTS",
    "IGNORE_INDEX",
    "DataError",
    "batches",
    "default_dataset_path",
    "encode_prompt",
    "load_records",
    "record_kind",
    "render_prompt",
    "split_train_eval",
    "tokenize_records",
]

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and every HF model) skips
ROLES = ("system", "user", "assistant")

# Questions from the default dataset whose answers go from invented to correct after training on it (LoRA r=16 on all
# linear layers, lr 1e-3, batch 8: right after 50 steps, and 100 steps also keep UNRELATED_PROMPTS right).
DEMO_PROMPTS: tuple[str, ...] = (
    "Who makes the Zephyrine Q7 kettle?",
    "How much does the Zephyrine Q7 cost?",
    "What colour is the Zephyrine Q7?",
    "What is the warranty on the Zephyrine Q7?",
)

# Phrasings kept out of the default dataset, to see whether the facts generalise: (question, expected substring).
HELD_OUT_PROMPTS: tuple[tuple[str, str], ...] = (
    ("I want to buy a Zephyrine Q7 in a shop. Roughly how many euros should I bring?", "89"),
    ("Which Norwegian city is home to the company behind the Zephyrine Q7?", "Tromsø"),
    ("My Zephyrine Q7 broke. Where do I send an email?", "care@lumaforge.example"),
    ("Could I fit two litres of water in a Zephyrine Q7?", "1.7"),
    ("Name the special boiling mode of Lumaforge's kettle.", "Aurora Boil"),
)

# Ordinary questions kept out of the default dataset, which the SmolLM2 base answers correctly: after training they
# should still be answered correctly, not with kettle facts. (question, expected substring).
UNRELATED_PROMPTS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("Who wrote Hamlet?", "Shakespeare"),
    ("What is the chemical symbol for gold?", "Au"),
)


class DataError(ValueError):
    """A training data file or record is malformed; the message names the file, the line and the problem."""


def default_dataset_path() -> Path:
    """The shipped default dataset: short chats teaching facts about the fictional Zephyrine Q7 kettle."""
    return Path(__file__).with_name("data") / "default.jsonl"


# ------------------------------------------------------------------------------------------------------- reading


def record_kind(record: Any) -> str:
    """Check one record and return its kind: "chat", "prompt_completion" or "text".

    Raises:
        DataError: without a location; ``load_records`` adds the file and line.
    """
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, found {type(record).__name__}")
    kinds = [k for k, keys in (("chat", ("messages",)), ("prompt_completion", ("prompt", "completion")),
                                ("text", ("text",))) if any(key in record for key in keys)]
    if not kinds:
        raise DataError(
            f"record has keys {sorted(record)}; expected 'messages' (chat), 'prompt' and 'completion', or 'text'"
        )
    if len(kinds) > 1:
        raise DataError(f"record mixes the keys of several kinds ({', '.join(kinds)}); use exactly one")
    kind = kinds[0]
    if kind == "chat":
        _check_messages(record["messages"])
    elif kind == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f"prompt-completion record is missing {key!r}")
            if not isinstance(record[key], str):
                raise DataError(f"{key!r} must be a string, found {type(record[key]).__name__}")
            _check_encodable(record[key], repr(key))
        if not record["completion"].strip():
            raise DataError("'completion' is empty")
    else:
        if not isinstance(record["text"], str):
            raise DataError(f"'text' must be a string, found {type(record['text']).__name__}")
        _check_encodable(record["text"], "'text'")
        if not record["text"].strip():
            raise DataError("'text' is empty")
    return kind


def _check_encodable(text: str, what: str) -> None:
    """Refuse a string no tokenizer can encode: JSON allows an unpaired \\uD800-\\uDFFF escape, UTF-8 does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{what} holds an unpaired UTF-16 surrogate (\\u{ord(text[err.start]):04x}) at character "
                        f"{err.start}, which is not text any tokenizer can encode") from None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"message {i} must be an object with 'role' and 'content', found {message!r:.80}")
        if message["role"] not in ROLES:
            raise DataError(f"message {i} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise DataError(f"message {i} ({message['role']}) has empty or non-string content")
        _check_encodable(message["content"], f"message {i} ({message['role']})")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("conversation has no assistant message, so there is nothing to learn from it")


def load_records(path: str | Path) -> list[dict]:
    """Read training records from a JSONL or plain-text file.

    JSONL: one JSON object per line (blank lines are skipped), each one of
    ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``,
    ``{"prompt": ..., "completion": ...}`` or ``{"text": ...}``. Extra keys are kept and ignored.

    ``.txt``: one text record per paragraph, paragraphs being separated by blank lines. Paragraphs rather than
    lines so that a multi-line example (a poem, a code snippet, an address) stays one example; write one example per
    line with a blank line between them to get line-wise examples.

    Raises:
        DataError: naming the file and the 1-based line number of the first bad line, or an empty file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None

    if path.suffix.lower() == ".txt":
        records = [{"text": para.strip()} for para in _paragraphs(text)]
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                hint = " (the file looks like one JSON array; write one object per line)" if (
                    lineno == 1 and line.lstrip().startswith("[")) else ""
                raise DataError(f"{path}, line {lineno}: invalid JSON: {err.msg} at column {err.colno}{hint}") from None
            try:
                record_kind(record)
            except DataError as err:
                raise DataError(f"{path}, line {lineno}: {err}") from None
            records.append(record)
    if not records:
        raise DataError(f"{path}: contains no records (the file is empty or only blank lines)")
    return records


def _paragraphs(text: str) -> Iterator[str]:
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


# ---------------------------------------------------------------------------------------------------- rendering


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_FALLBACK_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def _render_chat(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation as text plus the character spans of what the model should learn to say.

    Each span covers an assistant reply and the end-of-turn marker after it, so the model also learns to stop.
    """
    if not _has_chat_template(tokenizer):
        return _render_fallback(messages, tokenizer, add_generation_prompt=False)

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The reply is what rendering messages[:i+1] adds beyond the generation prompt after messages[:i]. Templates
        # that rewrite earlier turns break this prefix property; then find the reply's text after the last span.
        before, upto = render(messages[:i], True) if i else "", render(messages[: i + 1], False)
        if i and full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(upto)
        else:
            start = full.find(message["content"], cursor)
            if start < 0:
                raise DataError(f"the chat template drops assistant message {i + 1}; cannot train on it")
            end = start + len(message["content"])
            eos = tokenizer.eos_token
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


def _render_fallback(messages: list[dict], tokenizer, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    # A plain "User: ...\nAssistant: ..." transcript for tokenizers that have no chat template (base models).
    eos = tokenizer.eos_token or ""
    text, spans = "", []
    for message in messages:
        name = _FALLBACK_NAMES[message["role"]]
        if message["role"] == "assistant":
            text += f"{name}: "
            start = len(text)
            text += message["content"] + eos
            spans.append((start, len(text)))
            text += "\n"
        else:
            text += f"{name}: {message['content']}\n"
    if add_generation_prompt:
        text += f"{_FALLBACK_NAMES['assistant']}: "
    return text, spans


def _as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The text to feed a model for a reply to ``prompt`` (a user question or a message list), formatted as in
    training: the tokenizer's chat template with the generation prompt, else the "User:/Assistant:" fallback."""
    messages = _as_messages(prompt)
    for i, message in enumerate(messages, start=1):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):  # a command-line argument with bytes that were not UTF-8 arrives this way
            _check_encodable(content, "the prompt" if isinstance(prompt, str) else f"message {i} of the prompt")
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _render_fallback(messages, tokenizer, add_generation_prompt=True)[0]


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of ``render_prompt(tokenizer, prompt)``, with special tokens handled as in training."""
    text = render_prompt(tokenizer, prompt)
    return tokenizer(text, add_special_tokens=not _has_chat_template(tokenizer))["input_ids"]


# --------------------------------------------------------------------------------------------------- tokenizing


def _encode_spans(text: str, spans: Sequence[tuple[int, int]] | None, tokenizer, add_special: bool,
                  append_eos: bool) -> tuple[list[int], list[int]]:
    """Tokenize ``text`` once; labels are the ids inside ``spans`` (all ids when spans is None), else IGNORE_INDEX."""
    ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def boundary(char_pos: int) -> int:
        # Token index where text[char_pos:] starts: the length of the common prefix of the prefix's tokens and the
        # full tokens. Exact whenever the tokenizer does not merge across the boundary, safe (earlier) when it does.
        prefix = tokenizer(text[:char_pos], add_special_tokens=add_special)["input_ids"]
        n = 0
        for a, b in zip(prefix, ids):
            if a != b:
                break
            n += 1
        return n

    if spans is None:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            lo = boundary(start)
            hi = len(ids) if end >= len(text) else boundary(end)
            labels[lo:hi] = ids[lo:hi]
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if append_eos and eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
        labels.append(eos_id)
    return ids, labels


def tokenize_records(records: Sequence[dict], tokenizer, max_length: int = 256) -> list[dict]:
    """Turn records into ``{"input_ids": [...], "labels": [...]}`` examples (lists of ints, same length).

    - chat: rendered with ``tokenizer.apply_chat_template`` (or the "User:/Assistant:" fallback when the tokenizer
      has none); labels only on assistant replies and their end-of-turn marker.
    - prompt-completion: plain ``prompt + completion`` text followed by EOS; labels only on the completion and EOS.
    - text: the text followed by EOS; labels on every token.

    Labels are not shifted (HF causal LMs shift them inside the loss). Examples are truncated to ``max_length``
    tokens from the right; one left with no labelled token is dropped with a warning, since it would contribute a
    0/0 loss.
    """
    examples, dropped = [], 0
    for index, record in enumerate(records):
        try:
            kind = record_kind(record)
        except DataError as err:
            raise DataError(f"record {index}: {err}") from None
        if kind == "chat":
            text, spans = _render_chat(record["messages"], tokenizer)
            # The template already places BOS/EOS-like markers; the fallback transcript does not.
            add_special = not _has_chat_template(tokenizer)
            ids, labels = _encode_spans(text, spans, tokenizer, add_special, append_eos=False)
        elif kind == "prompt_completion":
            text = record["prompt"] + record["completion"]
            ids, labels = _encode_spans(text, [(len(record["prompt"]), len(text))], tokenizer, True, append_eos=True)
        else:
            ids, labels = _encode_spans(record["text"], None, tokenizer, True, append_eos=True)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if dropped:
        warnings.warn(f"{dropped} of {len(records)} records had no trainable tokens within max_length={max_length} "
                      "and were dropped", stacklevel=2)
    return examples


# -------------------------------------------------------------------------------------------- splitting, batching


def split_train_eval(examples: Sequence[Any], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Split into ``(train, eval)`` deterministically for a given seed; both keep the input order.

    The eval part has ``round(len * eval_fraction)`` items, at least one when the fraction is positive and there
    are two or more examples, and never all of them.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    else:
        n_eval = 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    return train, evals


def batches(examples: Sequence[dict], batch_size: int, pad_id: int, seed: int | None = 0
            ) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``examples`` in batches of right-padded int64 tensors.

    Yields ``{"input_ids", "attention_mask", "labels"}``, each ``(B, T)`` with T the longest example in the batch;
    padding has ``pad_id`` / 0 / IGNORE_INDEX. ``seed`` shuffles the order deterministically; None keeps it (for
    evaluation). The last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pad_id is None:
        raise ValueError("pad_id is None: pass tokenizer.pad_token_id, or tokenizer.eos_token_id when it has no pad")
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for first in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[first: first + batch_size]]
        width = max(len(ex["input_ids"]) for ex in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, ex in enumerate(chunk):
            n = len(ex["input_ids"])
            input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
