"""Fixtures shared across test folders."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

# the suite runs on two processes (-n 2): a serial worker that timed one and two torch
# threads (shoal.executors.threads) would oversubscribe the cores, so one thread it is,
# here and in every shoal process a test starts (tests/executors/test_threads.py and
# test_flat.py's thread test set their own)
os.environ["OMP_NUM_THREADS"] = "1"


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


class TinyLlava:
    """A tiny LLaVA (Llama or Mistral language part, CLIP vision tower on 8×8 one-channel
    images, 4 image tokens) and a ``LlamaForCausalLM`` of the same text config; weights
    N(0, 0.1²) drawn from a seed in name order."""

    @staticmethod
    def text_config(text_type: str = "llama") -> Any:
        """The language part's config (``llama`` or ``mistral``)."""
        from transformers import LlamaConfig, MistralConfig

        cls = LlamaConfig if text_type == "llama" else MistralConfig
        return cls(
            vocab_size=48,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )

    @staticmethod
    def _seeded(model: Any, seed: int) -> Any:
        import torch

        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        return model

    def vlm(self, path: Path, seed: int, text_type: str = "llama", tied: bool = False) -> Any:
        """A ``LlavaForConditionalGeneration`` saved at ``path`` (and returned); ``tied``:
        its text config ties ``lm_head`` to the input embeddings."""
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

        vision = CLIPVisionConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
            num_channels=1,
            projection_dim=8,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=self.text_config(text_type).to_dict() | {"tie_word_embeddings": tied},
            image_token_index=47,
            image_seq_length=4,
        )
        model = self._seeded(LlavaForConditionalGeneration(config), seed)
        model.save_pretrained(path)
        return model

    def lm(self, path: Path, seed: int) -> Any:
        """A ``LlamaForCausalLM`` of the VLM's Llama text config saved at ``path``."""
        from transformers import LlamaForCausalLM

        model = self._seeded(LlamaForCausalLM(self.text_config()), seed)
        model.save_pretrained(path)
        return model


@pytest.fixture(scope="session")
def tiny_llava() -> TinyLlava:
    """:class:`TinyLlava`: ``tiny_llava.vlm(path, seed, text_type)``,
    ``tiny_llava.lm(path, seed)``, ``tiny_llava.text_config(text_type)``."""
    return TinyLlava()


@pytest.fixture(scope="session")
def linear_recipe() -> Callable[..., Path]:
    """``linear_recipe(folder, base, other, weights=(0.5, 0.5), extra="")``: write
    ``folder/r.yaml``, a ``linear`` merge of ``base`` (also its ``base_model``) and ``other``
    with ``weights``, then the YAML lines ``extra``; returns its path."""

    def write(
        folder: Path,
        base: Path,
        other: Path,
        weights: tuple[float, float] = (0.5, 0.5),
        extra: str = "",
    ) -> Path:
        recipe = folder / "r.yaml"
        recipe.write_text(
            f"merge_method: linear\nbase_model: {base}\nmodels:\n"
            f"  - {{model: {base}, parameters: {{weight: {weights[0]}}}}}\n"
            f"  - {{model: {other}, parameters: {{weight: {weights[1]}}}}}\n{extra}"
        )
        return recipe

    return write
