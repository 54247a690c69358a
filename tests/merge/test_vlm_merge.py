"""A LLaVA's language part merged with a plain causal LM (``shoal.merge.vlm``).

The VLM is saved by transformers (its on-disk names are the ``legacy`` layout, its
module's the ``module`` layout); the LM is a ``LlamaForCausalLM`` of the same text config.
Expected values are computed here from the two state dicts, by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shoal.errors import MergeError
from shoal.merge import merge_into_module, merge_state_dicts, merge_to_disk
from shoal.merge.vlm import LAYOUTS, detect_layout, to_language_name, to_vlm_name


def _read(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.fixture
def pair(
    tmp_path: Path, tiny_llava
) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    vlm = tiny_llava.vlm(tmp_path / "vlm", 0)
    lm = tiny_llava.lm(tmp_path / "lm", 1)
    return tmp_path / "vlm", tmp_path / "lm", vlm.state_dict(), lm.state_dict()


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "vlm_name", "lm_name"),
    [
        (
            "module",
            "model.language_model.layers.1.mlp.up_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
        ),
        ("module", "model.language_model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("module", "lm_head.weight", "lm_head.weight"),
        ("legacy", "language_model.model.norm.weight", "model.norm.weight"),
        ("legacy", "language_model.lm_head.weight", "lm_head.weight"),
    ],
)
def test_names_map_both_ways(layout: str, vlm_name: str, lm_name: str) -> None:
    assert to_language_name(vlm_name, LAYOUTS[layout]) == lm_name
    assert to_vlm_name(lm_name, LAYOUTS[layout]) == vlm_name


@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("module", "model.vision_tower.embeddings.patch_embedding.weight"),
        ("module", "model.multi_modal_projector.linear_1.weight"),
        ("legacy", "vision_tower.post_layernorm.bias"),
        ("legacy", "multi_modal_projector.linear_2.bias"),
    ],
)
def test_vision_and_projector_are_outside_the_language_part(layout: str, name: str) -> None:
    assert to_language_name(name, LAYOUTS[layout]) is None


def test_name_outside_model_and_lm_head_does_not_map() -> None:
    with pytest.raises(MergeError, match=r"transformer\.h\.0"):
        to_vlm_name("transformer.h.0.attn.c_attn.weight")


def test_layout_detected_from_names(pair) -> None:
    vlm_dir, _, vlm_sd, lm_sd = pair
    on_disk = list(load_file(str(vlm_dir / "model.safetensors")))
    assert detect_layout(on_disk) is LAYOUTS["legacy"]  # what save_pretrained writes
    assert detect_layout(list(vlm_sd)) is LAYOUTS["module"]  # what the module holds
    assert detect_layout(list(lm_sd)) is None


# -- merging ----------------------------------------------------------------------------


def _linear(vlm: Path | str, lm: Path | str, w_vlm: float, w_lm: float) -> dict[str, object]:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(vlm), "parameters": {"weight": w_vlm}},
            {"model": str(lm), "parameters": {"weight": w_lm}},
        ],
        "dtype": "float32",
    }


def test_language_part_merged_vision_and_projector_bit_equal(pair, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    vlm_dir, lm_dir, vlm_sd, lm_sd = pair
    out = merge_to_disk(_linear(vlm_dir, lm_dir, 0.5, 0.5), tmp_path / "out", progress=False)
    merged = _read(out)
    assert set(merged) == set(vlm_sd)  # the whole VLM, in the module's names
    for name, tensor in merged.items():
        lm_name = to_language_name(name, LAYOUTS["module"])
        if lm_name is None:  # vision tower and projector: the VLM's, bit for bit
            assert torch.equal(tensor, vlm_sd[name]), name
        else:  # the mean of the two language models, by hand
            expected = (vlm_sd[name] + lm_sd[lm_name]) / 2
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert all(torch.equal(loaded.state_dict()[k], merged[k]) for k in merged)
    auto = AutoModelForImageTextToText.from_pretrained(out)
    assert type(auto) is LlavaForConditionalGeneration


def test_a_tied_vlm_stays_tied_and_the_lms_head_is_not_used(tmp_path: Path, tiny_llava) -> None:
    """A VLM whose text config ties lm_head to embed_tokens, merged with an untied LM: the
    output's config is the VLM's, so the head is the merged embedding (docs/vlm.md, Limits)."""
    from transformers import LlavaForConditionalGeneration

    vlm = tiny_llava.vlm(tmp_path / "vlm", 0, tied=True)
    lm = tiny_llava.lm(tmp_path / "lm", 1)
    assert vlm.lm_head.weight.data_ptr() == vlm.model.language_model.embed_tokens.weight.data_ptr()
    recipe = _linear(tmp_path / "vlm", tmp_path / "lm", 0.5, 0.5)
    out = merge_to_disk(recipe, tmp_path / "out", progress=False)
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    embed = loaded.model.language_model.embed_tokens.weight
    want = (vlm.model.language_model.embed_tokens.weight + lm.model.embed_tokens.weight) / 2
    torch.testing.assert_close(embed, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(loaded.lm_head.weight, embed)  # tied: not the LM's own head
    assert not torch.allclose(lm.lm_head.weight, lm.model.embed_tokens.weight)


def test_merging_with_its_own_language_part_gives_the_vlm_back(
    pair, tmp_path: Path, tiny_llava
) -> None:
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    vlm_dir, _, vlm_sd, _ = pair
    text = LlamaForCausalLM(tiny_llava.text_config())
    text.model.load_state_dict(
        {
            k.removeprefix("model.language_model."): v
            for k, v in vlm_sd.items()
            if ".language_model." in k
        }
    )
    text.lm_head.weight.data.copy_(vlm_sd["lm_head.weight"])
    text.save_pretrained(tmp_path / "own")
    out = merge_to_disk(
        _linear(vlm_dir, tmp_path / "own", 0.3, 0.7), tmp_path / "out", progress=False
    )
    back = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    for name, tensor in vlm_sd.items():
        torch.testing.assert_close(back[name], tensor, rtol=1e-6, atol=1e-7)


def test_lm_as_base_still_gives_a_vlm(pair, tmp_path: Path, tiny_llava) -> None:
    """``base_model`` a causal LM: the output takes config, vision tower and projector from
    the first VLM of the recipe; task arithmetic by hand: base + (vlm - base) + (lm - base)."""
    import json

    vlm_dir, lm_dir, vlm_sd, lm_sd = pair
    tiny_llava.lm(tmp_path / "base", 2)
    base_sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base"),
        "models": [
            {"model": str(vlm_dir), "parameters": {"weight": 1.0}},
            {"model": str(lm_dir), "parameters": {"weight": 1.0}},
        ],
        "dtype": "float32",
    }
    out = merge_to_disk(recipe, tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    merged = _read(out)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    lm_name = "model.layers.0.self_attn.q_proj.weight"
    expected = vlm_sd[name] + lm_sd[lm_name] - base_sd[lm_name]
    torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    proj = "model.multi_modal_projector.linear_1.weight"
    assert torch.equal(merged[proj], vlm_sd[proj])


def test_two_vlms_without_an_lm_merge_whole(tmp_path: Path, tiny_llava) -> None:
    """Component selection is automatic: only a VLM beside a causal LM is reduced to its
    language part; two VLMs merge every tensor, vision towers included."""
    a = tiny_llava.vlm(tmp_path / "a", 0).state_dict()
    b = tiny_llava.vlm(tmp_path / "b", 3).state_dict()
    merged = _read(
        merge_to_disk(
            _linear(tmp_path / "a", tmp_path / "b", 0.5, 0.5), tmp_path / "o", progress=False
        )
    )
    name = "vision_tower.post_layernorm.weight"  # legacy names kept as they are
    module_name = "model.vision_tower.post_layernorm.weight"
    torch.testing.assert_close(merged[name], (a[module_name] + b[module_name]) / 2)


def test_merge_into_a_resident_vlm(pair) -> None:
    """``shoal evolve``'s path: the sources are state dicts as read from disk (legacy names),
    the target a live ``LlavaForConditionalGeneration`` (module names)."""
    from transformers import LlavaForConditionalGeneration

    vlm_dir, lm_dir, vlm_sd, lm_sd = pair
    resident = LlavaForConditionalGeneration.from_pretrained(vlm_dir)
    with torch.no_grad():
        for p in resident.parameters():
            p.zero_()
    sources = {
        "vlm": load_file(str(vlm_dir / "model.safetensors")),
        "lm": load_file(str(lm_dir / "model.safetensors")),
    }
    merge_into_module(resident, _linear("vlm", "lm", 0.25, 0.75), sources)
    got = resident.state_dict()
    proj = "model.vision_tower.embeddings.patch_embedding.weight"
    assert torch.equal(got[proj], vlm_sd[proj])
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    expected = 0.25 * vlm_sd[name] + 0.75 * lm_sd["model.layers.1.mlp.down_proj.weight"]
    torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-7)
    # the same recipe to a state dict agrees with the in-place build
    sd = merge_state_dicts(_linear("vlm", "lm", 0.25, 0.75), sources)
    assert all(torch.equal(sd[k], got[k]) for k in sd)


def test_language_part_of_another_architecture_is_refused(tmp_path: Path, tiny_llava) -> None:
    tiny_llava.vlm(tmp_path / "vlm", 0, text_type="mistral")
    tiny_llava.lm(tmp_path / "lm", 1)
    with pytest.raises(MergeError, match=r"language part is mistral but model .*lm is llama"):
        merge_to_disk(
            _linear(tmp_path / "vlm", tmp_path / "lm", 0.5, 0.5), tmp_path / "out", progress=False
        )
    assert not (tmp_path / "out").exists()
