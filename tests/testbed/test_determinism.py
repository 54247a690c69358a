"""Same seed, same tensors: two builds of a micro testbed compared byte for byte."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from shoal.testbed import build_testbed
from shoal.testbed.sizes import SIZES

# the tiny preset shrunk to a few optimiser steps: the whole pipeline in seconds
MICRO = dataclasses.replace(
    SIZES["tiny"],
    name="micro",
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    base_steps=4,
    expert_steps=3,
    batch_size=8,
    train_per_skill=60,
    validation_per_skill=6,
    test_per_skill=6,
)


def _build(root: Path, seed: int) -> dict:
    out = build_testbed(root / f"s{seed}-{len(list(root.iterdir()))}", MICRO, seed, threads=1)
    return json.loads((out / "testbed.json").read_text()) | {"_root": str(out)}


@pytest.mark.filterwarnings("ignore")
def test_same_seed_same_tensors(tmp_path: Path) -> None:
    a, b, c = _build(tmp_path, 5), _build(tmp_path, 5), _build(tmp_path, 6)
    for name in a["models"]:
        ta = load_file(Path(a["_root"]) / name / "model.safetensors")
        tb = load_file(Path(b["_root"]) / name / "model.safetensors")
        assert ta.keys() == tb.keys()
        for key in ta:
            assert ta[key].equal(tb[key]), f"{name}: {key} differs between same-seed builds"
        assert a["models"][name]["sha256"] == b["models"][name]["sha256"]
        assert a["models"][name]["sha256"] != c["models"][name]["sha256"]
    assert a["data_sha256"] == b["data_sha256"]
    assert a["data_sha256"] != c["data_sha256"]
    tok_a = (Path(a["_root"]) / "base" / "tokenizer.json").read_text()
    assert tok_a == (Path(b["_root"]) / "base" / "tokenizer.json").read_text()


@pytest.mark.filterwarnings("ignore")
def test_terse_base_and_expert_lr_change_the_models_and_stay_deterministic(tmp_path: Path) -> None:
    """small's recipe (base on the terse form, gentler experts) on the micro preset."""
    terse = dataclasses.replace(MICRO, terse_base=True, expert_lr=1e-4)
    builds = {
        key: json.loads(
            (build_testbed(tmp_path / key, size, 5, threads=1) / "testbed.json").read_text()
        )["models"]
        for key, size in (
            ("a", terse),
            ("b", terse),
            ("plain", MICRO),
            ("lr", dataclasses.replace(MICRO, terse_base=True)),
        )
    }
    for name in builds["a"]:
        assert builds["a"][name]["sha256"] == builds["b"][name]["sha256"]
        assert builds["a"][name]["sha256"] != builds["plain"][name]["sha256"]
        # expert_lr moves the experts only
        assert (builds["a"][name]["sha256"] == builds["lr"][name]["sha256"]) == (name == "base")
