"""Entry point of the ``shoal`` command.

Each command lives in its own module and imports torch, transformers and the
rest only inside the command body, so ``shoal --help`` answers in well under a
second. Any :class:`~shoal.errors.ShoalError` becomes one line on stderr and
exit code 2.
"""

from __future__ import annotations

import sys
from importlib import import_module

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
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shoal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """shoal: merge recipes, evolutionary model merging, M2N2, CycleQD, Transformer²."""


for _name in _COMMAND_MODULES:
    import_module(_name).register(app)


def main() -> None:
    """Run the CLI; user errors end in one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except ShoalError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
