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
    merge_both,
    run_mergekit,
    ulp_distance,
)

from shoal.merge import merge_to_disk

pytestmark = pytest.mark.skipif(not HAVE_MERGEKIT, reason=SKIP_REASON)

NAMES = ("base", "a", "b", "c")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base and three fine-tunes, float32, 4 layers."""
    return build_family(tmp_path_factory.mktemp("mkm32"), llama_config(layers=4), NAMES)


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
    ours, theirs = merge_both(recipe_text, tmp_path)
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


# -- della, della_linear ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base and two fine-tunes with about 300 k entries each (8 layers, hidden 64): enough
    draws for DELLA's statistics to settle."""
    config = llama_config(layers=8, hidden_size=64, intermediate_size=128)
    return build_family(tmp_path_factory.mktemp("mkwide"), config, ("base", "a", "b"))


def _della_runs(recipe_text: str, tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(recipe_text)
    ours = state_dict(merge_to_disk(recipe, tmp_path / "shoal", progress=False, seed=0))
    theirs = state_dict(run_mergekit(recipe, tmp_path / "mergekit", "--random-seed", "0"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ours[name], theirs[name])  # different draws, as expected
    return {"shoal": ours, "mergekit": theirs}


def _moved(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, float]:
    """The fraction of all entries moved off the base and the mean |Δ| of those moved."""
    moved = total = 0
    magnitude = 0.0
    for name, b in base.items():
        delta = out[name].double() - b.double()
        moved += int((delta != 0).sum())
        total += delta.numel()
        magnitude += float(delta.abs().sum())
    return {"moved": moved / total, "mean |delta| of moved": magnitude / moved}


def test_della_linear_drops_have_mergekits_distribution(
    wide: dict[str, Path], tmp_path: Path
) -> None:
    """DELLA draws cannot be bit-equal (mergekit draws from torch's global generator,
    shoal from one seeded generator per tensor), so its distribution is compared.

    One model, density 0.3, epsilon 0.2, L1 rescale, float32, 300 k entries. For both
    tools: the kept fraction lies within 0.004 of 0.3 (about 5 binomial standard
    errors) and within 0.004 of the other's; among the smallest and the largest quarter
    of each 2-D row by |τ| the kept fraction lies within 0.006 of the formula's mean
    p = d − ε + 2ε (r − 1)/(n − 1) over those ranks (≈ 0.148 and 0.452; about 4.5
    standard errors) and of the other's; the mean kept magnitude agrees within 1.5 %;
    every tensor keeps its task vector's L1 norm to 1e-4 (relative)."""
    runs = _della_runs(
        f"""
models:
  - model: {wide["a"]}
    parameters: {{weight: 1.0, density: 0.3, epsilon: 0.2}}
merge_method: della_linear
base_model: {wide["base"]}
""",
        tmp_path,
    )
    base, a = state_dict(wide["base"]), state_dict(wide["a"])
    d, eps = 0.3, 0.2
    stats: dict[str, dict[str, float]] = {}
    for tool, out in runs.items():
        counts = {"low": [0, 0, 0.0], "high": [0, 0, 0.0]}  # kept, total, Σ p
        for name, b in base.items():
            tau = a[name].double() - b.double()
            delta = out[name].double() - b.double()
            l1, l1_kept = float(tau.abs().sum()), float(delta.abs().sum())
            assert abs(l1_kept - l1) <= 1e-4 * l1, (tool, name)
            if tau.ndim != 2:
                continue
            n = tau.shape[1]
            ranks = tau.abs().argsort(dim=1).argsort(dim=1)  # 0 = smallest
            p = d - eps + 2 * eps * ranks.double() / (n - 1)
            for part, where in (("low", ranks < n // 4), ("high", ranks >= n - n // 4)):
                counts[part][0] += int((delta[where] != 0).sum())
                counts[part][1] += int(where.sum())
                counts[part][2] += float(p[where].sum())
        stats[tool] = _moved(out, base)
        for part, (kept, total, p_sum) in counts.items():
            stats[tool][f"{part} quarter kept"] = kept / total
            stats[tool][f"{part} quarter p"] = p_sum / total
    for key in stats["shoal"]:
        print(f"{key}: shoal {stats['shoal'][key]:.5f} mergekit {stats['mergekit'][key]:.5f}")
    ours, theirs = stats["shoal"], stats["mergekit"]
    for s in (ours, theirs):
        assert abs(s["moved"] - d) < 0.004
        for part in ("low", "high"):
            assert abs(s[f"{part} quarter kept"] - s[f"{part} quarter p"]) < 0.006, part
    assert abs(ours["moved"] - theirs["moved"]) < 0.004
    for part in ("low", "high"):
        assert abs(ours[f"{part} quarter kept"] - theirs[f"{part} quarter kept"]) < 0.006
    ratio = ours["mean |delta| of moved"] / theirs["mean |delta| of moved"]
    assert abs(ratio - 1) < 0.015


def test_della_ties_bf16_has_mergekits_statistics(wide: dict[str, Path], tmp_path: Path) -> None:
    """della (sign election) over two models in bfloat16, per-model densities and
    epsilons, lambda, normalize: the fraction of entries moved off the base and their
    mean |Δ| agree with mergekit's within 0.006 and 1.5 % (the same margins as above)."""
    runs = _della_runs(
        f"""
models:
  - model: {wide["a"]}
    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}
  - model: {wide["b"]}
    parameters: {{weight: 0.4, density: 0.4, epsilon: 0.25}}
merge_method: della
base_model: {wide["base"]}
parameters: {{lambda: 0.9}}
dtype: bfloat16
""",
        tmp_path,
    )
    base = state_dict(wide["base"])
    base = {k: v.bfloat16() for k, v in base.items()}
    ours, theirs = _moved(runs["shoal"], base), _moved(runs["mergekit"], base)
    for key in ours:
        print(f"{key}: shoal {ours[key]:.5f} mergekit {theirs[key]:.5f}")
    assert runs["shoal"]["model.norm.weight"].dtype == torch.bfloat16
    assert abs(ours["moved"] - theirs["moved"]) < 0.006
    ratio = ours["mean |delta| of moved"] / theirs["mean |delta| of moved"]
    assert abs(ratio - 1) < 0.015


# -- nearswap ---------------------------------------------------------------------------------


def test_nearswap_float32(family: dict[str, Path], tmp_path: Path) -> None:
    """t = 0.02 (about the fine-tunes' distance from the base: some entries swapped
    whole, others partly), float32, the base also listed among the models."""
    ours, _ = _check(
        f"""
models:
  - model: {family["base"]}
  - model: {family["a"]}
merge_method: nearswap
base_model: {family["base"]}
parameters: {{t: 0.02}}
""",
        tmp_path,
    )
    base, a = state_dict(family["base"]), state_dict(family["a"])
    name = "model.layers.1.self_attn.q_proj.weight"
    whole = ours[name] == a[name]
    assert 0.1 < float(whole.float().mean()) < 0.9  # a mix of swapped and kept entries
    assert not torch.equal(ours[name], base[name])


def test_nearswap_bf16_gradient(bf16_family: dict[str, Path], tmp_path: Path) -> None:
    """bfloat16 checkpoints computed in bfloat16, t a gradient over the layers with a
    filter, the other model given without the base in models."""
    p = bf16_family
    _check(
        f"""
models:
  - model: {p["b"]}
merge_method: nearswap
base_model: {p["base"]}
parameters:
  t:
    - filter: mlp
      value: [0.001, 0.05]
    - value: 0.01
dtype: bfloat16
""",
        tmp_path,
    )


def test_nearswap_float16(family: dict[str, Path], tmp_path: Path) -> None:
    """Computed in float16 from float32 checkpoints."""
    _check(
        f"""
models:
  - model: {family["c"]}
merge_method: nearswap
base_model: {family["a"]}
parameters: {{t: 0.005}}
dtype: float16
""",
        tmp_path,
    )


# -- karcher ----------------------------------------------------------------------------------
# The Karcher mean iterates, but shoal takes mergekit's steps in mergekit's dtypes and order,
# so the bar stays 1e-6 in float32 (the issue allows 1e-5 for an iterative method; the
# measured difference is 0).


def test_karcher_float32_three_models(family: dict[str, Path], tmp_path: Path) -> None:
    """Three models, no base, the default 10 iterations, float32."""
    _check(
        f"""
models:
  - model: {family["a"]}
  - model: {family["b"]}
  - model: {family["c"]}
merge_method: karcher
""",
        tmp_path,
    )


def test_karcher_bf16_base_joins_the_models(bf16_family: dict[str, Path], tmp_path: Path) -> None:
    """A base_model not listed among the models is averaged as one more model (mergekit
    adds it after them); bfloat16 checkpoints computed in bfloat16, max_iter 3, tol a
    filter list."""
    p = bf16_family
    ours, _ = _check(
        f"""
models:
  - model: {p["a"]}
  - model: {p["b"]}
merge_method: karcher
base_model: {p["base"]}
parameters:
  max_iter: 3
  tol:
    - filter: mlp
      value: 0.001
    - value: 0.00001
dtype: bfloat16
""",
        tmp_path,
    )
    assert ours["model.norm.weight"].dtype == torch.bfloat16


def test_karcher_float16_slices(family: dict[str, Path], tmp_path: Path) -> None:
    """A slices recipe over two models, computed in float16, max_iter 25."""
    _check(
        f"""
slices:
  - sources:
      - model: {family["a"]}
        layer_range: [0, 4]
      - model: {family["c"]}
        layer_range: [0, 4]
merge_method: karcher
parameters: {{max_iter: 25}}
dtype: float16
""",
        tmp_path,
    )


# -- multislerp -------------------------------------------------------------------------------


def test_multislerp_float32_no_base(family: dict[str, Path], tmp_path: Path) -> None:
    """Three models, no base, unequal weights, float32."""
    _check(
        f"""
models:
  - model: {family["a"]}
    parameters: {{weight: 0.5}}
  - model: {family["b"]}
    parameters: {{weight: 0.3}}
  - model: {family["c"]}
    parameters: {{weight: 0.2}}
merge_method: multislerp
""",
        tmp_path,
    )


def test_multislerp_bf16_with_base(bf16_family: dict[str, Path], tmp_path: Path) -> None:
    """Task vectors from a base_model not listed among the models, weight gradients,
    normalize_weights off, bfloat16 checkpoints computed in bfloat16."""
    p = bf16_family
    _check(
        f"""
models:
  - model: {p["a"]}
    parameters: {{weight: [0.2, 0.9]}}
  - model: {p["b"]}
    parameters: {{weight: 0.6}}
merge_method: multislerp
base_model: {p["base"]}
parameters: {{normalize_weights: false}}
dtype: bfloat16
""",
        tmp_path,
    )


def test_multislerp_float16_base_listed(family: dict[str, Path], tmp_path: Path) -> None:
    """The base also listed among the models (it is the origin, not a model), float16,
    a larger eps."""
    _check(
        f"""
models:
  - model: {family["base"]}
  - model: {family["a"]}
    parameters: {{weight: 1.0}}
  - model: {family["c"]}
    parameters: {{weight: 2.0}}
merge_method: multislerp
base_model: {family["base"]}
parameters: {{eps: 0.000001}}
dtype: float16
""",
        tmp_path,
    )


# -- nuslerp ----------------------------------------------------------------------------------


def test_nuslerp_float32_flat_no_base(family: dict[str, Path], tmp_path: Path) -> None:
    """Two models, no base, whole tensors (the default), t = 0.3/(0.7 + 0.3), float32."""
    _check(
        f"""
models:
  - model: {family["a"]}
    parameters: {{weight: 0.7}}
  - model: {family["b"]}
    parameters: {{weight: 0.3}}
merge_method: nuslerp
""",
        tmp_path,
    )


def test_nuslerp_bf16_rows_with_base(bf16_family: dict[str, Path], tmp_path: Path) -> None:
    """Task vectors from a base_model, row by row (nuslerp_flatten off), weight
    gradients, bfloat16 checkpoints computed in bfloat16."""
    p = bf16_family
    _check(
        f"""
models:
  - model: {p["a"]}
    parameters: {{weight: [1.0, 0.2]}}
  - model: {p["c"]}
    parameters: {{weight: 0.5}}
merge_method: nuslerp
base_model: {p["base"]}
parameters: {{nuslerp_flatten: false}}
dtype: bfloat16
""",
        tmp_path,
    )


def test_nuslerp_float16_columns_base_listed(family: dict[str, Path], tmp_path: Path) -> None:
    """Columns (nuslerp_row_wise without flatten), the base also listed among the
    models, float16."""
    _check(
        f"""
models:
  - model: {family["base"]}
  - model: {family["b"]}
    parameters: {{weight: 2.0}}
  - model: {family["c"]}
    parameters: {{weight: 1.0}}
merge_method: nuslerp
base_model: {family["base"]}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
dtype: float16
""",
        tmp_path,
    )


# -- arcee_fusion -----------------------------------------------------------------------------
# Deterministic here: mergekit samples the quartiles only in tensors of more than 10⁶
# entries (shoal takes them exactly there; see docs/merging.md).


def test_arcee_fusion_float32(family: dict[str, Path], tmp_path: Path) -> None:
    """One model onto the base, float32."""
    ours, _ = _check(
        f"""
models:
  - model: {family["a"]}
merge_method: arcee_fusion
base_model: {family["base"]}
""",
        tmp_path,
    )
    a = state_dict(family["a"])
    name = "model.layers.2.mlp.down_proj.weight"
    took = ours[name] == a[name]
    assert 0.0 < float(took.float().mean()) < 0.3  # some changes taken, most not


def test_arcee_fusion_bf16_base_listed(bf16_family: dict[str, Path], tmp_path: Path) -> None:
    """bfloat16 checkpoints computed in bfloat16 and written so (out_dtype), the base also
    listed among the models."""
    p = bf16_family
    _check(
        f"""
models:
  - model: {p["base"]}
  - model: {p["c"]}
merge_method: arcee_fusion
base_model: {p["base"]}
dtype: bfloat16
out_dtype: bfloat16
""",
        tmp_path,
    )


def test_arcee_fusion_float16_output_dtype(family: dict[str, Path], tmp_path: Path) -> None:
    """Another model as the base, computed in float16, no out_dtype. mergekit writes this
    method's tensors in float32 (its float32 mask promotes the sum and nothing casts it
    back); shoal writes the recipe's dtype, as for every method. The values are the same:
    mergekit's rounded to float16 are shoal's, bit for bit."""
    ours, theirs = merge_both(
        f"""
models:
  - model: {family["b"]}
merge_method: arcee_fusion
base_model: {family["a"]}
dtype: float16
""",
        tmp_path,
    )
    assert {t.dtype for t in theirs.values()} == {torch.float32}
    assert {t.dtype for t in ours.values()} == {torch.float16}
    rounded = {k: v.to(torch.float16) for k, v in theirs.items()}
    assert_same_tensors(ours, rounded)
    assert all(torch.equal(ours[k], rounded[k]) for k in ours)
    print(worst_difference(ours, rounded))
