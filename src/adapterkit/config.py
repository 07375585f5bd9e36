"""The configuration every adapter method shares: targeting fields, PEFT's bookkeeping keys, checked types, JSON.

`AdapterConfig` holds what PEFT's configs have in common (`target_modules`, `exclude_modules`, `modules_to_save`,
`layers_to_transform`, `task_type`, ...). Each method subclasses it in its own file in `methods/` with PEFT's keys and
defaults, and names each field's JSON type in `FIELD_TYPES`; values are checked against them, never coerced (a string
is not a bool, "16" is not a number). Keys of a newer PEFT are kept and written back; known features adapterkit does
not implement are refused (`UNSUPPORTED_WHEN_SET`), since ignoring them would give other outputs.

Which `peft_type` maps to which subclass is the method table's business (`methods/__init__.py`), not this file's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

try:  # the regex parser, to refuse nested unbounded repeats (exponential backtracking) before matching
    import re._parser as _regex_parser  # Python >= 3.11
except ImportError:  # pragma: no cover - older Pythons
    import sre_parse as _regex_parser  # type: ignore[no-redef]

# Bounds no real adapter reaches, so a damaged or hostile file is refused before anything is allocated.
MAX_RANK = 16384
MAX_ALPHA = 1e6  # |lora_alpha| and the like: scaling numerators (real ones are at most a few times the rank)
MAX_PATTERN_CHARS = 10_000  # one regex or module name
MAX_LIST_ITEMS = 200_000  # target names, token indices, pattern entries
MAX_CONFIG_BYTES = 16 * 2**20  # an adapter_config.json
MAX_JSON_DEPTH = 32

# Default `target_modules` per `config.model_type` when the user gives none (the same choices PEFT makes for LoRA).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
}

# -- field types ---------------------------------------------------------------------------------------------------
# The JSON shapes PEFT writes. Each name is checked by `_TYPE_CHECKS`; "?" at the end admits None.
_NUMBER = (int, float)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, _NUMBER) and not isinstance(v, bool) and math.isfinite(v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple, set)) and len(v) <= MAX_LIST_ITEMS and all(isinstance(s, str) for s in v)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) <= MAX_LIST_ITEMS and all(_is_int(i) for i in v)


_TYPE_CHECKS: dict[str, tuple[Any, str]] = {
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str_list": (_is_str_list, "a list of strings"),
    "str_or_list": (lambda v: isinstance(v, str) or _is_str_list(v), "a string (regex) or a list of strings"),
    "int_or_list": (lambda v: _is_int(v) or _is_int_list(v), "an integer or a list of integers"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "any": (lambda v: True, "anything"),
}


def check_type(owner: str, key: str, value: Any, kind: str) -> None:
    """Raise ConfigError unless `value` has the JSON shape `kind` (see _TYPE_CHECKS; a trailing '?' admits None)."""
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if value is None and optional:
        return
    test, wanted = _TYPE_CHECKS[base]
    if not test(value):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ConfigError(
            f"{owner}: {key} must be {wanted}{' or null' if optional else ''}, got {shown} ({type(value).__name__})."
        )


def check_pattern_dict(owner: str, key: str, patterns: dict, valid, wanted: str) -> None:
    """A {module regex: value} field (rank_pattern, alpha_pattern): bounded in size, each key a valid regex in the
    form `pattern_value` matches it with, each value passing `valid` (described by `wanted` in the error)."""
    if len(patterns) > MAX_LIST_ITEMS:
        raise ConfigError(f"{owner}: {key} has {len(patterns):,} entries; at most {MAX_LIST_ITEMS:,} are accepted.")
    for pattern, value in patterns.items():
        if not isinstance(pattern, str):
            raise ConfigError(f"{owner}: {key} keys must be module-name patterns (strings), got {pattern!r}.")
        check_pattern(owner, f"{key} key", pattern, r"(.*\.)?({})$")  # as pattern_value uses it
        if not valid(value):
            raise ConfigError(f"{owner}: {key}[{pattern!r}] must be {wanted}, got {value!r}.")


def check_pattern(owner: str, key: str, text: str, wrap: str = "{}") -> re.Pattern:
    """Compile a regex from a config, refusing oversized, invalid or exponential ones with a message naming the key.

    wrap: the form the pattern is used in (e.g. PEFT's `(.*\\.)?({})$` for rank_pattern keys), compiled as such so a
    pattern valid alone but not in context (a group reference) fails here, not halfway through `attach`.
    """
    if len(text) > MAX_PATTERN_CHARS:
        raise ConfigError(
            f"{owner}: {key} is a regex of {len(text):,} characters; adapterkit accepts up to {MAX_PATTERN_CHARS:,}. "
            "Use a list of module names instead."
        )
    try:
        compiled = re.compile(wrap.format(text))
        tree = _regex_parser.parse(text)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise ConfigError(f"{owner}: {key} {text[:60]!r} is not a valid regular expression ({exc}).") from exc
    if _nested_repeat(tree, 0):
        raise ConfigError(
            f"{owner}: {key} {text[:60]!r} repeats a repeated group (like '(a+)+'), which can take exponential time "
            "to match; write it without the nested repetition."
        )
    return compiled


_REPEATS = {_regex_parser.MAX_REPEAT, _regex_parser.MIN_REPEAT, getattr(_regex_parser, "POSSESSIVE_REPEAT", None)}


def _nested_repeat(items: Any, depth: int) -> bool:
    """Whether a parsed regex holds an unbounded repeat inside another repeat (star height > 1)."""
    for op, arg in items:
        if op in _REPEATS:
            low, high, sub = arg
            unbounded = high == _regex_parser.MAXREPEAT or high > 64
            if unbounded and depth > 0:
                return True
            if _nested_repeat(sub, depth + (1 if unbounded else 0)):
                return True
        elif op == _regex_parser.SUBPATTERN:
            if _nested_repeat(arg[-1], depth):
                return True
        elif op == _regex_parser.BRANCH:
            if any(_nested_repeat(branch, depth) for branch in arg[1]):
                return True
        elif op in (_regex_parser.ASSERT, _regex_parser.ASSERT_NOT):
            if _nested_repeat(arg[1], depth):
                return True
    return False


@dataclass
class AdapterConfig:
    """Fields every PEFT adapter config has. Subclasses add their method's fields, with PEFT's names and defaults."""

    target_modules: list[str] | str | None = None  # list: exact path or ".name" suffix; str: regex fullmatch
    exclude_modules: list[str] | str | None = None  # same matching rules, applied first
    modules_to_save: list[str] | None = None  # whole modules trained and saved as full copies
    layers_to_transform: list[int] | int | None = None  # only these layer indices
    layers_pattern: list[str] | str | None = None  # name of the layer list, e.g. "layers" or "h"
    task_type: str | None = None
    peft_type: str = ""
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    # Keys of a newer PEFT that adapterkit does not know: kept, written back, and reported on load.
    unknown_keys: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Known PEFT keys that carry nothing for adapterkit, preserved verbatim.
    passthrough: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    PEFT_TYPE: ClassVar[str] = ""
    # JSON type of each field (names in _TYPE_CHECKS); subclasses extend it with their own fields.
    FIELD_TYPES: ClassVar[dict[str, str]] = {
        "target_modules": "str_or_list?",
        "exclude_modules": "str_or_list?",
        "modules_to_save": "str_list?",
        "layers_to_transform": "int_or_list?",
        "layers_pattern": "str_or_list?",
        "task_type": "str?",
        "peft_type": "str",
        "base_model_name_or_path": "str?",
        "revision": "str?",
        "inference_mode": "bool",
    }
    # PEFT keys whose feature adapterkit does not implement: refused when set to anything but their "off" value.
    UNSUPPORTED_WHEN_SET: ClassVar[dict[str, Any]] = {}
    # PEFT keys that carry no behaviour for adapterkit; accepted with any value and written back unchanged.
    PASSTHROUGH_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"megatron_core", "auto_mapping", "peft_version", "runtime_config"}
    )
    # {module regex: value} fields (rank_pattern, alpha_pattern): JSON null means {}; keys checked by check_pattern_dict.
    PATTERN_DICT_KEYS: ClassVar[tuple[str, ...]] = ()
    # Optional keys written only when set, so older PEFT versions read the file.
    OMIT_WHEN_EMPTY: ClassVar[frozenset[str]] = frozenset({"exclude_modules"})

    def __post_init__(self) -> None:
        if not self.peft_type:
            self.peft_type = self.PEFT_TYPE
        self.validate()

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Types of every field, then the shared targeting rules; subclasses call super() and add their own."""
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        for key, kind in self.FIELD_TYPES.items():
            check_type(self.name, key, getattr(self, key), kind)
        if str(self.peft_type).upper() != self.PEFT_TYPE:
            raise ConfigError(f"{self.name} got peft_type={self.peft_type!r}; expected {self.PEFT_TYPE!r}.")
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, str):
                check_pattern(self.name, key, value)
            elif value is not None and any(len(v) > MAX_PATTERN_CHARS for v in value):
                raise ConfigError(f"{self.name}: {key} holds a name over {MAX_PATTERN_CHARS:,} characters.")
        # Each is used inside a larger regex (targeting.py); compiled in that form so it cannot fail later.
        layers_pattern = self.layers_pattern
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or ():
            check_pattern(self.name, "layers_pattern", pattern, r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")
        for name in self.modules_to_save or ():
            check_pattern(self.name, "modules_to_save", name, r"(^|.*\.){}($|\..*)")
        layers = self.layers_to_transform
        if layers is not None and any(i < 0 for i in ([layers] if isinstance(layers, int) else layers)):
            raise ConfigError(f"{self.name}: layers_to_transform must hold non-negative layer indices, got {layers!r}.")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is only used together with layers_to_transform; set both or neither.")

    # -- what layers read -------------------------------------------------------------------------------------
    def pattern_value(self, patterns: dict[str, Any], module_path: str, default: Any) -> Any:
        """PEFT's per-module pattern rule: the first key K with `(.*\\.)?(K)$` matching the module path wins."""
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module_path):
                return value
        return default

    # -- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("unknown_keys", "passthrough"):
                continue
            value = getattr(self, f.name)
            if f.name in self.OMIT_WHEN_EMPTY and not value:
                continue
            if isinstance(value, (set, tuple)):
                value = sorted(value)
            out[f.name] = value
        out.update(self.passthrough)
        out.update(self.unknown_keys)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"an adapter config must be a JSON object, got {type(data).__name__}.")
        peft_type = data.get("peft_type", cls.PEFT_TYPE)
        if not isinstance(peft_type, str) or peft_type.upper() != cls.PEFT_TYPE:
            raise ConfigError(f"{cls.__name__} reads peft_type {cls.PEFT_TYPE!r}, the file says {peft_type!r}.")
        names = {f.name for f in dataclasses.fields(cls)} - {"unknown_keys", "passthrough"}
        kwargs: dict[str, Any] = {}
        unknown: dict[str, Any] = {}
        passthrough: dict[str, Any] = {}
        for key, value in data.items():
            if key in cls.UNSUPPORTED_WHEN_SET:
                if value not in (cls.UNSUPPORTED_WHEN_SET[key], None, {}, [], False):
                    raise ConfigError(
                        f"this adapter uses {key}={_short(value)}, a PEFT feature adapterkit does not support yet; "
                        "loading it without that feature would give different outputs."
                    )
                continue
            if key in cls.PASSTHROUGH_KEYS:
                passthrough[key] = value
            elif key in names:
                kwargs[key] = value
            else:
                unknown[key] = value
        kwargs["peft_type"] = cls.PEFT_TYPE
        cls._normalise(kwargs)
        cfg = cls(**kwargs)
        cfg.unknown_keys = unknown
        cfg.passthrough = passthrough
        return cfg

    @classmethod
    def _normalise(cls, kwargs: dict[str, Any]) -> None:
        """JSON spellings PEFT writes that mean a field's default (null for an empty pattern dict, ...)."""
        if isinstance(kwargs.get("target_modules"), (set, tuple)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        for key in cls.PATTERN_DICT_KEYS:
            if kwargs.get(key) is None:
                kwargs[key] = {}

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "AdapterConfig":
        return cls.from_dict(read_json(path))

    def with_auto_mapping(self, model_class: type) -> "AdapterConfig":
        """A copy carrying PEFT's `auto_mapping` (the base model's class and module), which PEFT's AutoPeftModel
        classes need to rebuild the base when `task_type` is unset. A mapping the config already has is kept."""
        new = self.replace()
        new.passthrough.setdefault(
            "auto_mapping", {"base_model_class": model_class.__name__, "parent_library": model_class.__module__}
        )
        return new

    def replace(self, **changes: Any) -> "AdapterConfig":
        new = dataclasses.replace(self, **changes)
        new.unknown_keys = dict(self.unknown_keys)
        new.passthrough = dict(self.passthrough)
        return new


def read_json(path: str | os.PathLike) -> Any:
    """An adapter_config.json, parsed within bounds; every failure a ConfigError naming the file."""
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {size:,} bytes; an adapter config is at most {MAX_CONFIG_BYTES:,}.")
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path} could not be read: {exc.strerror or exc}.") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): not an adapter config.") from exc
    return parse_json(text, str(path))


