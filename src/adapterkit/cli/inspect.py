"""`adapterkit inspect`: what an adapter directory holds, read from disk alone (no base model is loaded).

The per-module update size is ||s·B·A||_F = s·sqrt(trace((BᵀB)(AAᵀ))): two r×r products, never the d×d delta.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

import typer

from .common import console, human_size, pyplot

_LAYER = re.compile(r"\.(\d+)\.")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)


def delta_norm(a, b, scaling: float) -> float:
    """Frobenius norm of scaling · B @ A for A (r, in) and B (out, r), without forming the (out, in) product."""
    import torch

    a, b = a.double(), b.double()
    gram = (b.T @ b) @ (a @ a.T)  # (r, r)
    return abs(scaling) * float(torch.trace(gram).clamp_min(0).sqrt())


def delta_norms(cfg, tensors: dict, problems: list[str] | None = None) -> dict[str, float]:
    """||ΔW||_F per adapted module path (LoRA linear and embedding pairs in the file). A pair that does not fit
    together (a damaged or edited file: A is (r, in), B is (out, r)) is left out and described in `problems`."""
    from ..checkpoint.format import strip_prefix
    from ..methods.summary import module_norms

    pairs: dict[str, dict] = defaultdict(dict)
    for key, value in tensors.items():
        inner = strip_prefix(key) or key
        for suffix, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                             (".lora_embedding_B", "B")):
            if inner.endswith(suffix):
                pairs[inner[: -len(suffix)]][role] = value

    def norm_of(path: str, pair: dict) -> float | None:
        if "A" not in pair or "B" not in pair:
            return None
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError("A is (r, in) and B (out, r); the ranks differ or a factor is not 2-D")
        return delta_norm(a, b, cfg.scaling_for(path))

    norms, found = module_norms(dict(sorted(pairs.items())), norm_of)
    if problems is not None:
        problems.extend(found)
    return norms


def method_rows(cfg, tensors: dict) -> list[tuple[str, str]]:
    """The method's own rows (its table entry's `summary` hook), else one line of its scalar config fields."""
    from ..methods import METHODS

    method = METHODS.get(str(cfg.peft_type).upper())
    if method is not None and method.summary is not None:
        return list(method.summary(cfg, tensors))
    return [("method", _method_text(cfg))]


def inspect_command(
    adapter: Path = typer.Argument(..., metavar="DIR", help="Adapter directory."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a heatmap of ||ΔW|| per module type × layer."),
    tensors_listed: bool = typer.Option(False, "--tensors", help="List every tensor of the file."),
) -> None:
    """Show an adapter's method, targets, rank, size, tensors, base fingerprint, vocabulary and ties."""
    from ..checkpoint import read_adapter
    from ..checkpoint.format import KEY_PREFIX, WEIGHTS_NAME
    from ..methods.summary import problem_rows

    folder, cfg, tensors, metadata = read_adapter(adapter)
    weights = folder / WEIGHTS_NAME
    size = weights.stat().st_size if weights.is_file() else 0
    # Tensors of the whole adapter (no module path: VeRA's frozen shared projections) are listed apart.
    shared = {k: t for k, t in tensors.items() if not k.startswith(KEY_PREFIX)}
    params = sum(t.numel() for k, t in tensors.items() if k not in shared)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    targets = cfg.target_modules
    containers = _container_names()
    modules = sorted({m for m in (_module_of(k, containers) for k in tensors) if m is not None})
    types = sorted({m.rsplit(".", 1)[-1] for m in modules})

    rows = [
        ("adapter", str(folder)),
        *method_rows(cfg, tensors),
        ("base model", str(cfg.base_model_name_or_path)),
        ("targets", _targets_text(targets)),
        ("adapted modules", f"{len(modules)} ({', '.join(types)})"),
        ("trainable params", f"{params:,} in {len(tensors) - len(shared)} tensors ({', '.join(dtypes)})"),
        ("file size", f"{human_size(size)} ({size:,} bytes)"),
    ]
    if shared:
        rows.append(("shared (frozen)", f"{sum(t.numel() for t in shared.values()):,} in {', '.join(sorted(shared))}"))
    rank_pattern, alpha_pattern = getattr(cfg, "rank_pattern", None), getattr(cfg, "alpha_pattern", None)
    if rank_pattern or alpha_pattern:
        rows.append(("patterns", f"rank {rank_pattern or '{}'}, alpha {alpha_pattern or '{}'}"))
    if cfg.modules_to_save:
        rows.append(("modules_to_save", ", ".join(cfg.modules_to_save)))
    if getattr(cfg, "trainable_token_indices", None):
        rows.append(("trainable tokens", _short(cfg.trainable_token_indices)))
    rows += _fingerprint_rows(metadata)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        rows.append(("tokenizer", "saved beside the adapter (vocabulary was changed)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        console.print(f"{key:<{width}}  {value}")

    problems: list[str] = []
    norms = delta_norms(cfg, tensors, problems)
    if norms:
        total = sum(v * v for v in norms.values()) ** 0.5
        top = sorted(norms.items(), key=lambda kv: -kv[1])[:3]
        console.print(f"{'||ΔW|| total':<{width}}  {total:.4g} (largest: "
                      + ", ".join(f"{p} {v:.3g}" for p, v in top) + ")")
    for key, value in problem_rows(problems):
        console.print(f"{key:<{width}}  {value}")
    if tensors_listed:
        console.print("tensors:")
        for key in sorted(tensors):
            t = tensors[key]
            console.print(f"  {key}  {'x'.join(map(str, t.shape))}  {str(t.dtype).replace('torch.', '')}")
    if plot is not None:
        if not norms:
            console.print("no LoRA pairs to plot (the heatmap covers LoRA adapters)")
        elif plot_heatmap(norms, plot, title=f"||ΔW||_F per module: {folder.name}"):
            console.print(f"{'plot':<{width}}  {plot}")


def _method_text(cfg) -> str:
    """LoRA's rank, alpha and scale; for other methods, their own scalar config fields."""
    import dataclasses

    from ..config import AdapterConfig

    if hasattr(cfg, "lora_alpha"):  # LoRA and DoRA
        return (f"{cfg.peft_type} (r={cfg.r}, alpha={cfg.lora_alpha:g}, scale={cfg.scaling_for(''):g}"
                f"{', rsLoRA' if cfg.use_rslora else ''}, dropout={cfg.lora_dropout:g})")
    shared = {f.name for f in dataclasses.fields(AdapterConfig)}
    own = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in shared]
    shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={_short(v) if isinstance(v, list) else v}"
                      for k, v in own if isinstance(v, (bool, int, float, str, list)))
    return f"{cfg.peft_type} ({shown})" if shown else cfg.peft_type


