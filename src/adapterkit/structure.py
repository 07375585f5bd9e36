"""Model-structure helpers every other part reads: the module walk, wrappers' base layers, embeddings and ties.

A leaf of the package (it imports only the wrapper base class): targeting, vocabulary, the verbs and checkpoint code
all build on it. Ties are found by tensor identity (two module attributes holding the same Parameter object), never
by module names.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .methods.base import AdapterWrapper


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """`named_modules` (same order, duplicates included), but an adapter wrapper stands for its base layer: its
    insides are never candidates. Iterative, as it is walked several times per attach over ~1000 modules."""
    stack = [(prefix, model)]
    while stack:
        path, module = stack.pop()
        yield path, module
        if isinstance(module, AdapterWrapper):
            continue
        children = [
            (f"{path}.{name}" if path else name, child) for name, child in module._modules.items() if child is not None
        ]
        stack.extend(reversed(children))


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterWrapper) else module


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model
    for part in parent_path.split(".") if parent_path else ():
        parent = parent._modules[part]  # the path came from walking `_modules`; no attribute machinery needed
    setattr(parent, child, new)


def embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input embedding, output head) as the model reports them; None for a side the model does not have."""
    pair = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            pair.append(fn() if fn is not None else None)
        except (AttributeError, NotImplementedError):
            pair.append(None)
    return pair[0], pair[1]


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head module (transformers' `get_output_embeddings`), or None."""
    return embeddings(model)[1]


def path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    """The path of `target` (or of the wrapper around it) in `model`, or None."""
    if target is None:
        return None
    for name, module in iter_modules(model):
        if module is target or base_of(module) is target:
            return name
    return None


def output_head_path(model: nn.Module) -> str | None:
    return path_of(model, output_head(model))


def embeddings_tied(model: nn.Module) -> bool | None:
    """Whether the input and output embeddings share one weight tensor now (None when the model has no such pair)."""
    emb, head = embeddings(model)
    if emb is None or head is None:
        return None
    return emb.weight is head.weight


def find_ties(model: nn.Module) -> list[list[str]]:
    """Groups of parameter paths that are one tensor (by identity), e.g. [["model.embed_tokens.weight",
    "lm_head.weight"]]. Adapter wrappers are looked through, so a wrapped embedding reports its base path."""
    by_id: dict[int, list[str]] = {}
    for path, module in iter_modules(model):
        inner = base_of(module)
        for pname, param in inner._parameters.items():
            if param is not None:
                by_id.setdefault(id(param), []).append(f"{path}.{pname}" if path else pname)
    return [names for names in by_id.values() if len(names) > 1]


def shared_tensor_ids(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared


def sample_leaf_names(model: nn.Module, limit: int = 12) -> list[str]:
    """A few distinct last path components of leaf modules, to show the user what names exist."""
    seen: dict[str, None] = {}
    for name, module in iter_modules(model):
        if name and not any(True for _ in module.children()):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    names = list(seen)
    return names[:limit] + (["..."] if len(names) > limit else [])
