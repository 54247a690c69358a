"""The vision-language testbed: a tiny LLaVA that reads digits, and an LM expert it lacks.

Built offline in seconds (``tiny``) or about a minute (``small``) on two CPU cores, with
fixed seeds, as normal Hugging Face directories:

- ``base/``: a tiny Llama pre-trained on text: copying digit strings (``copy 4 7 1`` →
  ``4 7 1``), the successor of a digit (``after 4?`` → ``5``) and its parity
  (``is 4 even?`` → ``yes``);
- ``vlm/``: a ``LlavaForConditionalGeneration`` (CLIP vision tower on sklearn's 8×8 digits,
  a two-layer projector) whose language model starts as ``base`` and is trained with it
  on two image questions, ``which digit?`` and ``is it even?`` (LLaVA's recipe: the
  language model trained too, at a lower rate);
- ``expert/``: ``base`` fine-tuned on a text skill the VLM lacks, adding one to every
  digit of a string (``add one to 4 7 1`` → ``5 8 2``);
- ``data/``: ``images.npy`` (every digit image as ``pixel_values``) and, per split
  (train, validation, test), ``digits-<split>.jsonl`` (image questions) and
  ``increment-<split>.jsonl`` (text questions, ``image: null``) for the ``vqa`` task type.
  Images and digit strings are split apart, so test items are unseen in training.

Merging the VLM's language part with the expert (``base`` as the common ancestor) should
keep the image skill and add the text one; ``bench/vlm_testbed.py`` measures it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal._atomic import atomic_dir, refuse_working_dir, remove_stale_temp_siblings
from shoal.errors import OutputExistsError, TaskError
from shoal.testbed.build import save_model, write_jsonl
from shoal.testbed.tokenizer import train_tokenizer

__all__ = [
    "IMAGE_TOKEN",
    "VLM_SIZES",
    "VLMTestbedSize",
    "build_vlm_testbed",
    "score_vlm_testbed",
    "vlm_task",
]

IMAGE_TOKEN = "<image>"
TEMPLATE = "Q: {question}\nA:"
SKILLS = ("digits", "increment")
MODELS = ("base", "vlm", "expert")
IGNORE = -100
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class VLMTestbedSize:
    """Everything one build size needs besides the seed.

    Attributes:
        name: Preset name.
        hidden_size: Llama hidden width (the VLM's language model and the expert).
        num_layers: Llama decoder layers.
        num_heads: Attention heads.
        intermediate_size: Llama feed-forward width.
        vision_hidden: CLIP vision tower width.
        vision_layers: CLIP encoder layers.
        patch_size: CLIP patch size on the 8×8 image ((8 / patch)² image tokens).
        base_steps: Pre-training steps of ``base``.
        vlm_steps: Training steps of the VLM.
        expert_steps: Fine-tuning steps of the expert.
        batch_size: Sequences per step.
        lr: Peak learning rate of ``base`` and of the VLM's vision tower and projector.
        vlm_lm_lr: Peak learning rate of the VLM's language model.
        expert_lr: Peak learning rate of the expert.
        strings_test: Held-out digit strings in the test split (as many validation: half).
        images_test: Held-out images in the test split (validation: half).
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vision_hidden: int
    vision_layers: int
    patch_size: int
    base_steps: int
    vlm_steps: int
    expert_steps: int
    batch_size: int
    lr: float
    vlm_lm_lr: float
    expert_lr: float
    strings_test: int
    images_test: int


VLM_SIZES: dict[str, VLMTestbedSize] = {
    # a pipeline check for tests: seconds, skills barely learned
    "tiny": VLMTestbedSize(
        name="tiny",
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        vision_hidden=16,
        vision_layers=1,
        patch_size=4,
        base_steps=20,
        vlm_steps=20,
        expert_steps=20,
        batch_size=16,
        lr=3e-3,
        vlm_lm_lr=1e-3,
        expert_lr=1e-3,
        strings_test=16,
        images_test=16,
    ),
    # the example's and the bench's size
    "small": VLMTestbedSize(
        name="small",
        hidden_size=96,
        num_layers=2,
        num_heads=4,
        intermediate_size=256,
        vision_hidden=48,
        vision_layers=2,
        patch_size=2,
        base_steps=600,
        vlm_steps=800,
        expert_steps=150,
        batch_size=32,
        lr=3e-3,
        vlm_lm_lr=3e-4,
        expert_lr=3e-4,
        strings_test=200,
        images_test=300,
    ),
}


def get_vlm_size(name: str) -> VLMTestbedSize:
    """The preset called ``name``.

    Raises:
        TaskError: no such preset, naming the known ones.
    """
    if name not in VLM_SIZES:
        raise TaskError(
            f"--size: unknown VLM testbed size {name!r} (known: {', '.join(VLM_SIZES)})"
        )
    return VLM_SIZES[name]


# -- data -----------------------------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 digits as ``pixel_values`` (N, 1, 8, 8) in [-1, 1], and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    return pixels[:, None, :, :], bunch.target.astype(np.int64)


def _split(n: int, test: int, rng: np.random.Generator) -> dict[str, list[int]]:
    order = rng.permutation(n).tolist()
    val = test // 2
    return {
        "test": sorted(order[:test]),
        "validation": sorted(order[test : test + val]),
        "train": sorted(order[test + val :]),
    }


def _spaced(s: str) -> str:
    return " ".join(s)


def _image_items(indices: Sequence[int], labels: np.ndarray) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i in indices:
        label = int(labels[i])
        rows.append({"image": int(i), "question": "which digit?", "answer": str(label)})
        even = "yes" if label % 2 == 0 else "no"
        rows.append({"image": int(i), "question": "is it even?", "answer": even})
    return rows


def _increment_items(strings: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"image": None, "question": f"add one to {_spaced(s)}", "answer": _spaced(_plus_one(s))}
        for s in strings
    ]


