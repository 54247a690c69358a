"""Every recipe in examples/merge/ parses and runs on a stand-in testbed of tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_helpers import build_family, llama_config, state_dict

from shoal.merge import merge_to_disk
from shoal.recipe import load_recipe
from shoal.recipe.schema import rename_models

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "merge").glob("*.yaml"))
NAMES = ("base", "expert-chain_sum", "expert-spell_backward", "expert-gcd")


@pytest.fixture(scope="module")
def testbed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding `testbed/<model>` like `shoal testbed build .testbed/small` makes."""
    root = tmp_path_factory.mktemp("examples")
    build_family(root / ".testbed" / "small", llama_config(layers=3), NAMES)
    return root


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(
    path: Path, testbed_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = load_recipe(path)
    monkeypatch.chdir(testbed_root)  # model paths are relative to the working directory
    out = merge_to_disk(recipe, tmp_path / "out", progress=False)
    tensors = state_dict(out)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    # the stored copy names each model by its absolute path, so it rebuilds from anywhere
    absolute = {ref: str(Path(ref).resolve()) for ref in recipe.model_refs()}
    assert load_recipe(out / "shoal_recipe.yaml") == load_recipe(
        rename_models(recipe.to_dict(), absolute)
    )
