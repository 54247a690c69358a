"""Tensor names of real (tiny) transformers models → block index."""

from __future__ import annotations

import os
import re

import pytest

from shoal.checkpoint import layer_index, num_layers, rename_layer, with_num_layers
from shoal.errors import CheckpointError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub


# family -> (config class, model class, config fields): three blocks, tiny widths
FAMILIES: dict[str, tuple[str, str, dict[str, int]]] = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
        },
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 8, "n_layer": 3, "n_head": 2, "n_positions": 16},
    ),
    "bert": (
        "BertConfig",
        "BertModel",
        {
            "hidden_size": 8,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "max_position_embeddings": 16,
        },
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            "hidden_size": 8,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "max_position_embeddings": 16,
        },
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        {"d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 3, "num_heads": 2},
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        {
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
        },
    ),
}


def _names(family: str) -> tuple[list[str], int]:
    import transformers as tf

    config_cls, model_cls, fields = FAMILIES[family]
    cfg = getattr(tf, config_cls)(vocab_size=32, **fields)
    model = getattr(tf, model_cls)(cfg)
    return list(model.state_dict()), num_layers(cfg.to_dict()) or -1


# the block container each family uses, written out independently of the library
PREFIX = {
    "llama": r"model\.layers\.(\d+)\.",
    "gpt2": r"transformer\.h\.(\d+)\.",
    "bert": r"encoder\.layer\.(\d+)\.",
    "gpt_neox": r"gpt_neox\.layers\.(\d+)\.",
    "t5": r"(?:encoder|decoder)\.block\.(\d+)\.",
    "phi": r"model\.layers\.(\d+)\.",
}


def test_every_family_has_a_prefix() -> None:
    assert set(FAMILIES) == set(PREFIX)


@pytest.mark.parametrize("family", sorted(PREFIX))
def test_layer_index_on_real_names(family: str) -> None:
    names, n = _names(family)
    assert n == 3
    per_layer = {0: 0, 1: 0, 2: 0}
    outside = 0
    for name in names:
        m = re.match(r"(?:\w+\.)?" + PREFIX[family], name) or re.match(PREFIX[family], name)
        expected = int(m.group(1)) if m else None
        assert layer_index(name) == expected, name
        if expected is None:
            outside += 1
        else:
            per_layer[expected] += 1
            moved = rename_layer(name, 7)
            assert layer_index(moved) == 7 and moved.replace(".7.", f".{expected}.", 1) == name
    assert outside >= 1  # embeddings / final norm exist
    assert per_layer[1] == per_layer[2] > 0  # same tensors per block
    # (T5's block 0 alone holds the relative attention bias)
    assert per_layer[0] == per_layer[1] + (2 if family == "t5" else 0)


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.12.mlp.up_proj.weight", 12),
        ("transformer.h.0.attn.c_attn.weight", 0),
        ("encoder.block.4.layer.1.DenseReluDense.wi.weight", 4),
        ("decoder.block.2.layer.0.SelfAttention.q.weight", 2),
        ("model.layers.3.mlp.experts.5.w1.weight", 3),
        ("vision.blocks.10.attn.qkv.weight", 10),
        ("layers.1.attention.wq.weight", 1),
        ("model.embed_tokens.weight", None),
        ("model.norm.weight", None),
        ("lm_head.weight", None),
        ("transformer.wpe.weight", None),
        ("model.layers_norm.weight", None),
        ("hh.3.weight", None),
    ],
)
def test_layer_index_table(name: str, index: int | None) -> None:
    assert layer_index(name) == index


def test_rename_layer_errors() -> None:
    assert rename_layer("transformer.h.3.ln_1.weight", 11) == "transformer.h.11.ln_1.weight"
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        rename_layer("lm_head.weight", 0)


def test_num_layers_and_with_num_layers() -> None:
    assert num_layers({"n_layer": 6}) == 6
    assert num_layers({"text_config": {"num_hidden_layers": 4}}) == 4
    assert num_layers({"hidden_size": 3}) is None
    cfg = {
        "num_hidden_layers": 3,
        "layer_types": ["sliding", "full", "sliding"],
        "hidden_size": 8,
    }
    out = with_num_layers(cfg, 5)
    assert cfg["num_hidden_layers"] == 3  # input untouched
    assert out["num_hidden_layers"] == 5
    assert out["layer_types"] == ["sliding", "full", "sliding", "sliding", "full"]
    out = with_num_layers(cfg, 4, layer_sources=[0, 1, 1, 2])
    assert out["layer_types"] == ["sliding", "full", "full", "sliding"]
    assert with_num_layers({"n_layer": 2}, 4) == {"n_layer": 4}
    assert with_num_layers({}, 2) == {"num_hidden_layers": 2}
    with pytest.raises(CheckpointError):
        with_num_layers(cfg, 0)
