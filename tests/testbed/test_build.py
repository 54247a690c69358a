"""The tiny testbed, built once per module: layout, loading, splits, report, CLI."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.errors import OutputExistsError, TaskError
from shoal.testbed import build_testbed, load_testbed, report_testbed
from shoal.testbed.skills import SKILLS

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny(tiny_testbed: Path) -> Path:
    return tiny_testbed


@pytest.fixture(scope="module")
def tiny_report(tiny: Path) -> Any:
    return report_testbed(tiny)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_metadata(tiny: Path) -> None:
    meta = json.loads((tiny / "testbed.json").read_text())
    assert meta["skills"] == list(SKILLS)
    assert meta["seed"] == 0 and meta["size"]["name"] == "tiny"
    assert meta["build_seconds"] > 0
    names = {"base", *(f"expert-{s}" for s in SKILLS)}
    assert set(meta["models"]) == names
    for name in names:
        d = tiny / name
        for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
            assert (d / f).is_file(), f"{name}/{f}"
        assert meta["models"][name]["sha256"] == _sha(d / "model.safetensors")
    for skill in SKILLS:
        for split, n in meta["split_sizes"][skill].items():
            path = tiny / "data" / skill / f"{split}.jsonl"
            assert len(path.read_text().splitlines()) == n
            assert meta["data_sha256"][skill][split] == _sha(path)
    # nothing left behind next to the testbed
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["tiny"]


def test_models_load_with_transformers(tiny: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "base")
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    assert tok("Q: x")["input_ids"][0] == tok.bos_token_id
    base = AutoModelForCausalLM.from_pretrained(tiny / "base")
    expert = AutoModelForCausalLM.from_pretrained(tiny / "expert-gcd")
    assert base.config.model_type == "llama"
    assert base.config.tie_word_embeddings
    assert base.generation_config.eos_token_id == tok.eos_token_id
    sb, se = base.state_dict(), expert.state_dict()
    assert sb.keys() == se.keys()
    assert any(not torch.equal(sb[k], se[k]) for k in sb)  # the expert was fine-tuned
    out = base(**tok(["Q: 1 + 1 =\nA:"], return_tensors="pt"))
    assert out.logits.shape[-1] == len(tok)


def test_stored_splits_are_held_out(tiny: Path) -> None:
    bed = load_testbed(tiny)
    for skill in bed.skills:
        q = {
            s: {e["question"] for e in bed.examples(skill, s)}
            for s in ("train", "validation", "test")
        }
        assert not q["train"] & (q["validation"] | q["test"])
        assert not q["validation"] & q["test"]


def test_load_testbed_api(tiny: Path) -> None:
    bed = load_testbed(tiny)
    assert bed.skills == tuple(SKILLS)
    assert list(bed.models()) == ["base", *(f"expert-{s}" for s in SKILLS)]
    task = bed.task("gcd", "validation", limit=5)
    assert len(task) == 5 and task.name == "gcd/validation"
    with pytest.raises(TaskError, match="nope"):
        bed.task("nope")
    with pytest.raises(TaskError, match="dev"):
        bed.examples("gcd", "dev")
    with pytest.raises(TaskError, match=r"testbed\.json"):
        load_testbed(tiny / "data")


def test_each_expert_at_least_as_good_as_base_on_own_skill(tiny_report: Any) -> None:
    rep = tiny_report
    for skill in rep.skills:
        assert rep.scores[f"expert-{skill}"][skill] >= rep.scores["base"][skill], rep.to_markdown()


def test_report_files_and_task_scores_agree(tiny: Path, tiny_report: Any) -> None:
    from transformers import AutoModelForCausalLM

    saved = json.loads((tiny / "report.json").read_text())
    assert saved["scores"] == tiny_report.scores
    assert "| expert-gcd |" in (tiny / "report.md").read_text()
    bed = load_testbed(tiny)
    model = AutoModelForCausalLM.from_pretrained(bed.experts["gcd"])
    scores = bed.task("gcd", "test").score(model)
    assert scores.shape == (tiny_report.n["gcd"],)
    assert set(np.unique(scores)) <= {0.0, 1.0}
    np.testing.assert_array_equal(scores, saved["per_example"]["expert-gcd"]["gcd"])
    assert tiny_report.scores["expert-gcd"]["gcd"] == pytest.approx(100 * scores.mean(), abs=0.01)


def test_existing_output_is_refused(tiny: Path) -> None:
    with pytest.raises(OutputExistsError, match="tiny"):
        build_testbed(tiny, "tiny")
    with pytest.raises(TaskError, match="huge"):
        build_testbed(tiny.parent / "other", "huge")


def test_cli_report_and_errors(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from shoal.cli.main import main

    monkeypatch.setattr(
        sys, "argv", ["shoal", "testbed", "report", str(tiny), "--split", "validation"]
    )
    main()  # success returns normally
    out = capsys.readouterr().out
    assert "expert-spell_backward" in out and "validation" in out
    assert (tiny / "report-validation.json").is_file()

    monkeypatch.setattr(sys, "argv", ["shoal", "testbed", "build", str(tiny)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(tiny) in err
