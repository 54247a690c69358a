"""shoal merge against mergekit-yaml 0.1.x on mergekit's own example recipes.

The recipes have the shape of mergekit's ``examples/*.yml`` (gradients over 40 layers
with filters, ``int8_mask``, ``normalize``, float16 and bfloat16 ``dtype``, layer
slices), pointed at tiny Llama models built here. Both tools run on the same files and
the outputs are compared name by name: float32 to 1e-6, float16/bfloat16 within one
unit in the last place. Skipped without the side venv of ``make mergekit-venv``.
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
    merge_both,
    run_mergekit,
    run_mergekit_python,
)

from shoal.merge import merge_to_disk

pytestmark = pytest.mark.skipif(not HAVE_MERGEKIT, reason=SKIP_REASON)

NAMES = ("base", "a", "b", "c")


@pytest.fixture(scope="module")
def forty(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base and three fine-tunes, 40 layers each (the layer count of the examples)."""
    return build_family(tmp_path_factory.mktemp("mk40"), llama_config(layers=40), NAMES)


def test_ties_example_fp16_gradients_filters(forty: dict[str, Path], tmp_path: Path) -> None:
    """examples/ties.yml: density and weight gradients, a weight filter list,
    normalize, int8_mask, dtype float16."""
    ours, theirs = merge_both(
        f"""
models:
  - model: {forty["a"]}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {forty["b"]}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: {forty["c"]}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {forty["base"]}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
        tmp_path,
    )
    assert ours["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
    assert_same_tensors(ours, theirs)


def test_gradient_slerp_example_40_layers(forty: dict[str, Path], tmp_path: Path) -> None:
    """examples/gradient-slerp.yml: t gradients per filter over a 40-layer slice."""
    ours, theirs = merge_both(
        f"""
slices:
  - sources:
      - model: {forty["a"]}
        layer_range: [0, 40]
      - model: {forty["b"]}
        layer_range: [0, 40]
merge_method: slerp
base_model: {forty["a"]}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
""",
        tmp_path,
    )
    assert_same_tensors(ours, theirs)


def test_linear_example_fp16(forty: dict[str, Path], tmp_path: Path) -> None:
    """examples/linear.yml: three weighted models, dtype float16."""
    ours, theirs = merge_both(
        f"""
models:
  - model: {forty["a"]}
    parameters: {{weight: 1.0}}
  - model: {forty["b"]}
    parameters: {{weight: 0.3}}
  - model: {forty["c"]}
    parameters: {{weight: 0.5}}
merge_method: linear
dtype: float16
""",
        tmp_path,
    )
    assert_same_tensors(ours, theirs)


def test_layer_stacking_example_is_exact(forty: dict[str, Path], tmp_path: Path) -> None:
    """examples/orcamini-platy-44layer.yml: passthrough of overlapping layer slices."""
    ours, theirs = merge_both(
        f"""
slices:
  - sources:
      - model: {forty["a"]}
        layer_range: [0, 24]
  - sources:
      - model: {forty["b"]}
        layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
        tmp_path,
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert_same_tensors(ours, theirs)


def test_task_arithmetic_float32(forty: dict[str, Path], tmp_path: Path) -> None:
    """No dtype on float32 models: computed in float32 by both, to 1e-6."""
    ours, theirs = merge_both(
        f"""
models:
  - model: {forty["a"]}
    parameters: {{weight: [0.2, 0.9]}}
  - model: {forty["b"]}
    parameters: {{weight: 0.4}}
merge_method: task_arithmetic
base_model: {forty["base"]}
parameters: {{lambda: 0.7}}
""",
        tmp_path,
    )
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_bf16_checkpoints_ties_at_the_cut(
    method: str, bf16_family: dict[str, Path], tmp_path: Path
) -> None:
    """bfloat16 checkpoints (task vectors on the bf16 grid: many entries share the
    magnitude at the cut), dtype bfloat16: the same entries survive, the outputs are
    bit-identical."""
    gamma = "\n      gamma: 0.05" if method == "breadcrumbs_ties" else ""
    ours, theirs = merge_both(
        f"""
models:
  - model: {bf16_family["a"]}
    parameters:
      weight: 0.6
      density: 0.3{gamma}
  - model: {bf16_family["b"]}
    parameters:
      weight: 0.4
      density: 0.5{gamma}
merge_method: {method}
base_model: {bf16_family["base"]}
dtype: bfloat16
""",
        tmp_path,
    )
    assert_same_tensors(ours, theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_magnitude_cut_keeps_mergekits_entries(tmp_path: Path) -> None:
    """The TIES and breadcrumbs masks on task vectors with massive ties at the cut are
    the entries mergekit's own sparsifiers keep (run in the side venv)."""
    from safetensors.torch import load_file, save_file

    from shoal.ops.breadcrumbs import breadcrumbs_mask
    from shoal.ops.masks import magnitude_mask, ties_at_cut

    gen = torch.Generator().manual_seed(11)
    deltas = {
        "grid": torch.randint(-6, 7, (300, 211), generator=gen).float() * 2**-8,
        "bf16": (torch.randn(64, 333, generator=gen) * 0.01).bfloat16().float(),
        "small": torch.randint(-2, 3, (37,), generator=gen).float(),
    }
    save_file(deltas, str(tmp_path / "deltas.safetensors"))
    run_mergekit_python(
        """
from safetensors.torch import load_file, save_file
from mergekit.sparsify import magnitude, magnitude_outliers
d = load_file("deltas.safetensors")
out = {}
for k, v in d.items():
    out[k + ".ties"] = (magnitude(v, density=0.3) != 0)
    out[k + ".crumbs"] = (magnitude_outliers(v, density=0.4, gamma=0.05) != 0)
save_file({k: t.to(dtype=__import__("torch").uint8) for k, t in out.items()}, "masks.safetensors")
""",
        tmp_path,
    )
    theirs = load_file(str(tmp_path / "masks.safetensors"))
    for name, delta in deltas.items():
        nonzero = delta != 0  # mergekit's mask shows only where the entry is nonzero
        ours_ties = magnitude_mask(delta, 0.3) & nonzero
        ours_crumbs = breadcrumbs_mask(delta, 0.4, 0.05) & nonzero
        assert torch.equal(ours_ties, theirs[name + ".ties"].bool()), name
        assert torch.equal(ours_crumbs, theirs[name + ".crumbs"].bool()), name
    # the case this is about: ties do straddle the cut in the grid tensors
    mag = deltas["grid"].abs().reshape(-1)
    assert ties_at_cut(mag, int(0.3 * mag.numel()))


def test_dare_masks_have_mergekits_distribution(forty: dict[str, Path], tmp_path: Path) -> None:
    """DARE masks cannot be bit-equal (mergekit draws from torch's global generator, shoal
    from one generator per tensor); they are the same distribution: over the 40-layer
    model the kept fraction, and per tensor the rescaled task vector's L1 norm, agree
    with mergekit's within 0.5 %."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"""
models:
  - model: {forty["a"]}
    parameters: {{weight: 1.0, density: 0.3}}
merge_method: dare_linear
base_model: {forty["base"]}
"""
    )
    ours = state_dict(merge_to_disk(recipe, tmp_path / "shoal", progress=False, seed=0))
    theirs = state_dict(run_mergekit(recipe, tmp_path / "mergekit", "--random-seed", "0"))
    base = state_dict(forty["base"])
    kept = {"shoal": 0, "mergekit": 0}
    total = 0
    worst_l1 = 0.0
    for name in base:
        ours_delta = ours[name].double() - base[name].double()
        theirs_delta = theirs[name].double() - base[name].double()
        kept["shoal"] += int((ours_delta != 0).sum())
        kept["mergekit"] += int((theirs_delta != 0).sum())
        total += base[name].numel()
        l1_ours, l1_theirs = float(ours_delta.abs().sum()), float(theirs_delta.abs().sum())
        worst_l1 = max(worst_l1, abs(l1_ours - l1_theirs) / l1_theirs)
        assert not torch.equal(ours[name], theirs[name])  # different draws
    fraction = {k: v / total for k, v in kept.items()}
    assert abs(fraction["shoal"] - 0.3) < 0.005 and abs(fraction["mergekit"] - 0.3) < 0.005
    assert abs(fraction["shoal"] - fraction["mergekit"]) / fraction["mergekit"] < 0.005
    assert worst_l1 < 0.005
    print(
        f"DARE kept fraction shoal {fraction['shoal']:.5f} mergekit {fraction['mergekit']:.5f}; "
        f"worst per-tensor L1 difference {worst_l1:.2e}"
    )
