"""Run configs read exponent numbers as numbers, in the file and in ``--set`` (issue 18
item 8), and the config a run saves reads back unchanged on ``--resume``."""

from __future__ import annotations

from pathlib import Path

import pytest
import toy_problem as tp
import yaml

from shoal.errors import RecipeError
from shoal.search.config import load_config

SOURCES = {"zero": "/nonexistent/zero.safetensors", "one": "/nonexistent/one.safetensors"}


def _write(tmp_path: Path, budget: str) -> Path:
    text = yaml.safe_dump(tp.toy_config(SOURCES), sort_keys=False)
    text = text.replace("budget:\n  evaluations: 12\n", f"budget:\n{budget}")
    assert budget in text
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_exponent_numbers_in_a_config_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "  evaluations: 2e1\n  seconds: 5E+2\n  target: 1e-3\n"))
    assert cfg.budget.evaluations == 20
    assert cfg.budget.seconds == 500.0
    assert cfg.budget.target == 0.001


def test_a_quoted_exponent_count_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"cfg\.yaml: budget\.evaluations: "):
        load_config(_write(tmp_path, "  evaluations: '2e1'\n"))


def test_exponent_numbers_in_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "  evaluations: 12\n")
    cfg = load_config(path, ["budget.evaluations=3e1", "budget.target=-2e-1"])
    assert cfg.budget.evaluations == 30 and cfg.budget.target == -0.2


def test_the_saved_config_keeps_a_string_that_looks_like_a_number(tmp_path: Path) -> None:
    """A model named ``1e5`` stays a name through ``to_yaml`` and the reload on resume."""
    cfg = load_config(tp.toy_config({"1e5": "/x/a.safetensors", "2E-3": "/x/b.safetensors"}))
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    again = load_config(saved)
    assert list(again.models) == ["1e5", "2E-3"]
    assert again.model_dump() == cfg.model_dump()
