"""The ``vqa`` task type: prompts, image routing and exact match, against a stand-in VLM
whose answer is computed from the pixels it is handed (so a wrong image gives a wrong
answer), and a plain causal LM that must never see image tokens."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from shoal.errors import TaskError
from shoal.tasks import build_task
from shoal.tasks.registry import TaskEnv
from shoal.tasks.vqa import VQATask, image_prompt_prefix

IMAGE = "<image>"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from shoal.testbed.tokenizer import train_tokenizer

    corpus = [f"Q: which digit?\nA: {d}" for d in range(10)] + ["Q: add one to 1 2\nA: 2 3"] * 3
    tok = train_tokenizer(corpus, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return tok


class _Reader(torch.nn.Module):
    """Answers an image question with the sum of its pixels, a text question with ``t``."""

    def __init__(self, tokenizer: Any, vision: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok = tokenizer
        self.seen: list[tuple[list[list[int]], bool]] = []
        self.config = SimpleNamespace(
            vision_config={} if vision else None,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
            image_seq_length=3,
        )

    def generate(self, input_ids: torch.Tensor, pixel_values: Any = None, **_: Any) -> torch.Tensor:
        self.seen.append((input_ids.tolist(), pixel_values is not None))
        rows = []
        for r in range(len(input_ids)):
            text = str(int(pixel_values[r].sum())) if pixel_values is not None else "t"
            rows.append(self.tok(" " + text, add_special_tokens=False)["input_ids"])
        width = max(len(x) for x in rows)
        new = torch.full((len(rows), width), self.tok.eos_token_id)
        for r, x in enumerate(rows):
            new[r, : len(x)] = torch.tensor(x)
        return torch.cat([input_ids, new], dim=1)


def _write(tmp_path: Path, rows: list[dict[str, Any]], n_images: int = 4) -> tuple[Path, Path]:
    images = np.zeros((n_images, 1, 2, 2), dtype=np.float32)
    for i in range(n_images):
        images[i, 0, 0, 0] = i + 1  # image i's pixels sum to i + 1
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "items.jsonl", tmp_path / "images.npy"


ROWS = [
    {"image": 2, "question": "which digit?", "answer": "3"},
    {"image": None, "question": "add one to 1 2", "answer": "t"},
    {"image": 0, "question": "which digit?", "answer": "1"},
    {"image": 3, "question": "which digit?", "answer": "9"},  # the reader says 4: wrong
]


def _task(tmp_path: Path, tokenizer: Any, rows: list[dict[str, Any]] = ROWS) -> VQATask:
    path, images = _write(tmp_path, rows)
    spec = {"type": "vqa", "path": str(path), "images": str(images), "batch_size": 2}
    task = build_task(spec, TaskEnv(tokenizer=tokenizer))
    assert isinstance(task, VQATask)
    return task


def test_each_item_is_answered_from_its_own_image(tmp_path: Path, tokenizer: Any) -> None:
    task = _task(tmp_path, tokenizer)
    model = _Reader(tokenizer, vision=True)
    scores = task.score(model)
    assert scores.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert scores.dtype == np.float64


def test_prompts_carry_image_tokens_only_for_a_vlm_and_an_image(
    tmp_path: Path, tokenizer: Any
) -> None:
    task = _task(tmp_path, tokenizer)
    vlm = _Reader(tokenizer, vision=True)
    prefix, token_id = image_prompt_prefix(vlm, tokenizer)
    assert prefix == IMAGE * 3
    prompts = task.prompts(vlm)
    assert prompts[0] == IMAGE * 3 + "Q: which digit?\nA:"
    assert prompts[1] == "Q: add one to 1 2\nA:"
    lm = _Reader(tokenizer, vision=False)
    assert all(IMAGE not in p for p in task.prompts(lm))
    task.score(lm)  # a plain LM is never handed pixels nor image tokens
    assert all(not with_pixels for _, with_pixels in lm.seen)
    assert all(token_id not in row for ids, _ in lm.seen for row in ids)
    # and every VLM row with image tokens came with its pixels, 3 tokens each
    task.score(vlm)
    for ids, with_pixels in vlm.seen:
        counts = {row.count(token_id) for row in ids}
        assert counts == ({3} if with_pixels else {0})


def test_image_index_outside_the_array_names_file_and_line(tmp_path: Path, tokenizer: Any) -> None:
    rows = [*ROWS[:2], {"image": 7, "question": "which digit?", "answer": "1"}]
    with pytest.raises(
        TaskError, match=r"items\.jsonl:3: image 7 is not a row of the images \(4\)"
    ):
        _task(tmp_path, tokenizer, rows)


def test_missing_images_file(tmp_path: Path, tokenizer: Any) -> None:
    path, _ = _write(tmp_path, ROWS)
    spec = {"type": "vqa", "path": str(path), "images": str(tmp_path / "nope.npy")}
    with pytest.raises(TaskError, match=r"nope\.npy: images file not found"):
        build_task(spec, TaskEnv(tokenizer=tokenizer))
