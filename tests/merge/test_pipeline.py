"""Merging diffusers pipeline folders: component selection, untouched files, round trip.

The pipelines are tiny ``LDMPipeline`` folders (a class-conditional ``UNet2DModel``, a
``VQModel`` and a DDIM scheduler) built from configs with fixed seeds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, DiffusionPipeline

from shoal.merge import merge_to_disk
from shoal.tasks.image_generation import generate_images

VQ = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [8],
    "layers_per_block": 1,
    "latent_channels": 1,
    "num_vq_embeddings": 8,
    "norm_num_groups": 4,
    "sample_size": 4,
    "vq_embed_dim": 1,
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_default_merges_the_unet_and_copies_the_rest(
    tmp_path: Path, tiny_pipeline, linear_recipe
) -> None:
    a, b = tiny_pipeline(tmp_path / "a", 0, vqvae=VQ), tiny_pipeline(tmp_path / "b", 1, vqvae=VQ)
    out = merge_to_disk(
        linear_recipe(tmp_path, a, b, (0.25, 0.75)), tmp_path / "out", progress=False
    )

    ua, ub = load_file(str(a / "unet" / WEIGHTS)), load_file(str(b / "unet" / WEIGHTS))
    merged = load_file(str(out / "unet" / WEIGHTS))
    assert merged.keys() == ua.keys()
    for name in ua:  # linear, weights normalised by their sum (1.0)
        torch.testing.assert_close(merged[name], 0.25 * ua[name] + 0.75 * ub[name])
    assert not torch.equal(merged["conv_in.weight"], ua["conv_in.weight"])

    # every file outside unet/ is the base's, byte for byte
    base_files = {k: v for k, v in _files(a).items() if not k.startswith("unet/")}
    out_files = _files(out)
    for rel, data in base_files.items():
        assert out_files[rel] == data, rel
    assert (out / "shoal_recipe.yaml").is_file()

    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "LDMPipeline"
    loaded = pipe.unet.state_dict()
    assert all(torch.equal(loaded[k], merged[k]) for k in merged)


def test_components_names_what_is_merged(tmp_path: Path, tiny_pipeline, linear_recipe) -> None:
    a, b = tiny_pipeline(tmp_path / "a", 0, vqvae=VQ), tiny_pipeline(tmp_path / "b", 1, vqvae=VQ)
    recipe = linear_recipe(tmp_path, a, b, (0.25, 0.75), "components: [vqvae]\n")
    out = merge_to_disk(recipe, tmp_path / "out", progress=False)
    assert (out / "unet" / WEIGHTS).read_bytes() == (a / "unet" / WEIGHTS).read_bytes()
    va, vb = load_file(str(a / "vqvae" / WEIGHTS)), load_file(str(b / "vqvae" / WEIGHTS))
    merged = load_file(str(out / "vqvae" / WEIGHTS))
    for name in va:
        torch.testing.assert_close(merged[name], 0.25 * va[name] + 0.75 * vb[name])
    both = merge_to_disk(
        linear_recipe(tmp_path, a, b, (0.25, 0.75), "components: [unet, vqvae]\n"),
        tmp_path / "both",
        progress=False,
    )
    assert (both / "vqvae" / WEIGHTS).read_bytes() == (out / "vqvae" / WEIGHTS).read_bytes()
    assert (both / "unet" / WEIGHTS).read_bytes() != (a / "unet" / WEIGHTS).read_bytes()


def test_a_pipeline_merged_with_itself_generates_the_same_images(
    tmp_path: Path, tiny_pipeline
) -> None:
    a = tiny_pipeline(tmp_path / "a", 3, vqvae=VQ)
    recipe = tmp_path / "self.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {tmp_path / 'a' / '.'}, parameters: {{weight: 0.5}}}}\n"
    )
    out = merge_to_disk(recipe, tmp_path / "out", progress=False)
    src = DiffusionPipeline.from_pretrained(str(a))
    merged = DiffusionPipeline.from_pretrained(str(out))
    labels, seeds = [0, 1, 2, 0], [5, 6, 7, 8]

    def images(pipe: DiffusionPipeline) -> torch.Tensor:
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        return generate_images(pipe.unet, sched, labels, seeds, steps=4)

    first, second = images(src), images(merged)
    assert torch.equal(first, second)
    assert not torch.equal(first[0], first[3])  # the seeds matter: a real comparison
