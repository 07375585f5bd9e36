"""Which optional extra provides a package the command needs, and the `pip install` line that brings it."""

from __future__ import annotations

# Packages of the `cli` extra (and of `hf`, which it includes) by import name: a command that finds one missing says
# which extra to install instead of printing an import error.
EXTRA_OF = {
    "typer": "cli", "click": "cli", "rich": "cli", "matplotlib": "cli", "gguf": "cli",
    "transformers": "cli", "tokenizers": "cli",
}


def install_hint(module: str) -> str:
    """`pip install ...` for the extra that provides `module` (an import name, possibly dotted)."""
    return f"pip install 'adapterkit[{EXTRA_OF.get(module.split('.')[0], 'cli')}]'"


def missing_extra(exc: BaseException) -> str | None:
    """The top-level name of a missing module that an extra provides, else None."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] in EXTRA_OF:
        return exc.name.split(".")[0]
    return None