def _container_names() -> set[str]:
    """Every method layer's per-adapter attribute names (lora_A, oft_R, ...): a file key's module path ends before
    them."""
    from ..methods import METHODS

    return {c for method in METHODS.values() for layer in method.layers.values() for c in layer.containers}


def _module_of(key: str, containers: set[str]) -> str | None:
    """The module path of a file key; None for a tensor of the whole adapter (e.g. VeRA's base_model.vera_A)."""
    from ..checkpoint.format import strip_prefix

    inner = strip_prefix(key)
    if inner is None:
        return None
    module = inner.rpartition(".")[0]  # drop the tensor name (weight, lora_embedding_A, ia3_l, ...)
    parent, _, last = module.rpartition(".")
    if parent and last in containers:
        return parent
    return module


def _targets_text(targets) -> str:
    if isinstance(targets, str):
        return f"regex {targets!r}"
    targets = list(targets or [])
    if len(targets) > 8:
        leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
        return f"{len(targets)} names ({', '.join(leaves)})"
    return ", ".join(targets) or "none"


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) < 80 else text[:77] + "..."


def _fingerprint_rows(metadata: dict) -> list[tuple[str, str]]:
    try:
        from ..checkpoint.fingerprint import from_metadata
    except ImportError:
        return [("base fingerprint", "not readable by this installation")]
    fp = from_metadata(metadata)
    if fp is None:
        return [("base fingerprint", "none (a PEFT-made adapter, or saved without one)")]
    config = fp.get("config", {})
    structure = ", ".join(f"{k}={config[k]}" for k in ("model_type", "num_hidden_layers", "hidden_size")
                          if k in config)
    rows = [("base fingerprint", f"{fp.get('class', '?')} ({structure}); {len(fp.get('modules', {}))} module "
                                 "weight signatures")]
    if fp.get("name_or_path"):
        rows.append(("base recorded as", str(fp["name_or_path"])))
    emb = fp.get("embeddings") or {}
    vocab = config.get("vocab_size")
    if vocab is not None or emb:
        rows.append(("vocab", f"{vocab}" + (f" (embeddings {_short(emb)})" if emb else "")))
    ties = fp.get("ties") or []
    rows.append(("ties", "; ".join(" = ".join(g) for g in ties) if ties else "none"))
    return rows


def plot_heatmap(norms: dict[str, float], path: Path, title: str = "") -> bool:
    """Heatmap of ||ΔW|| with module types (q_proj, ...) as rows and layer indices as columns.

    False (after a note) where matplotlib is missing.
    """
    plt = pyplot("plot")
    if plt is None:
        return False
    import numpy as np  # a dependency of matplotlib

    grid: dict[str, dict[int, float]] = defaultdict(dict)
    for module_path, value in norms.items():
        match = _LAYER.search(f".{module_path}.")
        layer = int(match.group(1)) if match else -1
        grid[module_path.rsplit(".", 1)[-1]][layer] = value
    kinds = sorted(grid)
    layers = sorted({layer for row in grid.values() for layer in row})
    data = np.full((len(kinds), len(layers)), np.nan)
    for i, kind in enumerate(kinds):
        for j, layer in enumerate(layers):
            data[i, j] = grid[kind].get(layer, np.nan)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(layers) + 2), 0.45 * len(kinds) + 1.5), dpi=100)
    image = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xticks(range(len(layers)), ["-" if layer < 0 else str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="||ΔW||_F")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
