"""Visual question answering by exact match: (image, question, answer) triples.

``type: vqa`` with ``path`` (a JSONL file, one ``{"image": i, "question": q, "answer":
a}`` per line) and ``images`` (a ``.npy`` array of shape ``(N, C, H, W)``, float32,
already preprocessed into the vision tower's ``pixel_values``). ``image`` is a row index
of that array, or ``null`` for a question without an image (a text-only skill).

The prompt is ``template`` with ``{question}`` filled in. For a vision-language model
(a config with a ``vision_config``, e.g. ``LlavaForConditionalGeneration``) an item with
an image gets the image token ``image_seq_length`` times in front of it, as LLaVA's
processor does, and its ``pixel_values``; a plain causal LM sees the question alone (it
cannot see the image, which is how a language-only source is scored on the same items).
Decoding is greedy; the example scores 1 when the first line of the answer, stripped,
equals the item's answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from shoal.errors import TaskError
from shoal.tasks.base import Task
from shoal.tasks.generation import extract_answer
from shoal.tasks.jsonl import jsonl_rows
from shoal.tasks.registry import TaskEnv, TaskOptions, register_task_type

__all__ = ["VQAItem", "VQAOptions", "VQATask", "image_prompt_prefix", "read_vqa"]

DEFAULT_TEMPLATE = "Q: {question}\nA:"


@dataclass(frozen=True)
class VQAItem:
    """One example: an image index (``None``: no image), a question and its answer."""

    image: int | None
    question: str
    answer: str


def read_vqa(path: Path, images: np.ndarray | None, limit: int | None = None) -> list[VQAItem]:
    """Items of a VQA JSONL file, checked against the image array; errors name file and line.

    Raises:
        TaskError: a line that is no JSON object, lacks ``question``/``answer``, or names an
            image the array does not hold.
    """
    count = 0 if images is None else len(images)
    items: list[VQAItem] = []
    for n, row in jsonl_rows(path):
        if not isinstance(row.get("question"), str):
            raise TaskError(f"{path}:{n}: expected an object with a string 'question'")
        if "answer" not in row:
            raise TaskError(f"{path}:{n}: no 'answer'")
        image = row.get("image")
        if image is not None and (
            isinstance(image, bool) or not isinstance(image, int) or not 0 <= image < count
        ):
            raise TaskError(f"{path}:{n}: image {image!r} is not a row of the images ({count})")
        items.append(VQAItem(image, row["question"], str(row["answer"])))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise TaskError(f"{path}: no examples")
    return items


def _vision_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) if config is not None else None


def image_prompt_prefix(model: Any, tokenizer: Any) -> tuple[str, int]:
    """The image placeholder text a VLM's prompt starts with, and its token id.

    The image token is ``config.image_token_id`` (``image_token_index`` in older configs)
    repeated ``config.image_seq_length`` times, LLaVA's layout.

    Raises:
        TaskError: the config names no image token.
    """
    config = model.config
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    length = getattr(config, "image_seq_length", None)
    if token_id is None or length is None:
        raise TaskError("a vqa task needs a VLM config with image_token_id and image_seq_length")
    token = tokenizer.convert_ids_to_tokens(int(token_id))
    return str(token) * int(length), int(token_id)


@dataclass
class VQATask:
    """Exact match on (image, question, answer) triples, one score per item.

    Attributes:
        name: The task's name.
        items: The examples.
        images: ``pixel_values`` of every image, shape ``(N, C, H, W)``.
        tokenizer: The model's tokenizer (must hold the image token for a VLM).
        template: The prompt, with ``{question}``.
        max_new_tokens: Most tokens generated per item.
        batch_size: Items per ``generate`` call.
    """

    name: str
    items: list[VQAItem]
    images: torch.Tensor
    tokenizer: Any
    template: str = DEFAULT_TEMPLATE
    max_new_tokens: int = 8
    batch_size: int = 64
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def prompts(self, model: Any) -> list[str]:
        """The prompt text of every item for ``model`` (image tokens only for a VLM)."""
        vlm = _vision_config(model) is not None
        prefix = image_prompt_prefix(model, self.tokenizer)[0] if vlm else ""
        return [
            (prefix if item.image is not None else "")
            + self.template.format(question=item.question)
            for item in self.items
        ]

    @torch.inference_mode()
    def answers(self, model: Any) -> list[str]:
        """The extracted answer of ``model`` to every item, in order."""
        tok = self.tokenizer
        vlm = _vision_config(model) is not None
        prompts = self.prompts(model)
        encoded = [tok(p)["input_ids"] for p in prompts]
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        # rows with and without an image go in separate batches, each sorted by length
        groups: dict[bool, list[int]] = {}
        for i, item in enumerate(self.items):
            groups.setdefault(vlm and item.image is not None, []).append(i)
        out = [""] * len(self.items)
        was_training = model.training
        model.eval()
        try:
            for with_image, members in groups.items():
                members.sort(key=lambda i: len(encoded[i]))
                for start in range(0, len(members), self.batch_size):
                    rows = members[start : start + self.batch_size]
                    texts = self._generate(
                        model, rows, encoded, with_image, pad, eos, device, dtype
                    )
                    for i, text in zip(rows, texts, strict=True):
                        out[i] = extract_answer(text)
        finally:
            model.train(was_training)
        return out

    def _generate(
        self,
        model: Any,
        rows: Sequence[int],
        encoded: Sequence[Sequence[int]],
        with_image: bool,
        pad: int,
        eos: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> list[str]:
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[r, width - len(encoded[i]) :] = 1
        extra: dict[str, Any] = {}
        if with_image:
            index = torch.tensor([self.items[i].image for i in rows], dtype=torch.long)
            extra["pixel_values"] = self.images[index].to(device=device, dtype=dtype)
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=pad,
            **extra,
        )
        new = generated[:, width:].cpu()
        return [self.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in new]

    def score(self, model: Any) -> np.ndarray:
        """1.0 per item whose answer matches exactly, else 0.0; shape ``(n,)``, float64."""
        answers = self.answers(model)
        return np.array(
            [float(a == item.answer.strip()) for a, item in zip(answers, self.items, strict=True)],
            dtype=np.float64,
        )


def load_images(path: Path) -> torch.Tensor:
    """The ``pixel_values`` array of a ``.npy`` file as a float32 tensor ``(N, C, H, W)``.

    Raises:
        TaskError: the file is missing, unreadable or not 4-dimensional.
    """
    if not path.is_file():
        raise TaskError(f"{path}: images file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TaskError(f"{path}: not a .npy array ({exc})") from None
    if array.ndim != 4:
        raise TaskError(f"{path}: images must have shape (N, C, H, W), got {list(array.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class VQAOptions(TaskOptions):
    """Fields of ``type: vqa``."""

    path: str = Field(..., description="JSONL of {image, question, answer} (root-relative).")
    images: str = Field(..., description="A .npy of pixel_values, shape (N, C, H, W).")
    template: str = Field(default=DEFAULT_TEMPLATE, description="Prompt with {question}.")
    limit: int | None = Field(default=None, ge=1, description="Use only the first `limit` items.")
    max_new_tokens: int = Field(default=8, ge=1, description="Generation length.")
    batch_size: int = Field(default=64, ge=1, description="Items per generation batch.")
    tokenizer: str | None = Field(
        default=None, description="Tokenizer dir (default: the worker's)."
    )


@register_task_type("vqa", VQAOptions)
def build_vqa(o: VQAOptions, env: TaskEnv) -> Task:
    """Build a :class:`VQATask` from its JSONL file and image array."""
    if "{question}" not in o.template:
        raise TaskError("template: must contain {question}")
    path = env.resolve(o.path)
    images = load_images(env.resolve(o.images))
    items = read_vqa(path, images.numpy(), o.limit)
    return VQATask(
        name=o.name or path.stem,
        items=items,
        images=images,
        tokenizer=env.get_tokenizer(o.tokenizer),
        template=o.template,
        max_new_tokens=o.max_new_tokens,
        batch_size=o.batch_size,
    )
