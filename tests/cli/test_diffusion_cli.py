"""``shoal merge`` on diffusers pipelines: mistakes are one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import nothing_left, one_error_line

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

UNET = {
    "sample_size": 4,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "num_class_embeds": 3,
}


def _pipeline(path: Path, seed: int, **changes: object) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**{**UNET, **changes})
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(str(path))
    return path


def _recipe(tmp: Path, a: Path, b: Path, extra: str = "") -> Path:
    recipe = tmp / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nbase_model: {a}\nmodels:\n"
        f"  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 0.5}}}}\n{extra}"
    )
    return recipe


def test_merge_of_pipelines_through_the_cli(tmp_path: Path, shoal_cli) -> None:
    a, b = _pipeline(tmp_path / "a", 0), _pipeline(tmp_path / "b", 1)
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(_recipe(tmp_path, a, b)), str(out), "-q"])
    assert code == 0, err
    assert (out / "model_index.json").read_bytes() == (a / "model_index.json").read_bytes()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_unknown_component_is_one_line(tmp_path: Path, shoal_cli) -> None:
    a, b = _pipeline(tmp_path / "a", 0), _pipeline(tmp_path / "b", 1)
    recipe = _recipe(tmp_path, a, b, "components: [unet, text_encoder]\n")
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(recipe), str(out)])
    assert code == 2
    one_error_line(err, "components", "'text_encoder'", "scheduler, unet")
    nothing_left(out)


def test_mismatched_unet_configs_are_one_line(tmp_path: Path, shoal_cli) -> None:
    a = _pipeline(tmp_path / "a", 0)
    b = _pipeline(tmp_path / "b", 1, block_out_channels=[8, 8])
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(_recipe(tmp_path, a, b)), str(out)])
    assert code == 2
    one_error_line(err, "components.unet", str(b / "unet" / "config.json"), "block_out_channels")
    nothing_left(out)


def test_a_plain_checkpoint_among_pipelines_is_one_line(tmp_path: Path, shoal_cli) -> None:
    a = _pipeline(tmp_path / "a", 0)
    plain = _pipeline(tmp_path / "p", 1) / "unet"  # a model folder, not a pipeline
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(_recipe(tmp_path, a, plain)), str(out)])
    assert code == 2
    one_error_line(err, str(plain), "not a diffusers pipeline folder")
    nothing_left(out)


def test_components_without_pipelines_is_one_line(tmp_path: Path, shoal_cli) -> None:
    a = _pipeline(tmp_path / "a", 0) / "unet"
    b = _pipeline(tmp_path / "b", 1) / "unet"
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, a, b, "components: [unet]\n")
    code, _, err = shoal_cli(["merge", str(recipe), str(out)])
    assert code == 2
    one_error_line(err, "components", "model_index.json")
    nothing_left(out)


def test_plain_unet_folders_merge_as_checkpoints(tmp_path: Path, shoal_cli) -> None:
    """A component folder alone (diffusion_pytorch_model.safetensors) is a checkpoint."""
    a = _pipeline(tmp_path / "a", 0) / "unet"
    b = _pipeline(tmp_path / "b", 1) / "unet"
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(_recipe(tmp_path, a, b)), str(out), "-q"])
    assert code == 0, err
    assert not (out / "model.safetensors").exists()  # diffusers' name kept
    loaded = UNet2DModel.from_pretrained(str(out), use_safetensors=True)
    assert list(loaded.config.block_out_channels) == [8, 16]
