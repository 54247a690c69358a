"""Every command's help reads well in an 80-column terminal.

rich keeps a help text's line breaks and wraps what is longer than the panel (78
columns at 80): a long line followed by more of its paragraph leaves one or two words
on a line of their own. So only a paragraph's last line may be longer.
"""

from __future__ import annotations

import click
import typer

from shoal.cli.main import app


def _commands(group: click.Command, path: str = "shoal"):
    yield path, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, f"{path} {name}")


def _pairs(lines: list[str]):
    """Each line with the one after it ('' after the last)."""
    return zip(lines, [*lines[1:], ""], strict=True)


def test_no_help_line_is_wider_than_an_80_column_panel() -> None:
    root = typer.main.get_command(app)
    too_long = [
        (path, line)
        for path, cmd in _commands(root)
        for line, after in _pairs((cmd.help or "").splitlines())
        if len(line) > 78 and after.strip()
    ]
    assert len(list(_commands(root))) > 10
    assert not too_long, too_long
