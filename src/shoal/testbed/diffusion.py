"""The diffusion testbed: tiny class-conditional U-Nets on sklearn's 8×8 digits.

Built offline in minutes on a CPU with fixed seeds:

- ``base/``: a diffusers pipeline folder (``model_index.json``, ``unet/``,
  ``scheduler/``; ``DiffusionPipeline.from_pretrained`` loads it as a ``DDPMPipeline``)
  whose ``UNet2DModel`` learned to denoise every training digit *without* its label:
  every image is shown with the null class (label 10), so the class embeddings of
  0–9 stay at their initial values. It is the shared pre-trained model.
- ``expert-<classes>/``: the base fine-tuned on one group of classes with their
  labels (and the null label for 10 % of the images, which keeps the unconditional
  model usable for guidance). Expert 0–4 never sees a 5, expert 5–9 never sees a 0.
- ``classifier/``: an MLP 64-256-10 trained on the same training digits; it scores
  generated images (``load_classifier`` is the ``image-generation`` task's factory).
- ``testbed.json``: seed, settings, timing, the classifier's test accuracy and a
  fingerprint of every U-Net's weights.

Data: the first 80 % of ``load_digits()`` (1,437 images) train everything, the last
20 % (360) test the classifier, as in :mod:`shoal.testbed.images`. Pixels 0–16 are
mapped to [−1, 1]. Training runs on one torch thread with seeded generators for the
initial weights, the batches and the noise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal._atomic import atomic_dir, refuse_working_dir, remove_stale_temp_siblings
from shoal._extras import import_extra
from shoal.errors import OutputExistsError, TaskError

__all__ = [
    "DIFFUSION_GROUPS",
    "NULL_CLASS",
    "TEST_SEEDS",
    "DiffusionSettings",
    "DigitsClassifier",
    "build_diffusion_testbed",
    "digits_images",
    "expert_name",
    "generation_task",
    "load_classifier",
    "score_diffusion_testbed",
    "testbed_unet",
    "tiny_unet_config",
]

#: the class groups of the two experts
DIFFUSION_GROUPS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
#: the label meaning "no class" (the base is trained on it only)
NULL_CLASS = 10

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DiffusionSettings:
    """How the diffusion testbed is trained.

    Attributes:
        base_steps: Adam steps of the unconditional base.
        expert_steps: Adam steps of each expert's fine-tune.
        batch_size: images per step.
        base_lr: learning rate of the base.
        expert_lr: learning rate of the experts.
        p_uncond: fraction of an expert's images shown with the null label.
        classifier_steps: full-batch Adam steps of the classifier.
        groups: the experts' class groups.
    """

    base_steps: int = 600
    expert_steps: int = 200
    batch_size: int = 128
    base_lr: float = 2e-3
    expert_lr: float = 1e-3
    p_uncond: float = 0.1
    classifier_steps: int = 300
    groups: tuple[tuple[int, ...], ...] = DIFFUSION_GROUPS


def tiny_unet_config() -> dict[str, Any]:
    """The ``UNet2DModel`` config of the testbed: 8×8, one channel, 11 class embeddings."""
    return {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "num_class_embeds": NULL_CLASS + 1,
    }


def _scheduler_config() -> dict[str, Any]:
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": True,
    }


def expert_name(group: Sequence[int]) -> str:
    """``expert-0-4`` for classes 0…4 (first and last class of the group)."""
    return f"expert-{group[0]}-{group[-1]}"


def digits_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's digits as images in [−1, 1]: ``(x_train, y_train, x_test, y_test)``,
    ``x`` float32 ``(n, 1, 8, 8)``, first 1,437 train and last 360 test, unshuffled."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    n_train = int(0.8 * len(y))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class DigitsClassifier(nn.Module):
    """An MLP 64-256-10 over 8×8 images in [−1, 1] (the range the U-Nets generate)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, 10)`` of images ``(n, 1, 8, 8)``."""
        return self.net(x.clamp(-1.0, 1.0))  # type: ignore[no-any-return]


def load_classifier(path: str | Path) -> DigitsClassifier:
    """The testbed's classifier from ``path`` (its ``classifier/`` folder), in eval mode.

    Raises:
        TaskError: no ``model.safetensors`` there, or tensors that do not fit.
    """
    from safetensors.torch import load_file

    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise TaskError(f"{path}: no classifier (model.safetensors) there")
    model = DigitsClassifier()
    try:
        model.load_state_dict(load_file(str(file)))
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0]
        raise TaskError(f"{file}: not the testbed's classifier ({msg})") from None
    return model.eval().requires_grad_(False)


def testbed_unet() -> nn.Module:
    """A fresh U-Net of the testbed's architecture (the ``callable`` loader of its runs:
    every candidate's weights are built into it, so its own are never used)."""
    diffusers = import_extra("diffusers", "diffusion", "the diffusion testbed")

    # its advice against casting with .to(dtype), which the loader does on purpose
    diffusers.utils.logging.set_verbosity_error()
    return _make_unet(0)  # type: ignore[no-any-return]


