"""``shoal export`` of a CycleQD run and the report's archive replay (digits, seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from shoal.cli.main import app
from shoal.report import write_report
from shoal.report.archives import archive_history
from shoal.search.run_folder import RunFolder
from shoal.search.runner import evolve
from shoal.testbed.images import EXPERT_GROUPS_3, write_image_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cycleqd-digits.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 10-generation CycleQD run on the three digits experts."""
    root = tmp_path_factory.mktemp("cqd")
    experts = write_image_experts(root / "digits-3", groups=EXPERT_GROUPS_3, shared_init=True)
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["models"] = {k: str(v) for k, v in experts.items()}
    cfg["algorithm"].update(generations=10, children=2)
    cfg.update(progress=False, baselines=True)
    evolve(cfg, root / "run")
    return root / "run"


def _state(run: Path) -> dict:
    return json.loads((run / "state.json").read_text())["algorithm"]["state"]


def test_replayed_archives_end_as_the_saved_ones(run):
    history = archive_history(RunFolder(run))
    assert history is not None
    saved = _state(run)["archives"]
    for archive, state in zip(history.archives, saved, strict=True):
        replayed = archive.state_dict()
        assert [(e["cell"], e["quality"], e["behaviour"]) for e in replayed["elites"]] == [
            (e["cell"], e["quality"], e["behaviour"]) for e in state["elites"]
        ]
        assert [e["data"]["evaluation"] for e in replayed["elites"]] == [
            e["data"]["evaluation"] for e in state["elites"]
        ]
    # snapshots: after the 3 experts and round(20 i / 4) of the 20 children, i = 1..4;
    # coverage never shrinks
    assert [n for n, _ in history.snapshots] == [8, 13, 18, 23]
    many = archive_history(RunFolder(run), snapshots=12)  # none falls among the seeds
    # 3 + 20 i / 12 rounded: 4.67, 6.33, 8, 9.67, 11.33, 13, ... 23
    assert many is not None
    assert [n for n, _ in many.snapshots] == [5, 6, 8, 10, 11, 13, 15, 16, 18, 20, 21, 23]
    for task in history.tasks:
        cov = history.coverage[task]
        assert cov == sorted(cov) and cov[0] == pytest.approx(3 / 225)
    assert history.experts == {
        "digits-train-0-2": "expert-0-2",
        "digits-train-3-5": "expert-3-5",
        "digits-train-6-9": "expert-6-9",
    }


def test_report_draws_the_archives_and_lists_the_specialists(run, tmp_path):
    out = write_report(run)
    assert (out / "archives.png").stat().st_size > 10_000
    assert (out / "qd.png").stat().st_size > 10_000
    text = (out / "summary.md").read_text()
    assert "## CycleQD archives" in text
    summary = json.loads((run / "summary.json").read_text())
    for k, t in enumerate(["digits-train-0-2", "digits-train-3-5", "digits-train-6-9"]):
        assert f"| best-{t} |" in text
        # the specialist's train score on its task is its archive's best quality
        quality = max(e["quality"] for e in _state(run)["archives"][k]["elites"])
        got = summary["specialists"][f"best-{t}"]["scores"]["fitness"][t]
        assert got == pytest.approx(quality, abs=1e-12)
    assert "scored on every split in the table above" in text
    # an unfinished run has no scores table to point at
    skip = shutil.ignore_patterns("report", "store", "summary.json")
    unfinished = Path(shutil.copytree(run, tmp_path / "unfinished", ignore=skip))
    text = (write_report(unfinished) / "summary.md").read_text()
    assert "table above" not in text and "scored on every split once the run ends" in text


