"""Tensor name ↔ transformer block index, and the layer count in a config.

Hugging Face models put block ``N`` under a container whose name depends on the
family; the index is the first ``<container>.<N>.`` in the name:

========================  =========================================
family                    example
========================  =========================================
llama, mistral, qwen2     ``model.layers.3.self_attn.q_proj.weight``
phi, gpt-neox             ``model.layers.3...``, ``gpt_neox.layers.3...``
gpt2, falcon, bloom       ``transformer.h.3.attn.c_attn.weight``
bert, roberta             ``bert.encoder.layer.3.attention...``
t5                        ``encoder.block.3.layer.0.SelfAttention.q.weight``
generic                   ``*.blocks.3.*``, ``layers.3.*`` (also at the start)
========================  =========================================

Embeddings, final norms and heads have no index (``None``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from shoal.errors import CheckpointError

# leftmost "<container>.<digits>" where the container is a whole name component
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")

# config keys holding the number of blocks, in order of preference
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_blocks")


def _match(name: str) -> re.Match[str] | None:
    return _LAYER.search(name)


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to.

    Args:
        name: a tensor name, e.g. ``"model.layers.12.mlp.up_proj.weight"``.

    Returns:
        The block index (``12``), or ``None`` for tensors outside the blocks
        (embeddings, final norm, lm head).
    """
    m = _match(name)
    return int(m.group(1)) if m else None


def rename_layer(name: str, new_index: int) -> str:
    """The same tensor name in another block.

    Args:
        name: a tensor name inside a block.
        new_index: the block index to put in its place.

    Returns:
        ``name`` with its block index replaced:
        ``rename_layer("transformer.h.3.attn.bias", 0) == "transformer.h.0.attn.bias"``.

    Raises:
        CheckpointError: the name has no block index.
    """
    m = _match(name)
    if m is None:
        raise CheckpointError(f"tensor {name!r} belongs to no transformer block")
    if new_index < 0:
        raise CheckpointError(f"tensor {name!r}: layer index must be >= 0, got {new_index}")
    return name[: m.start(1)] + str(int(new_index)) + name[m.end(1) :]


def _layer_config(config: dict[str, Any]) -> dict[str, Any]:
    """The (sub)config that holds the block count (``text_config`` for multimodal)."""
    if not any(k in config for k in _LAYER_KEYS) and isinstance(config.get("text_config"), dict):
        return config["text_config"]  # type: ignore[no-any-return]
    return config


def num_layers(config: dict[str, Any]) -> int | None:
    """Number of transformer blocks declared in a ``config.json`` dict.

    Looks for ``num_hidden_layers``, ``n_layer``, ``num_layers``, ``n_layers``,
    ``num_blocks`` (in that order), inside ``text_config`` when the top level has none.

    Returns:
        The count, or ``None`` when the config declares none.
    """
    sub = _layer_config(config)
    for key in _LAYER_KEYS:
        value = sub.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def with_num_layers(
    config: dict[str, Any], n: int, *, layer_sources: Sequence[int] | None = None
) -> dict[str, Any]:
    """A copy of ``config`` declaring ``n`` blocks.

    Every layer-count key present is set to ``n`` (``num_hidden_layers`` is added if
    there is none). Per-layer lists of the old length (``layer_types`` in recent
    transformers configs) are rebuilt: entry ``i`` comes from old layer
    ``layer_sources[i]`` when given, otherwise the list is cut or its pattern repeated.

    Args:
        config: the source config (not modified).
        n: the new block count.
        layer_sources: for each new block, the old block it is copied from.

    Returns:
        The new config dict.
    """
    if n < 1:
        raise CheckpointError(f"config: number of layers must be >= 1, got {n}")
    if layer_sources is not None and len(layer_sources) != n:
        raise CheckpointError(f"config: {len(layer_sources)} layer sources given for {n} layers")
    out = copy.deepcopy(config)
    sub = _layer_config(out)
    old = num_layers(out)
    keys = [k for k in _LAYER_KEYS if k in sub]
    for key in keys or ["num_hidden_layers"]:
        sub[key] = n
    if old is not None:
        for key, value in list(sub.items()):
            if isinstance(value, list) and len(value) == old and key.startswith("layer_"):
                if layer_sources is not None:
                    sub[key] = [value[s] for s in layer_sources]
                else:
                    sub[key] = [value[i % old] for i in range(n)]
    return out
