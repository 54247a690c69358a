"""shoal.merge — executing a recipe.

A recipe (:mod:`shoal.recipe`) is first turned into a *plan* from the models'
metadata alone — for every output tensor, which source tensors, which operator
(:mod:`shoal.ops`) and which resolved parameters — so missing tensors and shape
mismatches are reported before anything is read or written. The plan then runs
one tensor at a time:

- :func:`merge_to_disk` — to a Hugging Face checkpoint directory, streamed into safetensors
  shards and renamed into place only when complete (with config, tokenizer,
  ``shoal_recipe.yaml`` and a model card);
- :func:`merge_state_dicts` — to a new state dict in memory;
- :func:`merge_into` / :func:`merge_into_module` — in place into existing tensors,
  the form the search loop uses (no new model per candidate).

Random operators (DARE) draw from a generator seeded by ``(seed, tensor name)``,
so results do not depend on order or threads.
"""

from __future__ import annotations

from shoal.merge.execute import iter_merged, tensor_seed
from shoal.merge.memory import merge_into, merge_into_module, merge_state_dicts
from shoal.merge.plan import MergePlan, TensorInput, TensorPlan, build_plan
from shoal.merge.sources import DictSource, TensorSource, open_sources
from shoal.merge.to_disk import merge_to_disk

__all__ = [
    "DictSource",
    "MergePlan",
    "TensorInput",
    "TensorPlan",
    "TensorSource",
    "build_plan",
    "iter_merged",
    "merge_into",
    "merge_into_module",
    "merge_state_dicts",
    "merge_to_disk",
    "open_sources",
    "tensor_seed",
]
