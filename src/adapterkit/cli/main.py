"""The `adapterkit` command: a typer app with one sub-command per file (train, generate, inspect, verify, merge, export).

`main()` turns every expected failure (bad input, missing file, unknown model, adapter/base mismatch) into one
`error: ...` line and a non-zero exit; `--debug` shows the traceback instead. A package of the `cli` extra that is
not installed (typer itself included) is such a failure too: the line says what to `pip install`.
"""

from __future__ import annotations

import os
import sys
import warnings
from functools import lru_cache

from .extras import install_hint, missing_extra


@lru_cache(maxsize=None)
def build_app():
    """The typer app with its sub-commands; built on first use so that a missing typer is a message, not a crash."""
    import typer

    app = typer.Typer(
        name="adapterkit",
        help="Parameter-efficient fine-tuning (LoRA, DoRA, LoHa, LoKr, IA3, VeRA, OFT) in the PEFT file format.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def _root(
        debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks instead of one-line errors."),
    ) -> None:
        if debug:
            DEBUG["on"] = True

    from . import export, generate, inspect, merge, train, verify

    for module in (train, generate, inspect, verify, merge, export):
        module.register(app)
    return app


def __getattr__(name: str):
    if name == "app":  # `adapterkit.cli.main.app`, as typer's test runner expects
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Set by the --debug option (a global flag so that it is accepted before or after the sub-command).
DEBUG = {"on": False}


def _expected_errors() -> tuple[type[BaseException], ...]:
    from ..training_data import DataError
    from .common import CliError
    from ..errors import AdapterError
    from ..base_models import ModelNotFoundError

    return (CliError, AdapterError, DataError, ModelNotFoundError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError, ValueError, OSError)


def _quiet_libraries() -> None:
    # transformers' progress bars and advisory warnings drown the command's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"no such file or directory: {exc.filename}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adapterkit` script. Returns (and exits with) the command's exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    _quiet_libraries()
    try:
        app = build_app()
    except ModuleNotFoundError as exc:
        module = missing_extra(exc)
        if module is None or debug:
            raise
        print(f"error: the adapterkit command needs {module}, which is not installed: {install_hint(module)}",
              file=sys.stderr)
        return _exit(1, argv)
    try:
        # standalone_mode=False: click returns the exit code of typer.Exit instead of calling sys.exit.
        result = app(args=args, prog_name="adapterkit", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:  # typer.Exit inside commands
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:  # noqa: BLE001 - the top level decides what a user sees
        exit_error, abort_error, click_error = _framework_exceptions()
        if type(exc).__name__ == "NoArgsIsHelpError":  # no sub-command: the help was printed, as click does
            code = 2
        elif isinstance(exc, exit_error):
            code = exc.exit_code
        elif isinstance(exc, click_error):
            exc.show()
            code = exc.exit_code
        elif isinstance(exc, abort_error):
            print("error: aborted", file=sys.stderr)
            code = 1
        elif debug:
            raise
        elif missing_extra(exc):
            module = missing_extra(exc)
            print(f"error: this command needs {module}, which is not installed: {install_hint(module)}",
                  file=sys.stderr)
            code = 1
        elif isinstance(exc, _expected_errors()):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            code = 1
        else:
            print(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)",
                  file=sys.stderr)
            code = 1
    return _exit(code, argv)


def _framework_exceptions() -> tuple[type[BaseException], ...]:
    """typer's Exit and Abort and the usage-error base class, from click or from typer's own copy of it (typer 0.2x
    vendors click, whose exceptions are then not click's; click itself may not even be installed)."""
    import typer

    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        from click import ClickException
    return typer.Exit, typer.Abort, ClickException


def _exit(code: int, argv: list[str] | None) -> int:
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
