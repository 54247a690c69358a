"""parse_size, check_finite, copy_model_files, tensor_shapes and first_mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shoal.checkpoint import (
    ShardedWriter,
    check_finite,
    copy_model_files,
    first_mismatch,
    parse_size,
    tensor_shapes,
)
from shoal.errors import CheckpointError, RecipeError


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500MB", 500_000_000),
        ("2GB", 2_000_000_000),
        ("1.5GiB", 1_610_612_736),
        ("64KiB", 65_536),
        (" 3 gb ", 3_000_000_000),
        ("1234", 1234),
        (4096, 4096),
        ("10B", 10),
    ],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "GB", "2XB", "-1GB", "0", 0, "1.2.3MB"])
def test_parse_size_rejects(bad: str | int) -> None:
    with pytest.raises(RecipeError, match="size"):
        parse_size(bad)


def test_check_finite() -> None:
    check_finite(torch.ones(3), name="w", source="m.safetensors")
    check_finite(torch.tensor([1, 2]), name="i", source="m")
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]).to(torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: tensor 'w' holds 1 NaN and 2 inf"):
        check_finite(bad, name="w", source="m.safetensors")


def test_copy_model_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "a": 1}))
    wanted = [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "merges.txt",
        "vocab.json",
        "spiece.model",
        "chat_template.jinja",
        "added_tokens.json",
    ]
    for name in [*wanted, "model.safetensors", "README.md", "training_args.bin"]:
        (src / name).write_text(name)
    with ShardedWriter(tmp_path / "out") as w:
        written = copy_model_files(src, w, config_updates={"num_hidden_layers": 5})
    assert sorted(written) == sorted(["config.json", *wanted])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", *wanted])
    assert json.loads((out / "config.json").read_text()) == {"num_hidden_layers": 5, "a": 1}
    assert (out / "spiece.model").read_text() == "spiece.model"


@pytest.mark.parametrize(
    ("text", "match"), [("{oops", "not valid JSON"), ("[1]", "expected a JSON object")]
)
def test_copy_model_files_rejects_a_bad_config(tmp_path: Path, text: str, match: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(text)
    with (
        pytest.raises(CheckpointError, match=rf"config\.json: {match}"),
        ShardedWriter(tmp_path / "out") as w,
    ):
        copy_model_files(src, w)
    assert not (tmp_path / "out").exists()


def test_tensor_shapes_and_where_two_tables_first_differ(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"b": torch.zeros(2, 3), "a": torch.zeros(4)}, str(tmp_path / "m.safetensors"))
    shapes = tensor_shapes(tmp_path / "m.safetensors")
    assert shapes == {"a": (4,), "b": (2, 3)}
    assert first_mismatch(shapes, dict(shapes)) is None
    assert first_mismatch(shapes, {"b": (2, 3)}) == ("a", "missing")
    assert first_mismatch(shapes, {"a": (4,), "b": (3, 2)}) == ("b", "shape")
    assert first_mismatch(shapes, {**shapes, "z": (1,), "c": (1,)}) == ("z", "extra")  # got's order
    # a missing tensor is reported before a wrong shape further on, and before an extra one
    assert first_mismatch({"a": (4,), "b": (1,)}, {"b": (2,), "x": (1,)}) == ("a", "missing")
