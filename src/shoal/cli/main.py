"""Entry point of the ``shoal`` command.

Each command lives in its own module and imports torch, transformers and the
rest only inside the command body, so ``shoal --help`` answers in well under a
second. Any :class:`~shoal.errors.ShoalError` becomes one line on stderr and
exit code 2.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from importlib import import_module
from typing import NoReturn, TextIO

import typer

from shoal import __version__
from shoal.errors import ShoalError

app = typer.Typer(
    name="shoal",
    help="Build new models out of existing ones: merge, evolve, adapt.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# command modules; each exposes `register(app)` and keeps its imports lazy
_COMMAND_MODULES = (
    "shoal.cli.merge_cmd",
    "shoal.cli.testbed_cmd",
    "shoal.cli.evolve_cmd",
    "shoal.cli.demo_cmd",
    "shoal.cli.export_cmd",
    "shoal.cli.adapt_cmd",
    "shoal.cli.lora_cmd",
    "shoal.cli.moe_cmd",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shoal {__version__}")
        raise typer.Exit()


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A warning is one ``warning:`` line on stderr (Python's own shows file and source)."""
    typer.echo(f"warning: {message}", err=True)


def _quiet_libraries(verbose: bool) -> None:
    """Library warnings (torch, transformers, ray…) stay off the screen unless ``--verbose``;
    shoal's own warnings (a recipe key that has no effect) are always shown."""
    warnings.showwarning = _show_warning
    warnings.simplefilter("default" if verbose else "ignore")
    warnings.filterwarnings("default", module=r"shoal(\.|$)")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show the warnings of the libraries shoal uses."
    ),
) -> None:
    """shoal: merge recipes, evolutionary model merging, M2N2, CycleQD, Transformer²."""
    _quiet_libraries(verbose)


for _name in _COMMAND_MODULES:
    import_module(_name).register(app)


def _click_exception() -> type[Exception]:
    """The base of the usage errors the installed typer raises.

    Recent typer releases raise exceptions of their own vendored copy of click, older
    releases click's; both are ancestors of the public ``typer.BadParameter``.
    """
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == "ClickException":
            return cls
    raise RuntimeError("typer.BadParameter derives from no ClickException")  # pragma: no cover


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    """SIGTERM (``timeout``, ``docker stop``, schedulers) unwinds like Ctrl-C.

    Raising ``KeyboardInterrupt`` runs every ``finally`` on the way out, so
    temporary output folders are removed and run state stays consistent.
    """
    raise KeyboardInterrupt


def _abort(code: int) -> NoReturn:
    typer.echo("aborted", err=True)
    sys.exit(code)


def main() -> None:
    """Run the CLI: user errors end in one line on stderr and exit code 2.

    A usage mistake (unknown option, missing argument) is one ``error:`` line
    too; Ctrl-C or SIGTERM prints ``aborted`` and exits with 130.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        # non-standalone: errors come back to us instead of click printing them
        code = app(standalone_mode=False)
    except ShoalError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _abort(130)
    except _click_exception() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # help was printed already
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)  # type: ignore[attr-defined]
        sys.exit(2)
    # typer returns an exit code instead of raising: 130 for Ctrl-C, N for Exit(N)
    if code == 130:
        _abort(130)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
