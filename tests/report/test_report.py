"""The report reads a run folder and writes PNG plots and summary.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "search"))
import toy_problem as tp

from shoal.errors import StateError
from shoal.report import load_run, numeric_leaves, write_report
from shoal.search.runner import evolve

PNG = b"\x89PNG\r\n\x1a\n"


def test_numeric_leaves_flattens_recipe_parameters():
    recipe = {
        "merge_method": "ties",
        "base_model": "/m/base",
        "models": [
            {"model": "/m/a", "parameters": {"weight": 0.3, "density": [0.1, 0.2]}},
            {"model": "b", "parameters": {"weight": 0.7, "normalize": True}},
        ],
        "parameters": {"lambda": 1.5},
    }
    assert numeric_leaves(recipe) == {
        "a.weight": 0.3,
        "a.density[0]": 0.1,
        "a.density[1]": 0.2,
        "b.weight": 0.7,
        "lambda": 1.5,
    }


def test_write_report_draws_pngs_and_summary(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    evolve(tp.toy_config(sources, baselines=True), tmp_path / "run")
    out = write_report(tmp_path / "run")
    for name in ("fitness.png", "tasks.png", "parameters.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    md = (out / "summary.md").read_text()
    assert "evaluations: 12" in md and "| best |" in md and "| zero |" in md
    run = load_run(tmp_path / "run")
    assert [e["step"] for e in run.events] == list(range(12))
    # zero and one score 0.5 on the toy task: 1 - mean |c - 0| = 1 - mean |c - 1| = 0.5
    assert "| zero | 0.5000 |" in md
    # the best beside the strongest baseline of this run, on each split's mean
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for split in ("fitness", "test"):
        means = {n: v[split]["mean"] for n, v in summary["baselines"].items()}
        top = max(means, key=lambda n: means[n])
        mine = summary["best"]["scores"][split]["mean"]
        assert (
            f"- {split} mean: best {mine:.4f}, strongest baseline {top} {means[top]:.4f} "
            f"({mine - means[top]:+.4f};" in md
        )
    # redrawing replaces the folder
    write_report(tmp_path / "run")
    assert not list(tmp_path.glob("run/.report*"))


def test_report_of_a_non_run_is_an_error(tmp_path):
    with pytest.raises(StateError, match="not a run folder"):
        write_report(tmp_path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished toy run, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("finished")
    evolve(tp.toy_config(tp.write_sources(root / "src")), root / "run")
    return root / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def test_corrupt_summary_is_one_line_exit_2(finished_run, tmp_path, shoal_cli):
    run = _copy(finished_run, tmp_path)
    (run / "summary.json").write_text("{bad\n")
    code, _, err = shoal_cli(["report", str(run)])
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {run / 'summary.json'}: not valid JSON")
    (run / "summary.json").write_text("[1, 2]\n")
    with pytest.raises(StateError, match=r"summary\.json: expected a JSON object"):
        load_run(run)


def test_torn_last_event_line_is_left_out(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    events = run / "events.jsonl"
    events.write_bytes(events.read_bytes()[:-25])  # a killed run's partial write
    assert len(load_run(run).events) == 11
    assert (write_report(run) / "summary.md").is_file()


def test_corrupt_event_line_names_file_and_line(finished_run, tmp_path, shoal_cli):
    run = _copy(finished_run, tmp_path)
    events = run / "events.jsonl"
    lines = events.read_text().splitlines(keepends=True)
    events.write_text("".join([*lines[:2], "{bad\n", *lines[3:]]))
    code, _, err = shoal_cli(["report", str(run)])
    assert code == 2 and err.count("\n") == 1 and "events.jsonl:3: not an event line" in err
    events.write_text("".join([*lines[:4], '{"recipe": {}}\n', *lines[5:]]))
    with pytest.raises(StateError, match=r"events\.jsonl:5: event lacks 'fitness'"):
        load_run(run)


def test_archive_heatmap_puts_the_first_behaviour_axis_on_x() -> None:
    """imshow draws rows on y: a cell (i, j) of axes (x, y) is the grid's row j, column i."""
    from shoal.report.archives import _grid
    from shoal.search.algorithms.qd_archive import GridArchive

    archive = GridArchive(bins=4, ranges=[(0.0, 1.0), (0.0, 10.0)])
    archive.add_one(0.5, (0.9, 1.0), {})  # x = 0.9: bin 3 of axis 0; y = 1.0: bin 0 of axis 1
    archive.add_one(0.7, (0.1, 9.0), {})  # bin 0 of axis 0, bin 3 of axis 1
    grid = _grid(archive)
    assert grid[0, 3] == 0.5 and grid[3, 0] == 0.7
    assert sum(v == v for v in grid.flat) == 2  # the rest NaN (empty)


def test_a_run_stopped_before_its_state_counts_only_what_resume_keeps(finished_run, tmp_path):
    """A run stopped between a checkpoint's event lines and its state has logged events
    that ``--resume`` will cut and run again: the report counts the saved ones."""
    run = _copy(finished_run, tmp_path)
    (run / "summary.json").unlink()  # not finished
    state = json.loads((run / "state.json").read_text())
    state["runner"]["evaluations"] = 8  # of the 12 logged
    (run / "state.json").write_text(json.dumps(state))
    events = load_run(run).events
    assert [e["evaluation"] for e in events] == list(range(8))
    assert "- evaluations: 8\n" in (write_report(run) / "summary.md").read_text()
