"""CycleQD candidates as weights on the experts, checked against the models the run built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from shoal.merge import merge_state_dicts
from shoal.report import write_report
from shoal.report.mixtures import expert_mixtures
from shoal.search.run_folder import RunFolder
from shoal.search.runner import evolve
from shoal.testbed.images import EXPERT_GROUPS_3, write_image_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cycleqd-digits.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A 10-generation CycleQD run on the three digits experts without mutation, so that
    every model it builds is exactly a mixture of the experts."""
    root = tmp_path_factory.mktemp("mix")
    experts = write_image_experts(root / "digits-3", groups=EXPERT_GROUPS_3, shared_init=True)
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["models"] = {k: str(v) for k, v in experts.items()}
    cfg["algorithm"].update(generations=10, children=2, mutation="none")
    cfg.update(progress=False, baselines=False)
    evolve(cfg, root / "run")
    return root / "run", experts


def _mixture(experts: dict[str, Path], names: list[str], w: list[float]) -> dict:
    """θ_base + Σ w_k τ_k, built by the merge engine from the experts' files."""
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": n, "parameters": {"weight": x}} for n, x in zip(names, w, strict=True)
        ],
        "parameters": {"lambda": 1.0, "normalize": False},
    }
    sources = {n: load_file(str(experts[n])) for n in ["base", *names]}
    return merge_state_dicts(recipe, sources)


def test_each_elite_is_the_mixture_its_weights_say(run) -> None:
    folder, experts = run
    m = expert_mixtures(RunFolder(folder))
    assert m is not None and len(m.experts) == 3
    assert all(sum(w) == pytest.approx(1.0) and min(w) >= 0 for w, _, _ in m.candidates)
    stored = sorted((folder / "store").glob("*.safetensors"))
    children = [p for p in stored if f"store:{p.stem}" in m.weights][:6]
    assert len(children) >= 3
    for path in children:
        want = _mixture(experts, m.experts, m.weights[f"store:{path.stem}"])
        got = load_file(str(path))
        for name, tensor in got.items():
            torch.testing.assert_close(tensor, want[name], atol=1e-5, rtol=1e-5)
    # the final aggregate, written as best/, is the mixture at its weights too
    assert m.aggregate is not None
    want = _mixture(experts, m.experts, m.aggregate)
    best = load_file(str(folder / "best" / "model.safetensors"))
    for name, tensor in best.items():
        torch.testing.assert_close(tensor, want[name], atol=1e-5, rtol=1e-5)


def test_the_report_draws_the_triangle(run) -> None:
    folder, _ = run
    out = write_report(folder)
    assert (out / "mixtures.png").stat().st_size > 10_000


def test_a_seed_that_is_no_expert_cannot_be_placed(run, tmp_path: Path) -> None:
    folder, _ = run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("state.json", "config.yaml"):
        shutil.copy(folder / name, copy / name)
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    events[0]["recipe"] = {"model": "ps"}  # as if an earlier stage's result seeded it
    (copy / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert expert_mixtures(RunFolder(folder)) is not None
    assert expert_mixtures(RunFolder(copy)) is None


def test_a_failed_candidate_is_no_point(run, tmp_path: Path) -> None:
    """A candidate that failed to build or score is left out of the drawing."""
    folder, _ = run
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(folder / "state.json", copy / "state.json")
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    events[5]["error"], events[5]["means"] = "RuntimeError: boom", None
    (copy / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    whole, cut = expert_mixtures(RunFolder(folder)), expert_mixtures(RunFolder(copy))
    assert whole is not None and cut is not None
    assert len(cut.candidates) == len(whole.candidates) - 1
