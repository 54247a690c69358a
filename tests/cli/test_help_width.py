"""Every command's help reads well in an 80-column terminal.

rich keeps a help text's line breaks and wraps what is longer than the panel (78
columns at 80): a long line followed by more of its paragraph leaves one or two words
on a line of their own. So only a paragraph's last line may be longer.
"""

from __future__ import annotations

import click
import pytest
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


def test_each_command_summary_is_one_paragraph_line() -> None:
    """The commands panel shows a help text's first paragraph and keeps its line breaks,
    so a break inside it strands a word on a line of its own (`\\` continues a line)."""
    root = typer.main.get_command(app)
    broken = [
        path for path, cmd in _commands(root) if "\n" in (cmd.help or "").split("\n\n")[0].strip()
    ]
    assert not broken, broken


def test_no_option_name_is_cut_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich shortens option names with '…' when the table has no room: every --help,
    rendered 80 columns wide, shows every name whole."""
    from typer.testing import CliRunner

    monkeypatch.setenv("COLUMNS", "80")
    root = typer.main.get_command(app)
    cut = []
    for path, _ in _commands(root):
        result = CliRunner().invoke(app, [*path.split()[1:], "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert max(map(len, result.output.splitlines())) <= 80, path
        cut += [(path, line) for line in result.output.splitlines() if "…" in line]
    assert not cut, cut
