"""Per-layer parameter schedules: gradients, filters, positions (hand-computed values)."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.recipe import evaluate, interpolate, is_pre_tensor, position, resolve


@pytest.mark.parametrize("t", [0.0, 0.1, 0.25, 0.5, 0.66, 0.9, 1.0])
def test_interpolate_matches_numpy(t: float) -> None:
    values = [1.0, 0.7, 0.1, 0.4]
    expected = np.interp(t, np.linspace(0, 1, len(values)), values)
    assert interpolate(values, t) == pytest.approx(expected)


def test_interpolate_hand_values() -> None:
    # three points at 0, 0.5, 1: at t=0.25 halfway between 1 and 0.7
    assert interpolate([1, 0.7, 0.1], 0.25) == pytest.approx(0.85)
    assert interpolate([1, 0.7, 0.1], 1.0) == pytest.approx(0.1)
    assert interpolate([0.3], 0.8) == pytest.approx(0.3)


def test_position_follows_mergekit() -> None:
    assert position("model.layers.0.mlp.up_proj.weight", 0, 4) == 0.0
    assert position("model.layers.3.mlp.up_proj.weight", 3, 4) == 1.0
    assert position("model.layers.1.mlp.up_proj.weight", 1, 4) == pytest.approx(1 / 3)
    assert position("x", 0, 1) == 1.0  # one layer: t = 1 as mergekit
    assert position("model.embed_tokens.weight", None, 4) == 0.0
    assert position("transformer.wte.weight", None, 4) == 0.0
    # every non-layer tensor sits at t = 0, also after the blocks (mergekit's planner)
    assert position("model.norm.weight", None, 4) == 0.0
    assert position("lm_head.weight", None, 4) == 0.0
    assert is_pre_tensor("embeddings.word_embeddings.weight")
    assert not is_pre_tensor("pooler.dense.weight")
    # GPT-NeoX: embed_in is the input embedding, embed_out the output head
    assert is_pre_tensor("gpt_neox.embed_in.weight")
    assert not is_pre_tensor("embed_out.weight")
    assert position("embed_out.weight", None, 4) == 0.0


def test_filters_first_match_wins_and_default() -> None:
    setting = [
        {"filter": "self_attn", "value": [0.0, 1.0]},
        {"filter": "mlp", "value": 0.25},
        {"value": 0.5},
    ]
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 1.0) == 1.0
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 0.3) == 0.25
    assert evaluate(setting, "model.norm.weight", 1.0) == 0.5
    assert evaluate(setting[:2], "model.norm.weight", 1.0) is None


def test_resolve_gradient_per_layer() -> None:
    # 2 layers: layer 0 at t=0 → 1.0, layer 1 at t=1 → 0.1; head at t=0 (as mergekit)
    assert resolve([1.0, 0.7, 0.1], "model.layers.0.x", 0, 2) == 1.0
    assert resolve([1.0, 0.7, 0.1], "model.layers.1.x", 1, 2) == pytest.approx(0.1)
    assert resolve([1.0, 0.7, 0.1], "model.embed_tokens.weight", None, 2) == 1.0
    assert resolve([1.0, 0.7, 0.1], "lm_head.weight", None, 2) == 1.0
    assert resolve(True, "x", None, None) is True
    assert resolve("l1", "x", None, None) == "l1"
