"""``shoal merge`` of a VLM with a causal LM, and ``shoal testbed build --kind vlm``, from the
command line: bad input ends in one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

from cli_helpers import nothing_left, one_error_line


def _recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n"
        f"  - {{model: {tmp_path / 'vlm'}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {tmp_path / 'lm'}, parameters: {{weight: 0.5}}}}\n"
    )
    return recipe


def test_language_part_of_another_architecture(tmp_path: Path, shoal_cli, tiny_llava) -> None:
    tiny_llava.vlm(tmp_path / "vlm", 0, text_type="mistral")
    tiny_llava.lm(tmp_path / "lm", 1)
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(_recipe(tmp_path)), str(out)])
    assert code == 2
    one_error_line(err, str(tmp_path / "vlm"), "mistral", "llama", "language part")
    nothing_left(out)


def test_same_architecture_merges_into_a_vlm(tmp_path: Path, shoal_cli, tiny_llava) -> None:
    tiny_llava.vlm(tmp_path / "vlm", 0)
    tiny_llava.lm(tmp_path / "lm", 1)
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(_recipe(tmp_path)), str(out)])
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"


def test_build_vlm_unknown_size(tmp_path: Path, shoal_cli) -> None:
    out = tmp_path / "tb"
    code, _, err = shoal_cli(["testbed", "build", "--kind", "vlm", str(out), "--size", "huge"])
    assert code == 2
    one_error_line(err, "--size", "huge", "tiny")
    nothing_left(out)


def test_build_vlm_refuses_an_existing_folder(tmp_path: Path, shoal_cli) -> None:
    out = tmp_path / "tb"
    out.mkdir()
    code, _, err = shoal_cli(["testbed", "build", "--kind", "vlm", str(out), "--size", "tiny"])
    assert code == 2
    one_error_line(err, str(out), "--overwrite")
    assert list(out.iterdir()) == []


def test_hf_vlm_loader_on_a_causal_lm(tmp_path: Path, shoal_cli, tiny_llava) -> None:
    """`loader: {type: hf-vlm}` naming a plain causal LM: one line, exit 2, no run folder."""
    tiny_llava.lm(tmp_path / "lm", 1)
    config = tmp_path / "run.yaml"
    config.write_text(
        "models: {lm: lm}\n"
        "loader: {type: hf-vlm, model: lm}\n"
        "tasks: {fitness: [{type: vqa, path: x.jsonl, images: x.npy}]}\n"
        "algorithm: {name: dfs}\n"
    )
    run = tmp_path / "run"
    code, _, err = shoal_cli(["evolve", str(config), "--run-dir", str(run)])
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert "loader.model" in err and "not a vision-language model" in err
    assert "Traceback" not in err
    assert not run.exists()


def test_testbed_kind_mistakes_are_one_line(tmp_path: Path, shoal_cli) -> None:
    out = tmp_path / "tb"
    for args, words in (
        (["--kind", "audio"], "--kind"),
        (["--kind", "vlm", "--threads", "2"], "--threads"),
        (["--kind", "diffusion", "--size", "small"], "--size"),
        (["--kind", "vlm", "--no-report"], "--no-report"),
    ):
        code, _, err = shoal_cli(["testbed", "build", str(out), *args])
        assert code == 2, args
        assert words in one_error_line(err)
        nothing_left(out)
