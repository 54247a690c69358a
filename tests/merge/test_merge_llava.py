"""A vision-language checkpoint (LLaVA) merges whole: every tensor of the inputs, the
language model's included, is in the output (mergekit 0.1.5 writes a LLaVA merge without
its language-model tensors; shoal keeps them — docs/merging.md, compatibility table)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from shoal.merge import merge_to_disk


def test_llava_merge_keeps_every_tensor_and_loads(tmp_path: Path, tiny_llava) -> None:
    from transformers import LlavaForConditionalGeneration as Llava

    tiny_llava.vlm(tmp_path / "a", 0)
    tiny_llava.vlm(tmp_path / "b", 1)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))  # the names as saved
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
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
    assert model.config.text_config.vocab_size == tiny_llava.text_config().vocab_size
