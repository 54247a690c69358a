"""Every evolve config in examples/ runs end to end, shortened, on the tiny testbed.

The examples point at `.testbed/small` and `.testbed/digits`; here those paths are
swapped for the suite's tiny testbed and freshly written digits experts, and the
budgets cut to a generation or two, so the files users copy cannot drift from the
config schema or the algorithms' options.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from shoal.search.runner import evolve
from shoal.testbed.images import EXPERT_GROUPS_3, write_image_experts

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))

pytestmark = pytest.mark.filterwarnings("ignore")


def _shorten(config: dict) -> list[str]:
    """Overrides that cut an example to a few evaluations on few examples."""
    sets = ["progress=false"]
    stages = config.get("stages") or [config]
    for i, stage in enumerate(stages):
        prefix = f"stages.{i}." if "stages" in config else ""
        algo = stage["algorithm"]
        sets.append(f"{prefix}budget.evaluations=4")
        if algo["name"] in ("ps", "dfs"):
            sets.append(f"{prefix}algorithm.popsize=4")
        if algo["name"] == "m2n2":
            sets.append(f"{prefix}algorithm.archive_size=3")
    for split in ("fitness", "validation", "test"):
        for j, spec in enumerate(config["tasks"].get(split, [])):
            if spec["type"] in ("testbed", "vqa"):
                sets.append(f"tasks.{split}.{j}.limit=6")
            if spec["type"] == "image-generation":  # two prompts, two steps
                sets.append(f"tasks.{split}.{j}.classes=[0, 5]")
                sets.append(f"tasks.{split}.{j}.steps=2")
                if spec.get("seed_range"):
                    first = spec["seeds"][0]
                    sets.append(f"tasks.{split}.{j}.seeds=[{first}, {first + 2}]")
    return sets


def test_there_are_examples_for_every_algorithm() -> None:
    names = {yaml.safe_load(p.read_text()).get("algorithm", {}).get("name") for p in EXAMPLES}
    assert {"ps", "dfs", "m2n2"} <= names
    assert any("stages" in yaml.safe_load(p.read_text()) for p in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_shortened(example: Path, tiny_testbed: Path, tmp_path: Path) -> None:
    text = example.read_text()
    if "../.testbed/digits-3" in text:  # three class-group experts from one base (CycleQD)
        write_image_experts(tmp_path / "digits-3", groups=EXPERT_GROUPS_3, shared_init=True)
        text = text.replace("../.testbed/digits-3", str(tmp_path / "digits-3"))
    if "../.testbed/digits/" in text:
        write_image_experts(tmp_path / "digits")
        text = text.replace("../.testbed/digits/", f"{tmp_path / 'digits'}/")
    if "../.testbed/mnist-shared" in text:
        write_image_experts(tmp_path / "mnist", "mnist", steps=2, shared_init=True)
        text = text.replace("../.testbed/mnist-shared", str(tmp_path / "mnist"))
    if "../.testbed/diffusion" in text:  # a few steps each: the files, not the models
        from shoal.testbed.diffusion import DiffusionSettings, build_diffusion_testbed

        quick = DiffusionSettings(base_steps=2, expert_steps=2, batch_size=8, classifier_steps=2)
        build_diffusion_testbed(tmp_path / "diffusion", settings=quick)
        text = text.replace("../.testbed/diffusion", str(tmp_path / "diffusion"))
    if ".testbed/vlm-small" in text:  # the tiny VLM testbed (seconds): PS and DFS examples
        from shoal.testbed.vlm import build_vlm_testbed

        build_vlm_testbed(tmp_path / "vlm", "tiny", score=False)
        text = text.replace("../.testbed/vlm-small", str(tmp_path / "vlm"))
    text = text.replace("../.testbed/small", str(tiny_testbed))
    config = yaml.safe_load(text)
    config["root"] = str(example.parent)
    result = evolve(config, tmp_path / "run", overrides=_shorten(config))
    assert result.status == "completed"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["evaluations"] >= 1
    logs = sorted((tmp_path / "run").rglob("events.jsonl"))  # one per stage of a staged run
    assert logs
    events = [json.loads(line) for log in logs for line in log.open()]
    failed = [e["error"] for e in events if e.get("error")]
    assert not failed, failed[0]  # a candidate the example's own models cannot build
    best = summary["best"]
    test_names = [t.get("name") or t.get("skill") for t in config["tasks"]["test"]]
    assert len(best["scores"]["test"]) - ("mean" in best["scores"]["test"]) == len(test_names)
    assert (tmp_path / "run" / "best").is_dir()
