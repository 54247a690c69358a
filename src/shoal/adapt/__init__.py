"""shoal.adapt — Transformer²: adapting a model through the singular values of its
weight matrices (Sun et al., 2025; METHODS.md §5).

- ``svf.py`` — :func:`wrap_svf` patches a model in place so each chosen matrix
  (the MLP ones by default, attention optional) becomes W′ = W + U diag(σ ⊙ (z − 1)) Vᵀ,
  with one trainable z vector per matrix; z = 1 is the base model bit for bit.
  :class:`SVFModel` swaps z per request (:meth:`~SVFModel.set_z`,
  :meth:`~SVFModel.using_z`), folds it into plain weights
  (:meth:`~SVFModel.save_folded`) and gives the plain model back
  (:meth:`~SVFModel.unwrap`).
- ``svd_cache.py`` — the fp32 SVD of those matrices, computed once and cached as one
  safetensors file keyed by :func:`matrix_fingerprint` (a hash of the weights' bytes).
- ``expert.py`` — an expert is a small safetensors file of z vectors and its base's
  fingerprint (:func:`save_expert`, :func:`read_expert`, :func:`load_expert`, which
  refuses another base unless asked to transfer); :func:`mix_z` is the few-shot mixture
  z′ = Σ_k α_k z_k, per model or per matrix.
- ``cem.py`` — :class:`CEM`, the cross-entropy method that finds the few-shot α (ask /
  tell, ties in score broken by the mean log-likelihood, ``state_dict``); numpy only.
- ``reinforce.py`` — training z: :func:`reinforce_step` minimises
  −mean(log π(ŷ|x)·r) + λ·KL(π_W′ ‖ π_W) with AdamW, cosine decay and clipping
  (:func:`make_optimizer`); :func:`sample_answers` draws the answers.
- ``config.py`` — :class:`AdaptConfig`, the schema of a ``shoal adapt`` config (base,
  tasks per skill, matrices, training, few-shot), read by :func:`load_adapt_config`.
- ``train.py`` — :func:`train_expert`, the training loop (REINFORCE or the supervised
  ablation, validation every few steps, best z kept, early stopping);
  :func:`run_training` and :func:`export_expert` write experts and folded models.
- ``lora.py`` — the paper's baseline: :func:`wrap_lora` adds peft LoRA adapters (rank 16
  on the attention projections) as a :class:`LoRAModel` that :func:`train_expert` trains
  with the same loop, data and steps as SVF (``bench/lora_baseline.py``).
- ``two_pass.py`` — the first pass (:func:`route`: the ``prompt`` and ``classifier``
  strategies, :func:`parse_skill`), the few-shot mixture (:func:`fewshot_mix`) and
  :func:`evaluate_strategy`, test accuracy per skill of a strategy.

Names are imported lazily, so importing ``shoal.adapt`` does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> defining module
_LAZY = {
    "AdaptConfig": "shoal.adapt.config",
    "AdaptError": "shoal.adapt.svf",
    "CEM": "shoal.adapt.cem",
    "CEMBest": "shoal.adapt.cem",
    "CacheInfo": "shoal.adapt.svd_cache",
    "EvalResult": "shoal.adapt.two_pass",
    "Expert": "shoal.adapt.expert",
    "LoRAModel": "shoal.adapt.lora",
    "ReinforceStats": "shoal.adapt.reinforce",
    "SVDFactors": "shoal.adapt.svd_cache",
    "SVFModel": "shoal.adapt.svf",
    "TrainResult": "shoal.adapt.train",
    "ZVectors": "shoal.adapt.svf",
    "compute_svd": "shoal.adapt.svd_cache",
    "evaluate_strategy": "shoal.adapt.two_pass",
    "export_expert": "shoal.adapt.train",
    "fewshot_mix": "shoal.adapt.two_pass",
    "load_adapt_config": "shoal.adapt.config",
    "load_expert": "shoal.adapt.expert",
    "make_optimizer": "shoal.adapt.reinforce",
    "matrix_fingerprint": "shoal.adapt.svd_cache",
    "mix_z": "shoal.adapt.expert",
    "parse_skill": "shoal.adapt.two_pass",
    "read_expert": "shoal.adapt.expert",
    "reinforce_loss": "shoal.adapt.reinforce",
    "reinforce_step": "shoal.adapt.reinforce",
    "route": "shoal.adapt.two_pass",
    "run_eval": "shoal.adapt.two_pass",
    "run_training": "shoal.adapt.train",
    "sample_answers": "shoal.adapt.reinforce",
    "save_expert": "shoal.adapt.expert",
    "select_matrices": "shoal.adapt.svf",
    "svd_factors": "shoal.adapt.svd_cache",
    "svf_weight": "shoal.adapt.svf",
    "train_classifier": "shoal.adapt.two_pass",
    "train_expert": "shoal.adapt.train",
    "wrap_lora": "shoal.adapt.lora",
    "wrap_svf": "shoal.adapt.svf",
}

__all__ = [
    "CEM",
    "AdaptConfig",
    "AdaptError",
    "CEMBest",
    "CacheInfo",
    "EvalResult",
    "Expert",
    "LoRAModel",
    "ReinforceStats",
    "SVDFactors",
    "SVFModel",
    "TrainResult",
    "ZVectors",
    "compute_svd",
    "evaluate_strategy",
    "export_expert",
    "fewshot_mix",
    "load_adapt_config",
    "load_expert",
    "make_optimizer",
    "matrix_fingerprint",
    "mix_z",
    "parse_skill",
    "read_expert",
    "reinforce_loss",
    "reinforce_step",
    "route",
    "run_eval",
    "run_training",
    "sample_answers",
    "save_expert",
    "select_matrices",
    "svd_factors",
    "svf_weight",
    "train_classifier",
    "train_expert",
    "wrap_lora",
    "wrap_svf",
]

if TYPE_CHECKING:  # pragma: no cover
    from shoal.adapt.cem import CEM, CEMBest
    from shoal.adapt.config import AdaptConfig, load_adapt_config
    from shoal.adapt.expert import Expert, load_expert, mix_z, read_expert, save_expert
    from shoal.adapt.lora import LoRAModel, wrap_lora
    from shoal.adapt.reinforce import (
        ReinforceStats,
        make_optimizer,
        reinforce_loss,
        reinforce_step,
        sample_answers,
    )
    from shoal.adapt.svd_cache import (
        CacheInfo,
        SVDFactors,
        compute_svd,
        matrix_fingerprint,
        svd_factors,
    )
    from shoal.adapt.svf import (
        AdaptError,
        SVFModel,
        ZVectors,
        select_matrices,
        svf_weight,
        wrap_svf,
    )
    from shoal.adapt.train import TrainResult, export_expert, run_training, train_expert
    from shoal.adapt.two_pass import (
        EvalResult,
        evaluate_strategy,
        fewshot_mix,
        parse_skill,
        route,
        run_eval,
        train_classifier,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shoal.adapt' has no attribute {name!r}")
