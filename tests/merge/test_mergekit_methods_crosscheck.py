"""shoal merge against mergekit-yaml 0.1.5 for the methods of issue #14.

Each deterministic method runs at least two recipes (other parameters, weights, compute
dtypes, with and without a base where the method allows both) on tiny Llama models
built here; both tools read the same files and the outputs are compared name by name
with :func:`mergekit_side.assert_same_tensors` (float32 to 1e-6, float16/bfloat16
within one unit in the last place). DELLA draws random masks, so its cross-check
compares statistics instead. Skipped without the side venv of ``make mergekit-venv``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_helpers import build_family, llama_config, state_dict
from mergekit_side import (
    HAVE_MERGEKIT,
    SKIP_REASON,
    assert_same_tensors,
    run_mergekit,
    ulp_distance,
)

from shoal.merge import merge_to_disk

pytestmark = pytest.mark.skipif(not HAVE_MERGEKIT, reason=SKIP_REASON)

NAMES = ("base", "a", "b", "c")


def _resave(paths: dict[str, Path], dtype: torch.dtype) -> dict[str, Path]:
    """Store every model's tensors in ``dtype`` (a bfloat16 / float16 checkpoint)."""
    from safetensors.torch import load_file, save_file

    for path in paths.values():
        file = path / "model.safetensors"
        tensors = {k: v.to(dtype) for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
    return paths


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base and three fine-tunes, float32, 4 layers."""
    return build_family(tmp_path_factory.mktemp("mkm32"), llama_config(layers=4), NAMES)


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base and three fine-tunes stored in bfloat16, 4 layers."""
    paths = build_family(tmp_path_factory.mktemp("mkmbf16"), llama_config(layers=4), NAMES)
    return _resave(paths, torch.bfloat16)


def _both(recipe_text: str, tmp_path: Path, *mk_extra: str) -> tuple[dict, dict]:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(recipe_text)
    ours = merge_to_disk(recipe, tmp_path / "shoal", progress=False)
    theirs = run_mergekit(recipe, tmp_path / "mergekit", *mk_extra)
    return state_dict(ours), state_dict(theirs)


def worst_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str:
    """The largest difference over all tensors: absolute for float32, in units in the
    last place for float16/bfloat16 (printed, for the record of the issue)."""
    ulps, absolute = 0, 0.0
    for name, a in ours.items():
        b = theirs[name]
        if a.dtype in (torch.float16, torch.bfloat16):
            ulps = max(ulps, int(ulp_distance(a, b).max()))
        else:
            absolute = max(absolute, float((a.double() - b.double()).abs().max()))
    return f"worst |difference| {absolute:.3g}, worst ulp distance {ulps}"


def _check(recipe_text: str, tmp_path: Path) -> tuple[dict, dict]:
    """Run both tools and assert the same tensors; returns them for further checks."""
    ours, theirs = _both(recipe_text, tmp_path)
    assert_same_tensors(ours, theirs)
    print(worst_difference(ours, theirs))
    return ours, theirs


# -- sce --------------------------------------------------------------------------------------


def test_sce_float32_select_topk(family: dict[str, Path], tmp_path: Path) -> None:
    """Three fine-tunes, float32, half the entries selected by variance."""
    _check(
        f"""
models:
  - model: {family["a"]}
  - model: {family["b"]}
  - model: {family["c"]}
merge_method: sce
base_model: {family["base"]}
parameters: {{select_topk: 0.5}}
""",
        tmp_path,
    )


def test_sce_bf16_gradient_and_base_listed(bf16_family: dict[str, Path], tmp_path: Path) -> None:
    """bfloat16 checkpoints computed in bfloat16 (variance ties at the cut), the base also
    listed among the models, select_topk a gradient over the layers and a filter list."""
    p = bf16_family
    _check(
        f"""
models:
  - model: {p["base"]}
  - model: {p["a"]}
  - model: {p["b"]}
merge_method: sce
base_model: {p["base"]}
parameters:
  select_topk:
    - filter: mlp
      value: [0.1, 0.9]
    - value: 0.3
  int8_mask: true
dtype: bfloat16
""",
        tmp_path,
    )


def test_sce_float16_keeps_everything(family: dict[str, Path], tmp_path: Path) -> None:
    """Default select_topk (1: no selection) computed in float16, two fine-tunes."""
    ours, _ = _check(
        f"""
models:
  - model: {family["a"]}
  - model: {family["b"]}
merge_method: sce
base_model: {family["base"]}
dtype: float16
""",
        tmp_path,
    )
    assert ours["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
