"""A vision-language checkpoint (LLaVA) merges whole: every tensor of the inputs, the
language model's included, is in the output (mergekit 0.1.5 writes a LLaVA merge without
its language-model tensors; shoal keeps them — docs/merging.md, compatibility table)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from shoal.merge import merge_to_disk


def _tiny_llava(out: Path, seed: int) -> dict[str, torch.Tensor]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    Llava(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=63)
    ).save_pretrained(out)
    return load_file(str(out / "model.safetensors"))


def test_llava_merge_keeps_every_tensor_and_loads(tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration as Llava

    a = _tiny_llava(tmp_path / "a", 0)
    b = _tiny_llava(tmp_path / "b", 1)
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(tmp_path / "a"), "parameters": {"weight": 0.5}},
            {"model": str(tmp_path / "b"), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    out = merge_to_disk(recipe, tmp_path / "out", progress=False)
    merged = {}
    for shard in sorted(out.glob("*.safetensors")):
        merged.update(load_file(str(shard)))
    assert set(merged) == set(a)  # the language model's tensors too
    assert any("language_model" in name for name in merged)
    for name, tensor in merged.items():  # the mean, by hand
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-7)
    model = Llava.from_pretrained(out)  # loads as the model it is
    assert model.config.text_config.vocab_size == 64
