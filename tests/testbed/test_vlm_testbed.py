"""The VLM testbed (``shoal.testbed.vlm``), ``tiny`` size: what it writes, held-out splits,
same seed same tensors, and that its models load and are scored by the ``vqa`` task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shoal.testbed.vlm import build_vlm_testbed, vlm_task


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vlm_testbed(tmp_path_factory.mktemp("vlm") / "tb", "tiny", 0, score=False)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_models_and_data_are_written(testbed: Path) -> None:
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(testbed / "vlm").model_type == "llava"
    for name in ("base", "expert"):
        assert AutoConfig.from_pretrained(testbed / name).model_type == "llama"
    images = np.load(testbed / "data" / "images.npy")
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    meta = json.loads((testbed / "vlm_testbed.json").read_text())
    assert meta["n"]["digits"]["test"] == 2 * 16 and meta["n"]["increment"]["test"] == 16


def test_test_items_are_held_out(testbed: Path) -> None:
    data = testbed / "data"
    train_images = {r["image"] for r in _rows(data / "digits-train.jsonl")}
    test_images = {r["image"] for r in _rows(data / "digits-test.jsonl")}
    assert test_images and not test_images & train_images
    train_q = {r["question"] for r in _rows(data / "increment-train.jsonl")}
    test_rows = _rows(data / "increment-test.jsonl")
    assert test_rows and not {r["question"] for r in test_rows} & train_q
    assert all(r["image"] is None for r in test_rows)
    # answers by hand: "add one to 9 0 4" -> "0 1 5"
    for r in test_rows:
        digits = r["question"].removeprefix("add one to ").split()
        assert r["answer"].split() == [str((int(d) + 1) % 10) for d in digits]


def test_same_seed_same_tensors(testbed: Path, tmp_path: Path) -> None:
    again = build_vlm_testbed(tmp_path / "again", "tiny", 0, score=False)
    for name in ("base", "vlm", "expert"):
        a = load_file(str(testbed / name / "model.safetensors"))
        b = load_file(str(again / name / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_vlm_language_part_starts_from_base_architecture(testbed: Path) -> None:
    vlm = load_file(str(testbed / "vlm" / "model.safetensors"))
    base = load_file(str(testbed / "base" / "model.safetensors"))
    for name, tensor in base.items():
        assert vlm["language_model." + name].shape == tensor.shape


def test_vqa_task_scores_both_kinds_of_model(testbed: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    task = vlm_task(testbed, "digits", "test")
    vlm = AutoModelForImageTextToText.from_pretrained(testbed / "vlm")
    lm = AutoModelForCausalLM.from_pretrained(testbed / "expert")
    for model in (vlm, lm):
        scores = task.score(model)
        assert scores.shape == (len(task),) and scores.dtype == np.float64
        assert set(np.unique(scores)) <= {0.0, 1.0}