def parse_json(text: str, where: str, max_chars: int = MAX_CONFIG_BYTES) -> Any:
    """JSON text parsed within bounds (size, nesting depth, no repeated keys); ConfigError naming
    `where` otherwise. Used for adapter configs and for the JSON entries of a weights file's header metadata."""
    if len(text) > max_chars:
        raise ConfigError(f"{where} is {len(text):,} characters of JSON; at most {max_chars:,} are accepted.")
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ConfigError(f"{where} nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted.")
    try:
        return json.loads(text, object_pairs_hook=_no_repeated_keys)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from exc


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice[:60]!r} appears twice in one object")
    return out


def _max_depth(text: str) -> int:
    """Bracket nesting depth outside strings (linear; run before json.loads so a deep file cannot recurse).

    Counted first over every bracket (fast); only when that exceeds the bound are strings left out, so brackets in
    a regex string do not count. (A bound missed that way still ends in json.loads' RecursionError, caught.)
    """
    quick = _depth(text)
    return quick if quick <= MAX_JSON_DEPTH else _depth(_STRING.sub("", text))


def _depth(text: str) -> int:
    depth = best = 0
    for match in _BRACKET.finditer(text):
        depth += 1 if match.group() in "[{" else -1
        best = max(best, depth)
    return best


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
