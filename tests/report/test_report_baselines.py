"""The PS examples carry their baselines, scored in the same run and shown beside the best.

The example config is run as it is on the tiny testbed (paths pointed there, a few
evaluations, few items); the baselines in summary.json are checked against scores
computed here independently, and summary.md must show every one of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from shoal.report import write_report
from shoal.search.runner import evolve
from shoal.testbed import load_testbed

pytestmark = pytest.mark.filterwarnings("ignore")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SKILLS = ("chain_sum", "spell_backward", "gcd")


def _on_tiny(name: str, tiny: Path) -> dict:
    text = (EXAMPLES / name).read_text().replace("../.testbed/small", str(tiny))
    cfg = yaml.safe_load(text)
    for split in ("fitness", "test"):
        for task in cfg["tasks"][split]:
            task["limit"] = 8
    cfg["progress"] = False
    return cfg


@pytest.mark.parametrize("example", ["ps-testbed-small.yaml", "ps-dfs-testbed-small.yaml"])
def test_ps_examples_name_base_experts_and_the_untuned_merge(example: str) -> None:
    cfg = yaml.safe_load((EXAMPLES / example).read_text())
    untuned = cfg["baselines"]["dare_ties-untuned"]
    assert untuned["merge_method"] == "dare_ties" and untuned["base_model"] == "base"
    experts = {m for m in cfg["models"] if m.startswith("expert-")}
    assert {m["model"] for m in untuned["models"]} == experts == {f"expert-{s}" for s in SKILLS}
    # PS's own starting point: every weight and density at x0 = 0.5
    assert all(m["parameters"] == {"weight": 0.5, "density": 0.5} for m in untuned["models"])


def test_ps_run_scores_the_baselines_and_the_report_shows_them(
    tiny_testbed: Path, tmp_path: Path
) -> None:
    cfg = _on_tiny("ps-testbed-small.yaml", tiny_testbed)
    cfg["budget"] = {"evaluations": 4}
    cfg["algorithm"]["popsize"] = 2
    result = evolve(cfg, tmp_path / "run")
    baselines = result.summary["baselines"]
    assert set(baselines) == {"base", *(f"expert-{s}" for s in SKILLS), "dare_ties-untuned"}

    # every source model, scored here on the same first 8 test items of each skill
    bed = load_testbed(tiny_testbed)
    tokenizer = bed.tokenizer()
    for name, path in bed.models().items():
        model = AutoModelForCausalLM.from_pretrained(path)
        for skill in SKILLS:
            task = bed.task(skill, "test", limit=8, tokenizer=tokenizer)
            mine = float(task.score(model).mean())
            got = [v for k, v in baselines[name]["test"].items() if k.startswith(skill)]
            assert got == [pytest.approx(mine)], (name, skill)

    md = (write_report(tmp_path / "run") / "summary.md").read_text()
    for name in ("best", *baselines):
        assert f"| {name} |" in md
    assert "strongest baseline" in md
