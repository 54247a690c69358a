"""Image generation scored by a classifier: one 0/1 score per (class, seed) prompt.

The model is a class-conditional diffusion U-Net (a diffusers ``UNet2DModel`` with
``num_class_embeds``, or anything called as ``model(x, t, class_labels=y)`` that returns
the predicted noise, bare or as ``.sample``). Each example is one prompt, a class label
and a seed: the seed draws the starting noise with its own ``torch.Generator``, a fixed
diffusers scheduler (DDIM by default: no noise after the start) runs a fixed number of
steps, and a classifier looks at the image. The score is 1.0 when the classifier's
arg-max is the intended class. The same model therefore always gets the same scores from
the same task; another ``batch_size`` changes the images only by float rounding (the
kernels sum in another order), which can flip an image the classifier finds borderline.

Classifier-free guidance is optional: with ``guidance_scale`` w ≠ 1 and a ``null_class``
(the label the model was trained on for "no class"), the noise estimate is
ε_null + w (ε_class − ε_null), the usual guidance formula (Ho & Salimans, 2022).

``type: image-generation`` in a run config builds an :class:`ImageGenerationTask`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from shoal._extras import import_extra
from shoal.errors import TaskError
from shoal.tasks.base import Task
from shoal.tasks.registry import TaskEnv, TaskOptions, register_task_type

__all__ = [
    "ImageGenerationOptions",
    "ImageGenerationTask",
    "generate_images",
    "load_scheduler",
    "start_noise",
]


def load_scheduler(path: str | Path, kind: str | None = None) -> Any:
    """A diffusers scheduler from a folder holding ``scheduler_config.json``.

    Args:
        path: the scheduler folder (a pipeline's ``scheduler/``) or the pipeline folder.
        kind: a diffusers scheduler class name (``DDIMScheduler``) that replaces the one
            the config names, keeping its noise schedule; ``None`` keeps the config's.

    Raises:
        TaskError: no scheduler config there, or an unknown class name.
    """
    diffusers = import_extra("diffusers", "diffusion", "the image-generation task")

    folder = Path(path)
    if not (folder / "scheduler_config.json").is_file() and (folder / "scheduler").is_dir():
        folder = folder / "scheduler"
    cfg_path = folder / "scheduler_config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TaskError(f"{cfg_path}: no readable scheduler config ({exc})") from None
    name = kind or str(config.get("_class_name", ""))
    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_config"):
        raise TaskError(f"{cfg_path}: unknown diffusers scheduler {name!r}")
    return cls.from_config(config)


def start_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The starting noise of one prompt: float32 ``shape`` from ``torch.Generator(seed)``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def _unet_shape(model: Any) -> tuple[int, int, int]:
    config = getattr(model, "config", None)
    try:
        size = config.sample_size  # type: ignore[union-attr]
        channels = int(config.in_channels)  # type: ignore[union-attr]
    except AttributeError:
        raise TaskError(
            "image generation needs a model with config.sample_size and config.in_channels "
            "(a diffusers UNet2DModel)"
        ) from None
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return channels, h, w


def _noise_estimate(
    model: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    guidance_scale: float,
    null_class: int | None,
) -> torch.Tensor:
    def call(inp: torch.Tensor, tt: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        out = model(inp, tt, class_labels=lab)
        return out.sample if hasattr(out, "sample") else out

    if guidance_scale == 1.0 or null_class is None:
        return call(x, t, labels)
    null = torch.full_like(labels, null_class)
    both = call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def generate_images(
    model: Any,
    scheduler: Any,
    labels: Sequence[int],
    seeds: Sequence[int],
    *,
    steps: int = 10,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Generate one image per (label, seed) pair.

    Args:
        model: a class-conditional U-Net (``model(x, t, class_labels=y)``).
        scheduler: a diffusers scheduler; ``set_timesteps(steps)`` is called on it.
        labels: the class of each image.
        seeds: the seed of each image's starting noise (:func:`start_noise`).
        steps: inference steps.
        guidance_scale: classifier-free guidance weight (1.0: none).
        null_class: the "no class" label used by guidance.
        batch_size: images per forward pass (other sizes: the same images up to rounding).

    Returns:
        float32 tensor ``(n, channels, height, width)`` on the CPU, in the model's range.
    """
    if len(labels) != len(seeds):
        raise TaskError(f"{len(labels)} labels but {len(seeds)} seeds (must be equal)")
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    shape = _unet_shape(model)
    scheduler.set_timesteps(int(steps))
    timesteps = scheduler.timesteps
    sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    out = []
    for start in range(0, len(labels), batch_size):
        lab = torch.as_tensor(list(labels[start : start + batch_size]), dtype=torch.int64)
        noise = [start_noise(shape, s) for s in seeds[start : start + batch_size]]
        x = (torch.stack(noise) * sigma).to(device)
        lab = lab.to(device)
        for t in timesteps:
            inp = scheduler.scale_model_input(x, t)
            tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.int64)
            eps = _noise_estimate(model, inp.to(dtype), tt, lab, guidance_scale, null_class)
            x = scheduler.step(eps.float(), t, x).prev_sample
        out.append(x.float().cpu())
    return torch.cat(out) if out else torch.empty((0, *shape))