def _make_unet(seed: int) -> Any:
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global RNG
        torch.manual_seed(seed)
        return UNet2DModel(**tiny_unet_config())


def _train_unet(
    unet: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    p_uncond: float,
    seed: int,
    phase: str,
    progress: Progress | None,
) -> list[float]:
    """ε-prediction training (DDPM loss) of ``unet`` on ``(x, y)``; returns the losses.

    ``p_uncond`` = 1 shows every image with the null label (the unconditional base).
    """
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**_scheduler_config())
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    unet.train()
    losses: list[float] = []
    n_t = noise_sched.config.num_train_timesteps
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        xb, yb = x[idx], y[idx].clone()
        drop = torch.rand(batch_size, generator=gen) < p_uncond
        yb[drop] = NULL_CLASS
        noise = torch.randn(xb.shape, generator=gen)
        t = torch.randint(0, n_t, (batch_size,), generator=gen)
        noisy = noise_sched.add_noise(xb, noise, t)
        loss = (unet(noisy, t, class_labels=yb).sample - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None and ((step + 1) % 20 == 0 or step + 1 == steps):
            progress(phase, step + 1, steps)
    unet.eval()
    return losses


def _train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> DigitsClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def _save_pipeline(unet: Any, out: Path) -> None:
    from diffusers import DDIMScheduler, DDPMPipeline

    sched = DDIMScheduler(**_scheduler_config(), set_alpha_to_one=True)
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.save_pretrained(str(out), safe_serialization=True)


def _fingerprint(root: Path, names: Sequence[str]) -> str:
    import hashlib

    from safetensors import safe_open

    digest = hashlib.sha256()
    for name in sorted(names):
        path = root / name / "unet" / "diffusion_pytorch_model.safetensors"
        digest.update(f"model {name}\n".encode())
        with safe_open(str(path), framework="pt") as fh:
            for key in sorted(fh.keys()):
                t = fh.get_tensor(key).contiguous()
                digest.update(f"{key} {t.dtype} {tuple(t.shape)}\n".encode())
                digest.update(t.numpy().tobytes())
    return digest.hexdigest()


#: the held-out noise seeds the testbed reports (the example configs' test seeds)
TEST_SEEDS = range(1000, 1050)


def generation_task(
    root: str | Path, seeds: Sequence[int] = TEST_SEEDS, *, name: str = "digits-test"
) -> Any:
    """The ``image-generation`` task of a testbed: every class with every seed, 10 DDIM
    steps, guidance 2 over the null class, scored by the testbed's classifier."""
    from shoal.tasks.image_generation import ImageGenerationTask, load_scheduler

    root = Path(root)
    classes = [c for c in range(NULL_CLASS) for _ in seeds]
    return ImageGenerationTask(
        name,
        load_classifier(root / "classifier"),
        load_scheduler(root / "base" / "scheduler"),
        classes,
        [s for _ in range(NULL_CLASS) for s in seeds],
        steps=10,
        guidance_scale=2.0,
        null_class=NULL_CLASS,
    )


def score_diffusion_testbed(
    root: str | Path, seeds: Sequence[int] = TEST_SEEDS
) -> dict[str, list[float]]:
    """Each U-Net's accuracy of the intended class, per class 0–9, on ``seeds``."""
    UNet2DModel = import_extra("diffusers", "diffusion", "the diffusion testbed").UNet2DModel

    root = Path(root)
    task = generation_task(root, seeds)
    meta = json.loads((root / "testbed.json").read_text())
    out: dict[str, list[float]] = {}
    for name in meta["models"]:
        unet = UNet2DModel.from_pretrained(str(root / name / "unet")).eval()
        scores = task.score(unet).reshape(NULL_CLASS, len(seeds))
        out[name] = [float(v) for v in scores.mean(axis=1)]
    return out


def build_diffusion_testbed(
    out_dir: str | Path,
    *,
    seed: int = 0,
    settings: DiffusionSettings | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    score: bool = False,
) -> Path:
    """Train the base, one expert per class group and the classifier; write them.

    Args:
        out_dir: the folder to create (written to a temporary sibling, then renamed).
        seed: root seed; the same seed gives the same tensors on the same kernels.
        settings: training settings (default :class:`DiffusionSettings`).
        overwrite: replace ``out_dir`` if it exists.
        progress: called as ``progress(phase, done, total)`` while training.
        score: also score every U-Net per class on the held-out seeds
            (:func:`score_diffusion_testbed`) into ``testbed.json``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    cfg = settings or DiffusionSettings()
    out = Path(out_dir)
    import_extra("diffusers", "diffusion", "the diffusion testbed")  # before any work
    refuse_working_dir(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: exists (pass --overwrite to replace it)")
    remove_stale_temp_siblings(out)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y, x_test, y_test = digits_images()
        meta: dict[str, Any] = {"kind": "diffusion", "seed": seed, "settings": asdict(cfg)}
        with atomic_dir(out) as tmp:
            tmp.mkdir(parents=True)
            clf = _train_classifier(x, y, cfg.classifier_steps, seed + 1)
            from safetensors.torch import save_file

            (tmp / "classifier").mkdir()
            save_file(
                {k: v.contiguous() for k, v in clf.state_dict().items()},
                str(tmp / "classifier" / "model.safetensors"),
            )
            with torch.no_grad():
                meta["classifier_test_accuracy"] = float(
                    (clf(x_test).argmax(-1) == y_test).float().mean()
                )
            base = _make_unet(seed)
            losses = _train_unet(
                base,
                x,
                y,
                steps=cfg.base_steps,
                lr=cfg.base_lr,
                batch_size=cfg.batch_size,
                p_uncond=1.0,
                seed=seed * 1000 + 2,
                phase="base",
                progress=progress,
            )
            meta["final_loss"] = {"base": sum(losses[-50:]) / len(losses[-50:])}
            _save_pipeline(base, tmp / "base")
            names = ["base"]
            for i, group in enumerate(cfg.groups):
                name = expert_name(group)
                expert = _make_unet(seed)
                expert.load_state_dict(base.state_dict())
                keep = torch.isin(y, torch.as_tensor(list(group)))
                losses = _train_unet(
                    expert,
                    x[keep],
                    y[keep],
                    steps=cfg.expert_steps,
                    lr=cfg.expert_lr,
                    batch_size=cfg.batch_size,
                    p_uncond=cfg.p_uncond,
                    seed=seed * 1000 + 3 + i,
                    phase=name,
                    progress=progress,
                )
                meta["final_loss"][name] = sum(losses[-50:]) / len(losses[-50:])
                _save_pipeline(expert, tmp / name)
                names.append(name)
            meta["models"] = names
            meta["groups"] = [list(g) for g in cfg.groups]
            meta["fingerprint"] = _fingerprint(tmp, names)[:12]
            meta["build_seconds"] = round(time.perf_counter() - start, 1)
            (tmp / "testbed.json").write_text(json.dumps(meta, indent=2) + "\n")
            if score:  # per class, on the held-out seeds; not part of the build time
                meta["test_accuracy_by_class"] = score_diffusion_testbed(tmp)
                (tmp / "testbed.json").write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)
    return out