def test_export_of_an_elite_is_the_stored_model(run, tmp_path):
    cli = CliRunner()
    listed = cli.invoke(app, ["export", str(run), "--list"])
    assert listed.exit_code == 0, listed.output
    first = _state(run)["archives"][2]["elites"][0]
    cell = ",".join(map(str, first["cell"]))
    assert f"{cell}" in listed.output
    out = tmp_path / "elite"
    res = cli.invoke(
        app, ["export", str(run), "--elite", f"digits-train-6-9:{cell}", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    ref = first["data"]["ref"]
    got = load_file(str(out / "model.safetensors"))
    if ref.startswith("store:"):
        want = load_file(str(run / "store" / f"{ref.removeprefix('store:')}.safetensors"))
    else:  # an expert itself
        want = load_file(str(yaml.safe_load((run / "config.yaml").read_text())["models"][ref]))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    card = (out / "README.md").read_text()
    assert f"digits-train-6-9:{cell}" in card and "train means" in card


def test_export_of_the_aggregate_is_best(run, tmp_path):
    """...and leaves the caller's torch thread count as it was (its worker picks its own)."""
    out = tmp_path / "agg"
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not what the digits worker sets (one thread under the suite)
    try:
        res = CliRunner().invoke(app, ["export", str(run), "--aggregate", "--out", str(out)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert res.exit_code == 0, res.output
    got = load_file(str(out / "model.safetensors"))
    want = load_file(str(run / "best" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--elite", "nope:0,0"], "no archive 'nope'"),
        (["--elite", "digits-train-0-2:x"], "CELL is i,j"),
        (["--elite", "digits-train-0-2:14,14"], "is empty"),
        (["--elite", "digits-train-0-2:15,0"], "CELL is 2 indices in 0..14"),
        (["--elite", "digits-train-0-2:-1,0"], "CELL is 2 indices in 0..14"),
        (["--elite", "digits-train-0-2:0,1,2"], "one per behaviour axis (digits-train-3-5, "),
        (["--aggregate", "--stage", "nosuch"], "has no such stage (stages: none"),
        (["--elite", "digits-train-0-2"], "give TASK:CELL"),
        ([], "give exactly one of"),
        (["--aggregate"], "--out: give the folder"),
    ],
)
def test_bad_export_requests_are_one_line(run, tmp_path, shoal_cli, args, needle):
    out = tmp_path / "x"
    extra = ["--out", str(out)] if "--elite" in args or "--stage" in args else []
    code, _, err = shoal_cli(["export", str(run), *args, *extra])
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_run_that_is_not_cycleqd_is_named(tmp_path, shoal_cli):
    (tmp_path / "config.yaml").write_text("models: {}\n")
    (tmp_path / "state.json").write_text('{"algorithm": {"algorithm": "ps", "state": {}}}')
    code, _, err = shoal_cli(["export", str(tmp_path), "--list"])
    assert code == 2 and "no saved CycleQD state" in err


def test_a_run_killed_before_its_first_save_says_so(run, tmp_path, shoal_cli):
    """Killed before its first checkpoint: a config and some events, no state."""
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("config.yaml", "events.jsonl"):
        shutil.copy(run / name, killed / name)
    code, _, err = shoal_cli(["export", str(killed), "--list"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "its CycleQD run has saved nothing yet (no state.json)" in err
    assert "shoal evolve --resume" in err


def test_a_chain_whose_cycleqd_stage_has_saved_nothing_says_so(run, tmp_path, shoal_cli):
    cfg = yaml.safe_load((run / "config.yaml").read_text())  # the run's, as a second stage
    cqd = cfg.pop("algorithm")
    cfg["stages"] = [{"name": "ps", "algorithm": {"name": "ps"}}, {"name": "cqd", "algorithm": cqd}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    for name in ("ps", "cqd"):
        (tmp_path / "stages" / name).mkdir(parents=True)
    (tmp_path / "stages" / "ps" / "state.json").write_text('{"algorithm": {"algorithm": "ps"}}')
    for extra in ([], ["--stage", "cqd"]):
        code, _, err = shoal_cli(["export", str(tmp_path), "--list", *extra])
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "its CycleQD stage 'cqd' has saved nothing yet" in err and "--resume" in err


def test_export_never_replaces_the_run_or_its_models(run, tmp_path, shoal_cli):
    """--overwrite replaces OUT: not when OUT is the run, inside it, or holds its models."""
    experts = run.parent / "digits-3"
    expert_file = next(experts.glob("*.safetensors"))
    before = sorted(p.name for p in experts.iterdir())
    for out, needle in [
        (run, "or inside it; write elsewhere"),
        (run / "best", "or inside it; write elsewhere"),
        (run / "config.yaml", "or inside it; write elsewhere"),
        (run.parent, "holds the run folder"),
        (experts, "holds the run's model"),
        (expert_file, "holds the run's model"),
    ]:
        args = ["export", str(run), "--aggregate", "--out", str(out), "--overwrite"]
        code, _, err = shoal_cli(args)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (out, err)
    assert sorted(p.name for p in experts.iterdir()) == before and expert_file.is_file()
    assert (run / "best" / "model.safetensors").is_file() and (run / "state.json").is_file()
