"""Multi-stage recipes (mergekit-multi): stages in dependency order, intermediates in a
work folder beside OUT, reused while unchanged; the last stage is OUT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_helpers import state_dict

from shoal.errors import RecipeError
from shoal.merge import merge_to_disk

# written final stage first; _multi puts it last, where an unnamed stage must be
MULTI = """
merge_method: linear
models:
  - model: first
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 1.0}}
---
name: first
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 1.0}}
  - model: {a}
    parameters: {{weight: 3.0}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "multi.yml"
    path.write_text(text)
    return path


def _expected(llama: dict[str, Path]) -> dict[str, torch.Tensor]:
    """By hand: first = (base + 3a)/4, out = (first + b)/2, in float32."""
    base, a, b = (state_dict(llama[k]) for k in ("base", "a", "b"))
    return {k: ((base[k] + 3 * a[k]) / 4 + b[k]) / 2 for k in base}


def _multi(llama: dict[str, Path]) -> str:
    text = MULTI.format(**llama)
    first, second = text.split("---\n")
    return second + "---\n" + first


def test_stages_run_in_order_and_the_last_is_out(llama: dict[str, Path], tmp_path: Path) -> None:
    recipe = _write(tmp_path, _multi(llama))
    out = merge_to_disk(recipe, tmp_path / "out", progress=False)
    got, want = state_dict(out), _expected(llama)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    assert not (tmp_path / ".out.stages").exists()  # removed after success


def test_intermediates_are_kept_and_reused(llama: dict[str, Path], tmp_path: Path) -> None:
    recipe = _write(tmp_path, _multi(llama))
    merge_to_disk(recipe, tmp_path / "out", progress=False, keep_intermediates=True)
    stage = tmp_path / ".out.stages" / "first"
    assert (stage / "model.safetensors").is_file()
    before = (stage / "model.safetensors").stat().st_mtime_ns
    merge_to_disk(recipe, tmp_path / "out", progress=False, keep_intermediates=True, overwrite=True)
    assert (stage / "model.safetensors").stat().st_mtime_ns == before  # reused
    # a changed stage recipe is merged again, and the output follows it
    recipe.write_text(recipe.read_text().replace("weight: 3.0", "weight: 1.0"))
    out = merge_to_disk(
        recipe, tmp_path / "out", progress=False, keep_intermediates=True, overwrite=True
    )
    assert (stage / "model.safetensors").stat().st_mtime_ns != before
    base, a, b = (state_dict(llama[k]) for k in ("base", "a", "b"))
    got = state_dict(out)
    for k in got:
        assert torch.allclose(got[k], ((base[k] + a[k]) / 2 + b[k]) / 2, atol=1e-6), k


def test_one_document_with_a_name_is_a_recipe(llama: dict[str, Path], tmp_path: Path) -> None:
    recipe = _write(
        tmp_path,
        f"name: only\nmerge_method: linear\nmodels:\n  - model: {llama['a']}\n"
        f"  - model: {llama['b']}\n",
    )
    got = state_dict(merge_to_disk(recipe, tmp_path / "out", progress=False))
    a, b = state_dict(llama["a"]), state_dict(llama["b"])
    assert all(torch.allclose(got[k], (a[k] + b[k]) / 2, atol=1e-6) for k in a)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "name: x\nmerge_method: linear\nmodels: [{{model: y}}]\n---\n"
            "name: y\nmerge_method: linear\nmodels: [{{model: x}}]\n",
            "one stage must be the final one",
        ),
        (
            "name: x\nmerge_method: linear\nmodels: [{{model: {a}}}]\n---\n"
            "merge_method: linear\nmodels: [{{model: x, parameters: {{wieght: 1}}}}]\n",
            "stage 2: models[0].parameters.wieght: unknown parameter",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {a}}}]\n---\n"
            "merge_method: linear\nmodels: [{{model: {b}}}]\n",
            "document 1: every stage but the last needs a name",
        ),
    ],
)
def test_bad_multi_recipes_are_one_line_and_nothing_is_written(
    text: str, needle: str, llama: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _write(tmp_path, text.format(**llama))
    with pytest.raises(RecipeError) as info:
        merge_to_disk(recipe, tmp_path / "out", progress=False)
    assert needle in str(info.value) and str(recipe) in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.stages").exists()


def test_an_output_that_cannot_be_written_is_refused_before_any_stage(
    llama: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked up front: no stage runs, no work folder is left beside OUT."""
    from shoal.errors import OutputExistsError

    recipe = _write(tmp_path, _multi(llama))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="output exists"):
        merge_to_disk(recipe, tmp_path / "out", progress=False)
    with pytest.raises(OutputExistsError, match="holds the recipe"):
        merge_to_disk(recipe, tmp_path, progress=False, overwrite=True)
    base = Path(llama["base"])
    with pytest.raises(OutputExistsError, match="holds the recipe's model"):
        merge_to_disk(recipe, base, progress=False, overwrite=True)
    monkeypatch.chdir(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="working directory"):
        merge_to_disk(recipe, ".", progress=False, overwrite=True)
    assert recipe.is_file() and (tmp_path / "out" / "mine.txt").read_text() == "mine"
    leftovers = [p.name for p in [*tmp_path.iterdir(), *base.parent.iterdir()]]
    assert not [n for n in leftovers if n.endswith(".stages")]


def test_one_recipe_is_never_merged_over_its_own_folder(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    from shoal.errors import OutputExistsError

    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = folder / "r.yml"
    recipe.write_text(MULTI.format(**llama).split("---\n")[1].replace("name: first\n", ""))
    with pytest.raises(OutputExistsError, match="holds the recipe"):
        merge_to_disk(recipe, folder, progress=False, overwrite=True)
    assert recipe.is_file()
