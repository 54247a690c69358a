"""Fixtures shared across test folders."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` LM testbed (seed 0), built once per test process (~20 s)."""
    from shoal.testbed import build_testbed

    return build_testbed(tmp_path_factory.mktemp("tb") / "tiny", "tiny", seed=0, threads=1)


CliRun = Callable[..., tuple[int, str, str]]


@pytest.fixture
def shoal_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliRun:
    """Run ``shoal ARGS`` in this process (fast), optionally in ``cwd``.

    Returns ``run(args, cwd=None) -> (exit code, stdout, stderr)``.
    """
    from shoal.cli.main import main

    def run(args: Sequence[str], cwd: Path | None = None) -> tuple[int, str, str]:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["shoal", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


# a tiny class-conditional ``UNet2DModel``: 4×4, one channel, 3 classes
TINY_UNET: dict[str, Any] = {
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


def _tiny_models(
    seed: int, unet_changes: dict[str, Any], vqvae: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """A tiny U-Net (and a ``VQModel`` of config ``vqvae``, drawn after it) from ``seed``,
    leaving the global RNG as it was."""
    import torch
    from diffusers import UNet2DModel, VQModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**{**TINY_UNET, **unet_changes})
        return unet, None if vqvae is None else VQModel(**vqvae)


@pytest.fixture(scope="session")
def tiny_unet() -> Callable[..., Any]:
    """``tiny_unet(seed, **changes)``: a tiny class-conditional ``UNet2DModel`` (4×4, one
    channel, 3 classes; ``changes`` override its config) drawn with ``seed``."""
    return lambda seed, **changes: _tiny_models(seed, changes)[0]


@pytest.fixture(scope="session")
def tiny_pipeline() -> Callable[..., Path]:
    """``tiny_pipeline(path, seed, vqvae=None, **unet_changes)``: save a pipeline folder of a
    :func:`tiny_unet` and a default DDIM scheduler at ``path`` and return ``path``: a
    ``DDPMPipeline``, or with ``vqvae`` (a ``VQModel`` config, drawn after the U-Net from the
    same seed) an ``LDMPipeline``."""
    from diffusers import DDIMScheduler, DDPMPipeline, LDMPipeline

    def save(
        path: Path, seed: int, vqvae: dict[str, Any] | None = None, **unet_changes: object
    ) -> Path:
        unet, vq = _tiny_models(seed, unet_changes, vqvae)
        if vq is None:
            pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler())
        else:
            pipe = LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler())
        pipe.save_pretrained(str(path))
        return path

    return save
