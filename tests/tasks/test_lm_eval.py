"""``type: lm-eval`` on a tiny local multiple-choice task (skipped without lm-eval)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from lm_fixtures import PROMPTS_MC, make_model, make_tokenizer

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shoal.tasks.choice import choice_logprobs
from shoal.tasks.registry import TaskEnv, build_task


@pytest.mark.slow
def test_lm_eval_local_task_per_example_scores_match_loglik(tmp_path):
    rows = [{"q": p, "choices": c, "gold": g} for p, c, g in PROMPTS_MC]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n"
        "target_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n"
    )
    tok, model = make_tokenizer(), make_model(5)
    task = build_task(
        {"type": "lm-eval", "task": "tiny_mc", "include_path": "tasks", "batch_size": 4},
        TaskEnv(tokenizer=tok, root=str(tmp_path)),
    )
    assert len(task) == len(rows)
    got = task.score(model)
    # independent: the choice with the highest summed log-prob (lm-eval's acc)
    lps = choice_logprobs(
        model, tok, [r["q"] for r in rows], [[" " + c for c in r["choices"]] for r in rows]
    )
    expected = np.array(
        [float(np.argmax(a[0]) == r["gold"]) for a, r in zip(lps, rows, strict=True)]
    )
    assert got.shape == (len(rows),)
    assert np.array_equal(got, expected)
    assert 0 < expected.sum() < len(rows)  # the check can fail both ways
