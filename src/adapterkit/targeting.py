"""Which modules of a model get adapters, by PEFT's matching rules.

A string target is a regex `fullmatch` on the module path; a list matches an exact path or a `.name` suffix;
"all-linear" means every linear layer except the output head. `exclude_modules` and `layers_to_transform` filter.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from .base_layers import is_linear, view_of
from .config import DEFAULT_TARGETS, AdapterConfig
from .errors import TargetError
from .methods import Method
from .methods.base import AdapterWrapper
from .methods.lora_param import targeted_names
from .methods.trainable_tokens import TiedTokensHead, TrainableTokens
from .structure import base_of, embeddings, iter_modules, output_head, path_of, sample_leaf_names

ALL_LINEAR = "all-linear"


def _in_list_or_suffix(targets: list[str], key: str) -> bool:
    """`key in targets or key.endswith("." + t)` for some t, in O(path depth): an expanded all-linear list is long."""
    wanted = targets if isinstance(targets, (set, frozenset)) else set(targets)
    if key in wanted:
        return True
    dot = key.find(".")
    while dot != -1:
        if key[dot + 1 :] in wanted:
            return True
        dot = key.find(".", dot + 1)
    return False


def _layer_index(cfg: AdapterConfig, key: str) -> int | None:
    patterns = cfg.layers_pattern
    if not patterns:
        # The first numbered path segment is the layer index (not a nested one such as an expert index).
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def matches_modules_to_save(cfg: AdapterConfig, key: str) -> bool:
    # PEFT's rule for modules_to_save is a plain string suffix.
    return bool(cfg.modules_to_save) and any(key.endswith(m) for m in cfg.modules_to_save)


def target_matcher(cfg: AdapterConfig) -> Callable[[str], bool]:
    """Whether the module at a path gets an adapter under `cfg` (targets already expanded), with the patterns compiled
    once: it is asked of every module of the model."""
    exclude = cfg.exclude_modules
    exclude_regex = re.compile(exclude) if isinstance(exclude, str) else None
    excluded = set(exclude or ()) if not isinstance(exclude, str) else set()
    saved = [re.compile(rf"(^|.*\.){m}($|\..*)") for m in cfg.modules_to_save or ()]
    targets = cfg.target_modules
    target_regex = re.compile(targets) if isinstance(targets, str) else None
    wanted = set(targets or ()) if not isinstance(targets, str) else set()

    def matches(key: str) -> bool:
        if exclude_regex is not None and exclude_regex.fullmatch(key):
            return False
        if excluded and _in_list_or_suffix(excluded, key):
            return False
        if any(regex.match(key) for regex in saved):
            return False  # a module trained as a full copy never also gets LoRA
        if target_regex is not None:
            return target_regex.fullmatch(key) is not None
        if key in wanted:
            return True  # named exactly: PEFT applies no layer filter to it
        return bool(wanted) and _in_list_or_suffix(wanted, key) and _layer_selected(cfg, key)

    return matches


def _layer_selected(cfg: AdapterConfig, key: str) -> bool:
    """`layers_to_transform` / `layers_pattern`: whether the module's layer index is one of the wanted ones."""
    wanted = cfg.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    index = _layer_index(cfg, key)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def expand_targets(
    model: nn.Module, cfg: AdapterConfig, modules: list[tuple[str, nn.Module]] | None = None
) -> AdapterConfig:
    """Resolve `all-linear` and a missing `target_modules` into the explicit form that is saved in the file.

    `modules`: `list(iter_modules(model))` when the caller already has it.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cfg = _expand_target_list(model, cfg, modules, model_type)
    # A method's own per-model defaults that depend on the resolved targets (IA3's feedforward_modules).
    resolve = getattr(cfg, "resolve_for_model", None)
    if resolve is not None:
        cfg = resolve(model_type, [name for name, _ in modules if name] if modules is not None else
                      [name for name, _ in iter_modules(model) if name])
    return cfg


def _expand_target_list(
    model: nn.Module, cfg: AdapterConfig, modules: list[tuple[str, nn.Module]] | None, model_type: str | None
) -> AdapterConfig:
    targets = cfg.target_modules
    if targets is None and not cfg.modules_to_save and not getattr(cfg, "target_parameters", None):
        defaults = getattr(cfg, "DEFAULT_TARGETS", DEFAULT_TARGETS)  # a method may carry its own (IA3 does)
        if model_type not in defaults:
            raise TargetError(
                "target_modules is not set and there is no default for this model "
                f"(model_type={model_type!r}); pass e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'."
            )
        return cfg.replace(target_modules=list(defaults[model_type]))
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = output_head(model)
        # Full paths, as PEFT saves them. PEFT applies no layer filter to a path named exactly, so the filter is
        # applied here, while expanding: the saved list then holds only the chosen layers and reloads the same.
        names = []
        for name, module in modules if modules is not None else iter_modules(model):
            base = base_of(module)
            if name and head not in (module, base) and is_linear(base) and _layer_selected(cfg, name):
                names.append(name)
        names.sort()
        return cfg.replace(target_modules=names)
    return cfg


def find_targets(
    model: nn.Module, cfg: AdapterConfig, method: Method, modules: list[tuple[str, nn.Module]] | None = None
) -> list[tuple[str, nn.Module, type[AdapterWrapper]]]:
    """(path, module, wrapper class) for every module that gets the method's layer; raises TargetError when nothing
    matches, a match is a layer type the method cannot adapt, or it already carries another method's layer.

    `modules`: `list(iter_modules(model))` when the caller already has it.
    """
    matches = target_matcher(cfg)
    found = []
    for name, module in modules if modules is not None else iter_modules(model):
        if not name or not matches(name):
            continue
        base = base_of(module)
        view = view_of(base)
        layer = method.layer_for(view.kind) if view is not None else None
        if layer is None:
            raise TargetError(
                f"target_modules matched {name!r}, a {type(base).__name__}; {method.peft_type} applies to "
                f"{method.kinds()} layers. Narrow the pattern (e.g. {name}.q_proj)."
            )
        reason = layer.refuses(base)
        if reason:
            raise TargetError(f"{name!r}: {reason}")
        if isinstance(module, AdapterWrapper) and type(module) is not layer:
            raise TargetError(
                f"{name!r} already carries a {module.method} adapter ({sorted(module.adapter_names)}); adapterkit "
                f"does not put a second method ({method.peft_type}) on the same layer. Target other modules or "
                "delete the existing adapter first."
            )
        found.append((name, module, layer))
    found += find_parameter_targets(model, cfg, method, modules, {p for p, _, _ in found})
    if not found and cfg.target_modules:
        filtered = _filtered_out(cfg, modules if modules is not None else list(iter_modules(model)))
        raise TargetError(
            f"target_modules={_short(cfg.target_modules)} " + (
                f"matches {filtered}" if filtered else f"matched no module of {type(model).__name__}. Module names "
                f"that exist include: {', '.join(sample_leaf_names(model))}.")
        )
    return found


_FILTERS = ("exclude_modules", "modules_to_save", "layers_to_transform")


def _filtered_out(cfg: AdapterConfig, modules: list[tuple[str, nn.Module]]) -> str:
    """When target_modules alone matches modules that a filter then removed: which filter, and an example ("" when
    target_modules matches nothing by itself)."""
    unfiltered = target_matcher(cfg.replace(**{key: None for key in _FILTERS}))
    hits = [name for name, _ in modules if name and unfiltered(name)]
    if not hits:
        return ""
    culprits = [key for key in _FILTERS if getattr(cfg, key) not in (None, [])
                and not any(target_matcher(cfg.replace(**{key: None}))(name) for name in hits)]
    culprits = culprits or [key for key in _FILTERS if getattr(cfg, key) not in (None, [])]  # only together
    named = " and ".join(f"{key}={_short(getattr(cfg, key))}" for key in culprits)
    why = (" (a module in modules_to_save is trained as a full copy and never also gets an adapter)"
           if "modules_to_save" in culprits else "")
    return f"{len(hits)} module(s) (e.g. {hits[0]}), but {named} leaves none of them{why}."


def find_parameter_targets(
    model: nn.Module, cfg: AdapterConfig, method: Method, modules, taken: set[str]
) -> list[tuple[str, nn.Module, type[AdapterWrapper]]]:
    """(path, module, wrapper class) for modules owning parameters named by `target_parameters` (LoRA on bare
    parameters, e.g. fused MoE experts); every name must match some parameter."""
    wanted = getattr(cfg, "target_parameters", None)
    if not wanted:
        return []
    layer = method.layer_for("parameter")
    if layer is None:
        raise TargetError(f"target_parameters is set, but {method.peft_type} cannot adapt bare parameters.")
    found, matched = [], set()
    for name, module in modules if modules is not None else iter_modules(model):
        names = targeted_names(name, base_of(module), wanted) if name else []
        if not names:
            continue
        if name in taken or (isinstance(module, AdapterWrapper) and type(module) is not layer):
            raise TargetError(f"{name!r} is targeted both as a module and by target_parameters ({names}); "
                              "choose one.")
        matched |= {t for t in wanted for n in names if f"{name}.{n}" == t or f"{name}.{n}".endswith("." + t)}
        found.append((name, module, layer))
    missing = sorted(set(wanted) - matched)
    if missing:
        raise TargetError(f"target_parameters {missing} matched no parameter of {type(model).__name__}; name them "
                          "as '<module>.<parameter>' (e.g. 'mlp.experts.gate_up_proj').")
    return found


def find_modules_to_save(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Module]]:
    if not cfg.modules_to_save:
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in iter_modules(model):
        if not name or not matches_modules_to_save(cfg, name):
            continue
        if any(name.startswith(parent + ".") for parent, _ in found):
            continue  # the enclosing module is already copied whole
        if isinstance(module, AdapterWrapper) and module.method != "modules_to_save":
            raise TargetError(f"{name!r} already carries a {module.method} adapter; it cannot also be in modules_to_save.")
        found.append((name, module))
    if not found:
        raise TargetError(
            f"modules_to_save={cfg.modules_to_save} matched no module of {type(model).__name__}. "
            f"Module names that exist include: {', '.join(sample_leaf_names(model))}."
        )
    return found


def find_token_targets(
    model: nn.Module, cfg: AdapterConfig, taken: set[str]
) -> list[tuple[str, nn.Module, list[int], list[str]]]:
    """(embedding path, module, row indices, paths of heads tied to it) for LoRA's `trainable_token_indices`.

    A list targets the model's input embedding; a dict maps module names (exact path or ".name" suffix) to indices.
    A head whose weight is the embedding's tensor follows the embedding and may be named with the same indices.
    Raises TargetError before anything is changed.
    """
    spec = getattr(cfg, "trainable_token_indices", None)
    if spec is None:
        return []
    if isinstance(spec, dict):
        groups = {key: list(v) for key, v in spec.items()}
    else:
        path = path_of(model, embeddings(model)[0])
        if path is None:
            path = next((n for n, _ in iter_modules(model) if n.endswith("embed_tokens")), None)
        if path is None:
            raise TargetError(
                "trainable_token_indices is a list, which means the input embedding, but this model reports none; "
                "pass a dict such as {'embed_tokens': [...]} naming the embedding module."
            )
        groups = {path: list(spec)}
    modules = [(n, m) for n, m in iter_modules(model) if n]
    leaders: list[tuple[str, nn.Module, list[int], list[str]]] = []
    pending: list[tuple[str, nn.Module, list[int]]] = []
    for key, indices in groups.items():
        matched = [(n, m) for n, m in modules if n == key or n.endswith(f".{key}")]
        if not matched:
            raise TargetError(f"trainable_token_indices names {key!r}, which matches no module of {type(model).__name__}.")
        for path, module in matched:
            if path in taken:
                raise TargetError(
                    f"{path!r} is targeted by trainable_token_indices and also by target_modules or modules_to_save; "
                    "choose one way to train it."
                )
            base = base_of(module)
            other_method = isinstance(module, AdapterWrapper) and not isinstance(module, TrainableTokens)
            if isinstance(base, nn.Embedding) and not other_method:
                rows = base.weight.shape[0]
                too_big = [i for i in indices if i >= rows]
                if too_big:
                    raise TargetError(
                        f"trainable_token_indices for {path!r} include {too_big[:5]} but the embedding has {rows} rows. "
                        "Add the tokens first: adapterkit.vocab.add_tokens(model, tokenizer, tokens) or "
                        "model.resize_token_embeddings(len(tokenizer))."
                    )
                leaders.append((path, module, indices, []))
            else:
                pending.append((path, module, indices))
    weights = {id(base_of(entry[1]).weight): entry for entry in leaders}
    for path, module, indices in pending:
        leader = weights.get(id(getattr(base_of(module), "weight", None)))
        if leader is None or leader[2] != indices:
            raise TargetError(
                f"trainable_token_indices names {path!r}, a {type(base_of(module)).__name__}; adapterkit trains token "
                "rows of nn.Embedding tables (a head tied to the embedding follows it with the same indices)."
            )
    for entry in leaders:
        weight = base_of(entry[1]).weight
        for path, module in modules:
            if path == entry[0] or getattr(base_of(module), "weight", None) is not weight:
                continue
            if (isinstance(module, AdapterWrapper) and not isinstance(module, TiedTokensHead)) or path in taken:
                raise TargetError(
                    f"{path!r} shares its weight with {entry[0]!r} (tied), whose token rows are trained; it cannot also "
                    "carry LoRA or a modules_to_save copy. Drop it from target_modules / modules_to_save."
                )
            entry[3].append(path)
    return leaders


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
