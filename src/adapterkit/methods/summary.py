"""What `adapterkit inspect` computes of an adapter from its file alone: per-module update norms that a damaged or
hand-edited file cannot turn into a crash, and the row naming the modules left out and why."""

from __future__ import annotations

import torch


def module_norms(groups: dict[str, dict[str, torch.Tensor]], norm_of) -> tuple[dict[str, float], list[str]]:
    """{path: norm_of(path, tensors)} for each module of `groups` (a None norm is left out), and one line per module
    whose tensors do not fit together (a damaged or hand-edited file), named with what is wrong, left out too."""
    norms, problems = {}, []
    for path, tensors in groups.items():
        try:
            norm = norm_of(path, tensors)
        except KeyError as exc:
            problems.append(f"{path}: no {exc.args[0]} tensor")
            continue
        except (IndexError, RuntimeError, ValueError) as exc:
            shapes = ", ".join(f"{k} {'x'.join(map(str, t.shape))}" for k, t in sorted(tensors.items()))
            problems.append(f"{path}: {shapes} do not fit together ({str(exc).splitlines()[0][:120]})")
            continue
        if norm is not None:
            norms[path] = norm
    return norms, problems


def problem_rows(problems: list[str]) -> list[tuple[str, str]]:
    """The `inspect` row naming modules whose tensors do not fit together (empty when there are none)."""
    if not problems:
        return []
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return [("unreadable", f"{len(problems)} module(s) left out of ||ΔW||: " + "; ".join(problems[:3]) + more)]
