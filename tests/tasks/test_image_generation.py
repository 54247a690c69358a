"""The image-generation task: deterministic per prompt, guidance formula, scores, options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, UNet2DModel

from shoal.errors import TaskError
from shoal.tasks.image_generation import (
    ImageGenerationTask,
    generate_images,
    start_noise,
)
from shoal.tasks.registry import TaskEnv, build_task


@pytest.fixture(scope="module")
def unet(tiny_unet) -> UNet2DModel:
    return tiny_unet(0, num_class_embeds=4).eval()


class Constant(torch.nn.Module):
    """A classifier that sees class ``k`` in every image."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((x.shape[0],), self.k), 3).float()


class Blind(torch.nn.Module):
    """A noise predictor that ignores the class: guidance must change nothing."""

    def __init__(self, inner: UNet2DModel) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.inner(x, t, class_labels=torch.zeros_like(class_labels)).sample


def test_an_image_depends_on_its_prompt_only(unet: UNet2DModel) -> None:
    labels, seeds = [0, 1, 2, 0, 1], [7, 7, 8, 9, 7]
    together = generate_images(unet, DDIMScheduler(), labels, seeds, steps=3)
    assert torch.equal(together, generate_images(unet, DDIMScheduler(), labels, seeds, steps=3))
    assert together.shape == (5, 1, 4, 4)
    # another batch size: the kernels round differently, nothing more
    one_by_one = generate_images(unet, DDIMScheduler(), labels, seeds, steps=3, batch_size=1)
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-5)
    alone = generate_images(unet, DDIMScheduler(), [1], [7], steps=3)
    assert torch.equal(alone[0], one_by_one[1])
    torch.testing.assert_close(together[1], together[4], rtol=0, atol=1e-5)  # same prompt
    assert not torch.equal(together[0], together[1])  # the class matters
    assert not torch.equal(together[0], together[3])  # the seed matters


def test_start_noise_is_the_seeds_normal_draw() -> None:
    expected = torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(11))
    assert torch.equal(start_noise((1, 4, 4), 11), expected)


def test_guidance_is_the_class_free_formula(unet: UNet2DModel) -> None:
    blind = Blind(unet)
    plain = generate_images(blind, DDIMScheduler(), [1, 2], [3, 4], steps=3)
    guided = generate_images(
        blind, DDIMScheduler(), [1, 2], [3, 4], steps=3, guidance_scale=5.0, null_class=3
    )
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)
    real = generate_images(
        unet, DDIMScheduler(), [1, 2], [3, 4], steps=3, guidance_scale=5.0, null_class=3
    )
    assert not torch.allclose(real, generate_images(unet, DDIMScheduler(), [1, 2], [3, 4], steps=3))


def test_score_is_one_where_the_classifier_sees_the_intended_class(unet: UNet2DModel) -> None:
    classes, seeds = [0, 1, 2, 1], [0, 1, 2, 3]
    task = ImageGenerationTask("g", Constant(1), DDIMScheduler(), classes, seeds, steps=2)
    assert len(task) == 4
    np.testing.assert_array_equal(task.score(unet), [0.0, 1.0, 0.0, 1.0])


def test_built_from_a_spec(unet: UNet2DModel, tmp_path: Path) -> None:
    DDIMScheduler().save_config(str(tmp_path / "scheduler"))
    spec = {
        "type": "image-generation",
        "name": "gen",
        "classifier": "shoal.testbed.diffusion:load_classifier",
        "classifier_options": {"path": "clf"},
        "scheduler": "scheduler",
        "classes": [0, 2],
        "seeds": [5, 8],
        "seed_range": True,
        "steps": 2,
    }
    with pytest.raises(TaskError, match="no classifier"):  # relative to the root given
        build_task(spec, TaskEnv(root=str(tmp_path)))
    from safetensors.torch import save_file

    from shoal.testbed.diffusion import DigitsClassifier

    (tmp_path / "clf").mkdir()
    save_file(DigitsClassifier().state_dict(), str(tmp_path / "clf" / "model.safetensors"))
    task = build_task(spec, TaskEnv(root=str(tmp_path)))
    assert isinstance(task, ImageGenerationTask)
    assert task.classes == [0, 0, 0, 2, 2, 2]
    assert task.seeds == [5, 6, 7, 5, 6, 7]
    assert isinstance(task.scheduler, DDIMScheduler)
    with pytest.raises(TaskError, match="seeds"):
        build_task({**spec, "seeds": [8, 5]}, TaskEnv(root=str(tmp_path)))
    with pytest.raises(TaskError, match="unknown key"):
        build_task({**spec, "prompt": "a cat"}, TaskEnv(root=str(tmp_path)))
    with pytest.raises(TaskError, match="scheduler"):
        build_task({**spec, "scheduler": "nowhere"}, TaskEnv(root=str(tmp_path)))
