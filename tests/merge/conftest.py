"""Fixtures of the merge tests: tiny model families on disk (no hub access)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from merge_helpers import build_family, gpt2_config, llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama family: base, a, b (2 layers, hidden 32)."""
    return build_family(tmp_path_factory.mktemp("llama"), llama_config())


@pytest.fixture(scope="session")
def llama_sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same family saved in shards of 20 kB."""
    return build_family(tmp_path_factory.mktemp("llama_sh"), llama_config(), max_shard_size="20KB")


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny GPT-2 family: base, a, b."""
    return build_family(tmp_path_factory.mktemp("gpt2"), gpt2_config())


@pytest.fixture(scope="session")
def bf16_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base and three fine-tunes (a, b, c) stored in bfloat16, 4 layers (the mergekit
    cross-checks' low-precision family)."""
    import torch
    from mergekit_side import resave_as

    names = ("base", "a", "b", "c")
    paths = build_family(tmp_path_factory.mktemp("mkbf16"), llama_config(layers=4), names)
    return resave_as(paths, torch.bfloat16)


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[str], Path]:
    """Write YAML text to a recipe file in the test's directory."""

    def _write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write