def _plus_one(s: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in s)


def _pretraining_items(strings: Sequence[str]) -> list[dict[str, Any]]:
    """``base``'s text: copying strings, adding one to them in a terse form (``inc 4 7 1``;
    the expert learns the spelled-out question, as the LM testbed's experts do), and each
    digit's successor and parity."""
    rows = []
    for s in strings:
        rows.append({"image": None, "question": f"copy {_spaced(s)}", "answer": _spaced(s)})
        rows.append(
            {"image": None, "question": f"inc {_spaced(s)}", "answer": _spaced(_plus_one(s))}
        )
    for d in range(10):
        facts = [
            (f"after {d}?", str((d + 1) % 10)),
            (f"is {d} even?", "yes" if d % 2 == 0 else "no"),
        ]
        rows.extend({"image": None, "question": q, "answer": a} for q, a in facts)
    return rows


# -- models ---------------------------------------------------------------------------


def _init_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded initialisation, in name order: matrices and embeddings N(0, 0.02²), biases
    zero, norm gains one (nothing reads the global RNG)."""
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.ndim >= 2 or name.endswith("class_embedding"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def _text_config(size: VLMTestbedSize, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vlm(size: VLMTestbedSize, base: Any, tokenizer: Any, generator: torch.Generator) -> Any:
    """A LLaVA whose language model is a copy of ``base``; vision tower and projector new."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=2,
        image_size=8,
        patch_size=size.patch_size,
        num_channels=1,
        projection_dim=size.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=base.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(8 // size.patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    vlm = LlavaForConditionalGeneration(config)
    _init_(vlm, generator)
    with torch.no_grad():
        vlm.model.language_model.load_state_dict(base.model.state_dict())
        vlm.lm_head.load_state_dict(base.lm_head.state_dict())
    return vlm


# -- training -------------------------------------------------------------------------


def _encode(
    tokenizer: Any, rows: Sequence[dict[str, Any]], image_prefix: str
) -> list[tuple[list[int], int, int | None]]:
    """(token ids, prompt length, image index) per row: prompt, `` answer``, ``<eos>``."""
    prompts = [
        (image_prefix if r["image"] is not None else "") + TEMPLATE.format(question=r["question"])
        for r in rows
    ]
    p_ids = tokenizer(prompts)["input_ids"]
    a_ids = tokenizer([" " + r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [
        (list(p) + list(a) + [eos], len(p), r["image"])
        for p, a, r in zip(p_ids, a_ids, rows, strict=True)
    ]


def _train(
    model: Any,
    data: Sequence[tuple[list[int], int, int | None]],
    groups: list[dict[str, Any]],
    *,
    steps: int,
    batch_size: int,
    pad_id: int,
    images: torch.Tensor | None,
    generator: torch.Generator,
    on_step: Callable[[int], None],
) -> float:
    """AdamW with linear warm-up and decay, loss on answer tokens; returns the last loss."""
    peaks = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 10)
    order = torch.randperm(len(data), generator=generator).tolist()
    cursor, loss_value = 0, float("nan")
    params = [p for g in groups for p in g["params"]]
    model.train()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=generator).tolist(), 0
        rows = [data[i] for i in order[cursor : cursor + batch_size]]
        cursor += batch_size
        factor = (step + 1) / warmup if step < warmup else (steps - step) / (steps - warmup)
        for group, peak in zip(opt.param_groups, peaks, strict=True):
            group["lr"] = peak * max(0.0, factor)
        width = max(len(ids) for ids, _, _ in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (seq, plen, _) in enumerate(rows):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            labels[r, plen : len(seq)] = torch.tensor(seq[plen:])
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        with_image = [img for _, _, img in rows if img is not None]
        if with_image:
            assert images is not None
            batch["pixel_values"] = images[torch.tensor(with_image)]
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_value = float(loss.detach())
        on_step(step + 1)
    model.eval()
    return loss_value


# -- building and scoring -------------------------------------------------------------


def build_vlm_testbed(
    out_dir: str | Path,
    size: str | VLMTestbedSize = "small",
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    score: bool = True,
) -> Path:
    """Build the VLM testbed into ``out_dir`` (atomically: all of it or nothing).

    Training runs on the CPU with one torch thread (set for the build, then put back),
    every random draw from ``torch.Generator``/``numpy`` generators seeded by ``seed``, so
    the same seed on the same host gives the same tensors.

    Args:
        out_dir: Directory to create.
        size: A :data:`VLM_SIZES` name or preset.
        seed: Root seed.
        overwrite: Replace ``out_dir`` if it exists.
        progress: Called as ``progress(phase, done, total)`` while training.
        score: Score every model on every skill's test split into ``vlm_testbed.json``.

    Returns:
        ``out_dir`` as a path.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is off.
        TaskError: an unknown size.
    """
    preset = get_vlm_size(size) if isinstance(size, str) else size
    out = Path(out_dir)
    refuse_working_dir(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_siblings(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with atomic_dir(out) as tmp:
            _build_into(tmp, preset, seed, progress or (lambda *_: None), score)
    finally:
        torch.set_num_threads(threads)
    return out


def _build_into(
    root: Path, size: VLMTestbedSize, seed: int, progress: Progress, score: bool
) -> None:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    gen = {k: torch.Generator().manual_seed(seed * 1000 + i) for i, k in enumerate(MODELS)}
    pixels, labels = _digits()
    image_split = _split(len(labels), size.images_test, rng)
    strings = [f"{i:03d}" for i in range(1000)]
    string_split = {
        k: [strings[i] for i in v] for k, v in _split(len(strings), size.strings_test, rng).items()
    }
    data = root / "data"
    data.mkdir(parents=True)
    np.save(data / "images.npy", pixels)
    splits: dict[str, dict[str, list[dict[str, Any]]]] = {
        "digits": {k: _image_items(v, labels) for k, v in image_split.items()},
        "increment": {k: _increment_items(v) for k, v in string_split.items()},
    }
    for skill, by_split in splits.items():
        for split, rows in by_split.items():
            write_jsonl(data / f"{skill}-{split}.jsonl", rows)
    pretrain = _pretraining_items(string_split["train"])

    corpus = [
        TEMPLATE.format(question=r["question"]) + " " + r["answer"]
        for rows in (pretrain, splits["digits"]["train"], splits["increment"]["train"])
        for r in rows
    ]
    tokenizer = train_tokenizer(corpus, vocab_size=320)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    pad = tokenizer.pad_token_id

    def tracker(phase: str, total: int) -> Callable[[int], None]:
        progress(phase, 0, total)
        return lambda done: progress(phase, done, total)

    base = LlamaForCausalLM(_text_config(size, tokenizer))
    _init_(base, gen["base"])
    params = list(base.parameters())
    _train(
        base,
        _encode(tokenizer, pretrain, ""),
        [{"params": params, "lr": size.lr}],
        steps=size.base_steps,
        batch_size=size.batch_size,
        pad_id=pad,
        images=None,
        generator=gen["base"],
        on_step=tracker("base (text)", size.base_steps),
    )
    save_model(base, tokenizer, root / "base", max_new_tokens=8)

    vlm = _vlm(size, base, tokenizer, gen["vlm"])
    prefix = IMAGE_TOKEN * int(vlm.config.image_seq_length)
    language = [p for n, p in vlm.named_parameters() if ".language_model." in n or "lm_head" in n]
    chosen = {id(p) for p in language}
    vision = [p for p in vlm.parameters() if id(p) not in chosen]
    _train(
        vlm,
        _encode(tokenizer, splits["digits"]["train"], prefix),
        [{"params": vision, "lr": size.lr}, {"params": language, "lr": size.vlm_lm_lr}],
        steps=size.vlm_steps,
        batch_size=size.batch_size,
        pad_id=pad,
        images=torch.from_numpy(pixels),
        generator=gen["vlm"],
        on_step=tracker("vlm (image questions)", size.vlm_steps),
    )
    save_model(vlm, tokenizer, root / "vlm", max_new_tokens=8)

    expert = LlamaForCausalLM(base.config)
    expert.load_state_dict(base.state_dict())
    _train(
        expert,
        _encode(tokenizer, splits["increment"]["train"], ""),
        [{"params": list(expert.parameters()), "lr": size.expert_lr}],
        steps=size.expert_steps,
        batch_size=size.batch_size,
        pad_id=pad,
        images=None,
        generator=gen["expert"],
        on_step=tracker("expert (add one)", size.expert_steps),
    )
    save_model(expert, tokenizer, root / "expert", max_new_tokens=8)
    build_seconds = time.perf_counter() - started
    meta: dict[str, Any] = {
        "kind": "vlm",
        "seed": seed,
        "size": asdict(size),
        "models": list(MODELS),
        "skills": list(SKILLS),
        "n": {s: {k: len(v) for k, v in by.items()} for s, by in splits.items()},
        "build_seconds": round(build_seconds, 2),
    }
    if score:
        models = {"base": base, "vlm": vlm, "expert": expert}
        meta["test_scores"] = {
            name: {s: float(vlm_task(root, s, "test", tokenizer).score(m).mean()) for s in SKILLS}
            for name, m in models.items()
        }
    (root / "vlm_testbed.json").write_text(json.dumps(meta, indent=2) + "\n")


def vlm_task(root: str | Path, skill: str, split: str = "test", tokenizer: Any = None) -> Any:
    """The :class:`~shoal.tasks.vqa.VQATask` of one skill and split of a built testbed.

    Args:
        root: The testbed directory.
        skill: ``digits`` or ``increment``.
        split: ``train``, ``validation`` or ``test``.
        tokenizer: Default: the VLM's, read from ``root/vlm``.

    Raises:
        TaskError: an unknown skill or split, or a directory that is no VLM testbed.
    """
    from shoal.tasks.vqa import VQATask, load_images, read_vqa

    root = Path(root)
    if skill not in SKILLS or split not in ("train", "validation", "test"):
        raise TaskError(f"VLM testbed: unknown skill/split {skill!r}/{split!r}")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(root / "vlm")
    images = load_images(root / "data" / "images.npy")
    items = read_vqa(root / "data" / f"{skill}-{split}.jsonl", images.numpy())
    return VQATask(f"{skill}-{split}", items, images, tokenizer, template=TEMPLATE)


def score_vlm_testbed(
    root: str | Path, models: dict[str, str | Path] | None = None, split: str = "test"
) -> dict[str, dict[str, float]]:
    """Exact match (fraction) of each model on each skill of ``split``.

    Args:
        root: The testbed directory.
        models: Name → model directory (a VLM or a causal LM); default: the testbed's own.
        split: The split scored.

    Returns:
        ``{model: {skill: mean score}}``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    root = Path(root)
    paths = models or {name: root / name for name in MODELS}
    tasks = {s: vlm_task(root, s, split) for s in SKILLS}
    out: dict[str, dict[str, float]] = {}
    for name, path in paths.items():
        config = AutoConfig.from_pretrained(path)
        auto: Any = (
            AutoModelForImageTextToText
            if getattr(config, "vision_config", None) is not None
            else AutoModelForCausalLM
        )
        model = auto.from_pretrained(path)
        out[name] = {s: float(t.score(model).mean()) for s, t in tasks.items()}
    return out