class ImageGenerationTask:
    """Generate an image per prompt and score whether a classifier sees the intended class.

    Args:
        name: the task's name within a run.
        classifier: a module mapping images ``(n, c, h, w)`` in the generator's range to
            logits ``(n, classes)``.
        scheduler: a diffusers scheduler (e.g. from :func:`load_scheduler`).
        classes: the class of each prompt (with ``seeds``: one example per pair).
        seeds: the noise seed of each prompt.
        steps, guidance_scale, null_class, batch_size: as :func:`generate_images`.
    """

    def __init__(
        self,
        name: str,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        scheduler: Any,
        classes: Sequence[int],
        seeds: Sequence[int],
        *,
        steps: int = 10,
        guidance_scale: float = 1.0,
        null_class: int | None = None,
        batch_size: int = 256,
    ) -> None:
        if len(classes) != len(seeds):
            raise TaskError(f"task {name!r}: {len(classes)} classes but {len(seeds)} seeds")
        if steps < 1 or batch_size < 1:
            raise TaskError(f"task {name!r}: steps and batch_size must be ≥ 1")
        self.name = name
        self.classifier = classifier
        self.scheduler = scheduler
        self.classes = [int(c) for c in classes]
        self.seeds = [int(s) for s in seeds]
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.null_class = null_class
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return len(self.classes)

    def images(self, model: Any) -> torch.Tensor:
        """The image of every prompt, in order (see :func:`generate_images`)."""
        return generate_images(
            model,
            self.scheduler,
            self.classes,
            self.seeds,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            null_class=self.null_class,
            batch_size=self.batch_size,
        )

    def score(self, model: Any) -> np.ndarray:
        """1.0 for each prompt whose image the classifier assigns to its class, else 0.0."""
        images = self.images(model)
        with torch.no_grad():
            logits = self.classifier(images)
        pred = logits.argmax(-1).cpu()
        return (pred == torch.as_tensor(self.classes)).numpy().astype(np.float64)


class ImageGenerationOptions(TaskOptions):
    """Fields of ``type: image-generation``."""

    classifier: str = Field(
        ..., description="'package.module:function' returning the classifier nn.Module."
    )
    classifier_options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the classifier factory."
    )
    scheduler: str = Field(
        ..., description="Folder with scheduler_config.json (a pipeline's scheduler/)."
    )
    scheduler_class: str | None = Field(
        default="DDIMScheduler",
        description="diffusers scheduler class run on that config (null: the config's own).",
    )
    classes: list[int] = Field(..., min_length=1, description="Class labels of the prompts.")
    seeds: list[int] = Field(
        ...,
        min_length=1,
        description="Noise seeds; every class is generated with every seed "
        "(or [start, stop) with seed_range: true).",
    )
    seed_range: bool = Field(default=False, description="Read seeds as [start, stop).")
    steps: int = Field(default=10, ge=1, description="Inference steps of the scheduler.")
    guidance_scale: float = Field(default=1.0, description="Classifier-free guidance weight.")
    null_class: int | None = Field(default=None, description="The 'no class' label (guidance).")
    batch_size: int = Field(default=256, ge=1, description="Images per forward pass.")


@register_task_type("image-generation", ImageGenerationOptions)
def build_image_generation(o: ImageGenerationOptions, env: TaskEnv) -> Task:
    """Build an :class:`ImageGenerationTask` from its options."""
    from shoal.tasks.python import import_callable

    if o.seed_range:
        if len(o.seeds) != 2 or o.seeds[1] <= o.seeds[0]:
            raise TaskError("task.seeds: with seed_range, give [start, stop) with stop > start")
        seed_list = list(range(o.seeds[0], o.seeds[1]))
    else:
        seed_list = list(o.seeds)
    factory = import_callable(o.classifier, "task.classifier")
    options = dict(o.classifier_options)
    if "path" in options:  # a relative classifier path is the config's
        options["path"] = str(env.resolve(str(options["path"])))
    try:
        classifier = factory(**options)
    except TypeError as exc:
        raise TaskError(f"task.classifier {o.classifier!r}: {exc}") from None
    if isinstance(classifier, torch.nn.Module):
        classifier = classifier.to(env.device).eval()
    scheduler = load_scheduler(env.resolve(o.scheduler), o.scheduler_class)
    classes = [c for c in o.classes for _ in seed_list]
    seeds = [s for _ in o.classes for s in seed_list]
    name = o.name or f"image-generation-{len(classes)}"
    return ImageGenerationTask(
        name,
        classifier,
        scheduler,
        classes,
        seeds,
        steps=o.steps,
        guidance_scale=o.guidance_scale,
        null_class=o.null_class,
        batch_size=o.batch_size,
    )
