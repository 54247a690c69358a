"""Training one SVF expert: the loop around :func:`~shoal.adapt.reinforce.reinforce_step`.

:func:`train_expert` trains the z vectors of a wrapped model on one skill (METHODS.md §5):

- ``objective: reinforce`` — each step draws a batch of train prompts, samples one answer
  per prompt from the adapted model, rewards it +1 if the task's own scorer gives it full
  marks and −1 otherwise, and takes one step on
  −mean(log π(ŷ|x)·r) + λ·KL(π_W′ ‖ π_W);
- ``objective: supervised`` — next-token cross-entropy on the gold answers (the paper's
  ablation), averaged over answer tokens.

Both use AdamW with cosine decay to 0 over ``steps`` and gradient clipping
(:func:`~shoal.adapt.reinforce.make_optimizer`). The validation task is scored greedily
before the first step, every ``eval_every`` steps and after the last; the z of the best
validation score is kept (the base's own score is the first to beat, so the kept z is
never worse than the base on validation), and training stops after ``patience`` scores in
a row without improvement. All randomness — batch order and sampling — comes from one
seeded ``torch.Generator``, so a run on CPU repeats exactly.

A sampled sequence is the prompt's tokens (as the tokenizer encodes the prompt alone)
followed by the answer's, cut after the first end-of-sequence token; a gold one is the
prompt, then ``answer_prefix + answer`` encoded apart, then end-of-sequence (the testbed's
convention). Rows of a batch are padded on the right, which a causal model never sees
from the real positions, so padding changes no log-probability.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from shoal._atomic import refuse_output_holding
from shoal.adapt.reinforce import make_optimizer, reinforce_step, sample_answers
from shoal.adapt.svf import AdaptError
from shoal.checkpoint import check_finite
from shoal.errors import first_line
from shoal.tasks.generation import GenerationTask, extract_answer

if TYPE_CHECKING:  # pragma: no cover
    from shoal.adapt.config import AdaptConfig, TrainConfig
    from shoal.adapt.lora import LoRAModel
    from shoal.adapt.svf import SVFModel

    # what the loop trains: SVF's z vectors, or the LoRA baseline's matrices (supervised)
    Adapted = SVFModel | LoRAModel

__all__ = [
    "TrainResult",
    "answer_logprobs",
    "build_tasks",
    "export_expert",
    "load_wrapped",
    "pad_right",
    "run_training",
    "train_expert",
    "validation_score",
]


@dataclass
class TrainResult:
    """What :func:`train_expert` returns.

    Attributes:
        z: The kept z vectors (best validation score), module name → fp32 vector.
        best_score: Their mean validation score.
        best_step: The step they were reached at (0: the base itself was best).
        base_score: The base's validation score (z = 1).
        history: One row per step: ``step``, ``loss``, ``reward`` (REINFORCE; mean of
            ±1), ``kl`` (REINFORCE), ``val`` (the validation score, ``None`` where not
            scored); row 0 is the base's validation score.
        steps: Optimiser steps taken.
        stopped: ``"steps"`` (all ran) or ``"patience"`` (early stop).
        seconds: Wall-clock time.
    """

    z: dict[str, torch.Tensor]
    best_score: float
    best_step: int
    base_score: float
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    stopped: str = "steps"
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Plain data for ``train.json`` (everything but z)."""
        return {
            "best_validation": self.best_score,
            "best_step": self.best_step,
            "base_validation": self.base_score,
            "steps": self.steps,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
            "history": self.history,
        }


def load_wrapped(config: AdaptConfig) -> tuple[SVFModel, Any]:
    """Load the config's base (fp32, eval mode, on its device), wrap it, and its tokenizer.

    Raises:
        CheckpointError: The base folder is missing or not a causal LM.
    """
    from transformers import AutoTokenizer

    from shoal._devices import resolve_device
    from shoal.adapt.svf import wrap_svf
    from shoal.errors import CheckpointError

    base = config.resolve(config.base)
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{base}: not a Hugging Face model folder (no config.json)")
    device = resolve_device(config.device)
    model = load_base(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as exc:
        why = first_line(exc)
        raise CheckpointError(f"{base}: cannot load the base's tokenizer ({why})") from None
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    svf = wrap_svf(
        model,
        mlp=config.matrices.mlp,
        attention=config.matrices.attention,
        cache_dir=config.cache_dir,
    )
    return svf, tokenizer


def _generation_task(task: Any, what: str) -> GenerationTask:
    if not isinstance(task, GenerationTask):
        raise AdaptError(
            f"{what} task {getattr(task, 'name', task)!r} is a {type(task).__name__}; "
            "training needs a generation task (prompts, a scorer per answer)"
        )
    return task


def _device(svf: Adapted) -> torch.device:
    return next(iter(svf.parameters())).device


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise AdaptError("the tokenizer defines neither a pad token nor an eos token")
    return int(pad)


def pad_right(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Join prompt and answer token ids per row and pad the rows on the right.

    Returns:
        ``(input_ids, answer_mask, attention_mask)``, each ``(B, T)``; the answer mask
        is true exactly at the answer tokens.
    """
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        n = len(p) + len(a)
        ids[r, :n] = torch.tensor([*p, *a], dtype=torch.long)
        answer_mask[r, len(p) : n] = True
        attention[r, :n] = 1
    return ids, answer_mask, attention


def _encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


def _encode_answers(tokenizer: Any, answers: Sequence[str], prefix: str) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    out = []
    for a in answers:
        ids = list(tokenizer(prefix + a, add_special_tokens=False)["input_ids"])
        out.append(ids + ([int(eos)] if eos is not None else []))
    return out


def answer_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    prefix: str = " ",
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each gold answer (with end-of-sequence) after its prompt.

    Args:
        model: A causal LM (or a wrapped :class:`~shoal.adapt.svf.SVFModel`).
        tokenizer: Its tokenizer.
        prompts: Prompt strings.
        answers: Gold answer strings, one per prompt.
        prefix: Text put before each answer (see the module docstring).
        batch_size: Rows per forward.

    Returns:
        ``(logp, counts)``: ``(n,)`` fp32 summed log-probabilities and ``(n,)`` numbers of
        answer tokens; ``logp.sum() / counts.sum()`` is the mean per-token
        log-likelihood.
    """
    p_ids = _encode_prompts(tokenizer, prompts)
    a_ids = _encode_answers(tokenizer, answers, prefix)
    pad = _pad_id(tokenizer)
    out, counts = [], []
    dev = next(iter(model.parameters())).device
    with torch.no_grad():
        for s in range(0, len(p_ids), batch_size):
            ids, mask, attn = pad_right(p_ids[s : s + batch_size], a_ids[s : s + batch_size], pad)
            logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            tok = logp.gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)
            m = mask[:, 1:].to(dev)
            out.append((tok * m).sum(dim=1).cpu())
            counts.append(m.sum(dim=1).cpu())
    return torch.cat(out), torch.cat(counts)


def _supervised_loss(
    svf: Adapted, ids: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor
) -> torch.Tensor:
    logits = svf(input_ids=ids, attention_mask=attn).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = mask[:, 1:].to(logp.dtype)
    return -(tok * m).sum() / m.sum().clamp_min(1.0)


def validation_score(svf: Adapted, task: Any, tokenizer: Any) -> float:
    """The task's mean score of the wrapped model with its current z (greedy)."""
    with svf.cached():
        if isinstance(task, GenerationTask):
            scores = task.score(svf.model, tokenizer)
        else:
            scores = task.score(svf.model)
    return float(np.mean(scores)) if len(scores) else 0.0


class _Batches:
    """Indices of the train examples, one shuffled pass after another (seeded)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.gen = generator
        self.queue: list[int] = []

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if not self.queue:
                self.queue = torch.randperm(self.n, generator=self.gen).tolist()
            need = min(k - len(out), len(self.queue))
            out.extend(self.queue[:need])
            self.queue = self.queue[need:]
        return out


def _reinforce_batch(
    svf: SVFModel,
    tokenizer: Any,
    task: GenerationTask,
    rows: list[int],
    opts: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
) -> dict[str, float]:
    dev = _device(svf)
    examples = [task.examples[i] for i in rows]
    prompts = _encode_prompts(tokenizer, [e[task.prompt_key] for e in examples])
    max_new = opts.max_new_tokens or task.max_new_tokens
    eos = tokenizer.eos_token_id
    answers: list[list[int]] = [[] for _ in rows]
    # sample_answers takes prompts of one length; group the batch by length, in a fixed
    # order so the generator's draws repeat
    groups: dict[int, list[int]] = {}
    for r, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(r)
    with svf.cached():
        for length in sorted(groups):
            members = groups[length]
            ids = torch.tensor([prompts[r] for r in members], dtype=torch.long, device=dev)
            full, _ = sample_answers(svf, ids, max_new, generator, temperature=opts.temperature)
            for r, seq in zip(members, full[:, length:].tolist(), strict=True):
                cut = seq.index(eos) + 1 if eos is not None and eos in seq else len(seq)
                answers[r] = seq[:cut]
    rewards = []
    for e, a in zip(examples, answers, strict=True):
        text = extract_answer(tokenizer.decode(a, skip_special_tokens=True))
        rewards.append(1.0 if float(task.scorer(text, e)) >= 1.0 else -1.0)
    ids, mask, attn = pad_right(prompts, answers, _pad_id(tokenizer))
    stats = reinforce_step(
        svf,
        optimizer,
        ids.to(dev),
        mask.to(dev),
        torch.tensor(rewards, device=dev),
        kl_coef=opts.kl,
        attention_mask=attn.to(dev),
        max_grad_norm=opts.clip,
        scheduler=scheduler,
    )
    return {"loss": stats.loss, "reward": stats.reward, "kl": stats.kl}


def _supervised_batch(
    svf: Adapted,
    tokenizer: Any,
    task: GenerationTask,
    rows: list[int],
    opts: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, float]:
    dev = _device(svf)
    examples = [task.examples[i] for i in rows]
    try:
        gold = [str(e[opts.answer_key]) for e in examples]
    except KeyError:
        raise AdaptError(
            f"task {task.name!r}: examples have no gold answer under {opts.answer_key!r} "
            "(set train.answer_key)"
        ) from None
    prompts = _encode_prompts(tokenizer, [e[task.prompt_key] for e in examples])
    ids, mask, attn = pad_right(
        prompts, _encode_answers(tokenizer, gold, opts.answer_prefix), _pad_id(tokenizer)
    )
    loss = _supervised_loss(svf, ids.to(dev), mask.to(dev), attn.to(dev))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(svf.parameters()), opts.clip)
    optimizer.step()
    scheduler.step()
    return {"loss": float(loss.detach()), "reward": math.nan, "kl": math.nan}


class _Progress:
    """A rich progress bar over steps showing reward and validation; a no-op when off."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        from shoal._progress import status_bar

        self._bar = status_bar()
        self._task = self._bar.add_task(label, total=total, info="")
        self._bar.start()

    def update(self, step: int, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _clean(x: float) -> float | None:
    return None if math.isnan(x) else x


def train_expert(
    svf: Adapted,
    tokenizer: Any,
    train_task: Any,
    val_task: Any,
    options: TrainConfig,
    progress: bool = True,
    *,
    label: str = "train",
) -> TrainResult:
    """Train the z vectors of ``svf`` on one skill; keep those of the best validation score.

    The model's z is left at the kept (best) z. Start from z = 1 (``svf.reset_z()``) for
    a fresh expert.

    Args:
        svf: The wrapped base model (eval mode).
        tokenizer: Its tokenizer.
        train_task: A :class:`~shoal.tasks.generation.GenerationTask` to learn from.
        val_task: Any task; its mean score picks the kept z.
        options: Objective, steps, batch size, lr, λ, clipping, evaluation cadence,
            patience, seed (:class:`~shoal.adapt.config.TrainConfig`).
        progress: Show a rich progress bar.
        label: The bar's label (the skill's name).

    Returns:
        The :class:`TrainResult`.

    Raises:
        AdaptError: The train task is not a generation task, is empty, or lacks gold
            answers for the supervised objective.
    """
    task = _generation_task(train_task, "train")
    if len(task) == 0:
        raise AdaptError(f"train task {task.name!r} has no examples")
    from shoal.adapt.svf import SVFModel

    if options.objective == "reinforce" and not isinstance(svf, SVFModel):
        raise AdaptError("objective: reinforce trains SVF z vectors only (use supervised)")
    start = time.perf_counter()
    generator = torch.Generator(device=_device(svf)).manual_seed(options.seed)
    # batch order on CPU, so it is the same whatever the device
    batches = _Batches(len(task), torch.Generator().manual_seed(options.seed))
    optimizer, scheduler = make_optimizer(svf, options.steps, lr=options.lr)
    svf.model.eval()
    base = validation_score(svf, val_task, tokenizer)
    best_score, best_step, best_z = base, 0, svf.get_z()
    history: list[dict[str, Any]] = [
        {"step": 0, "loss": None, "reward": None, "kl": None, "val": base}
    ]
    stale, stopped, step = 0, "steps", 0
    bar = _Progress(label, options.steps, progress)
    try:
        for step in range(1, options.steps + 1):
            rows = batches.take(options.batch_size)
            if options.objective == "reinforce":
                stats = _reinforce_batch(
                    cast("SVFModel", svf),
                    tokenizer,
                    task,
                    rows,
                    options,
                    optimizer,
                    scheduler,
                    generator,
                )
            else:
                stats = _supervised_batch(svf, tokenizer, task, rows, options, optimizer, scheduler)
            row: dict[str, Any] = {
                "step": step,
                "loss": stats["loss"],
                "reward": _clean(stats["reward"]),
                "kl": _clean(stats["kl"]),
                "val": None,
            }
            if step % options.eval_every == 0 or step == options.steps:
                val = validation_score(svf, val_task, tokenizer)
                row["val"] = val
                if val > best_score:
                    best_score, best_step, best_z, stale = val, step, svf.get_z(), 0
                else:
                    stale += 1
            history.append(row)
            reward = "" if row["reward"] is None else f"reward {row['reward']:+.2f}  "
            bar.update(step, f"{reward}loss {row['loss']:.3f}  best val {best_score:.3f}")
            if stale >= options.patience:
                stopped = "patience"
                break
    finally:
        bar.close()
    svf.set_z(best_z)
    return TrainResult(
        z=best_z,
        best_score=best_score,
        best_step=best_step,
        base_score=base,
        history=history,
        steps=step,
        stopped=stopped,
        seconds=time.perf_counter() - start,
    )


# -- from a config to files -------------------------------------------------------------------
def build_tasks(config: AdaptConfig, tokenizer: Any, split: str) -> dict[str, Any]:
    """Skill → the built task of one split (``train``, ``validation`` or ``test``).

    Task types above ``shoal.tasks`` (``testbed``) must be registered by the caller.

    Raises:
        RecipeError: A spec that does not build, naming ``tasks.<skill>.<split>``.
    """
    from shoal.errors import RecipeError, TaskError
    from shoal.tasks.registry import TaskEnv, build_task

    env = TaskEnv(tokenizer=tokenizer, root=config.root)
    out = {}
    for skill, splits in config.tasks.items():
        where = f"tasks.{skill}.{split}"
        try:
            out[skill] = build_task(getattr(splits, split), env, where)
        except TaskError as exc:
            text = str(exc)
            raise RecipeError(text if where in text else f"{where}: {text}") from None
    return out


def expert_meta(
    svf: SVFModel, config: AdaptConfig, skill: str, result: TrainResult
) -> dict[str, Any]:
    """The metadata an expert file records besides its z (all strings)."""
    return {
        "base_fingerprint": svf.fingerprint,
        "skill": skill,
        "objective": config.train.objective,
        "best_validation": f"{result.best_score:.6f}",
    }


def train_summary(
    svf: SVFModel, config: AdaptConfig, skill: str, result: TrainResult, options: Any
) -> dict[str, Any]:
    """What ``train.json`` holds: the run's numbers, the options and the base."""
    return {
        "skill": skill,
        "base": str(config.resolve(config.base)),
        "base_fingerprint": svf.fingerprint,
        "matrices": len(svf.names),
        "trainable": svf.num_trainable(),
        "options": options.model_dump(mode="json"),
        **result.summary(),
    }


def write_expert_dir(
    out: Path,
    z: dict[str, torch.Tensor],
    meta: dict[str, Any],
    summary: dict[str, Any],
) -> None:
    """Write ``out/expert.safetensors`` and ``out/train.json`` (``out`` is a fresh folder)."""
    import json

    from shoal._atomic import write_text_atomic
    from shoal.adapt.expert import save_expert

    out.mkdir(parents=True, exist_ok=True)
    save_expert(out / "expert.safetensors", z, meta)
    write_text_atomic(out / "train.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")


def load_base(base: str | Path) -> torch.nn.Module:
    """The base causal LM in float32, its weights checked finite.

    Raises:
        CheckpointError: One line naming the base: a missing, truncated or foreign weights
            file, or a NaN or infinite weight (naming the tensor).
    """
    from transformers import AutoModelForCausalLM

    from shoal.errors import CheckpointError

    try:
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as exc:  # missing, truncated, foreign
        raise CheckpointError(f"{base}: cannot load the base ({first_line(exc)})") from None
    for name, param in model.named_parameters():  # a NaN base would fail the SVD
        check_finite(param.detach(), name=name, source=base)
    return model


def _config_inputs(config: AdaptConfig) -> dict[str, str | Path]:
    """What a training run reads from disk: the base, the config's folder, the SVD cache and
    every path a task spec names (resolved against the config's folder)."""
    root = Path(config.root or ".")
    base = config.resolve(config.base)
    inputs: dict[str, str | Path] = {f"the base model {base}": base}
    inputs[f"the config's folder {root}"] = root
    if config.cache_dir:
        inputs[f"the SVD cache {config.cache_dir}"] = config.cache_dir
    for skill, splits in config.tasks.items():
        for split, spec in splits.model_dump().items():
            for key, value in spec.items():  # the keys task types give paths under
                if key not in ("path", "dir", "images", "include_path", "scheduler"):
                    continue
                path = config.resolve(value) if isinstance(value, str) else None
                if path is not None and path.exists():
                    inputs[f"the data of tasks.{skill}.{split}.{key} ({value})"] = path
    return inputs


def run_training(
    config: AdaptConfig,
    out: str | Path,
    *,
    skills: Sequence[str] | None = None,
    nested: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    classifier: bool = False,
) -> dict[str, TrainResult]:
    """Train experts as ``shoal adapt train`` does, and write them atomically.

    Args:
        config: The adapt config.
        out: The output folder; it appears only when everything is written.
        skills: Skills to train (default: all, in config order).
        nested: Write ``out/<skill>/expert.safetensors`` (and ``train.json``) per skill;
            otherwise ``out/expert.safetensors`` (one skill only).
        overwrite: Replace an existing ``out``.
        progress: Show progress bars.
        classifier: Train the classifier expert instead (``out/expert.safetensors`` with
            skill ``classifier``; its ``skills`` field lists the skills it names).

    Returns:
        Skill (or ``"classifier"``) → its :class:`TrainResult`.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        RecipeError: An unknown skill, or a task that does not build.
    """
    import json

    from shoal._atomic import atomic_dir, remove_stale_temp_siblings
    from shoal.errors import OutputExistsError, RecipeError

    target = Path(out)
    names = list(skills) if skills is not None else config.skills
    for s in names:
        if s not in config.tasks:
            known = ", ".join(config.skills)
            raise RecipeError(f"--skill {s!r}: not a skill of the config ({known})")
    if not nested and not classifier and len(names) != 1:
        raise RecipeError("one output folder holds one expert; train all skills with nested=True")
    refuse_output_holding(target, _config_inputs(config))
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target}: exists (--overwrite replaces it)")
    svf, tokenizer = load_wrapped(config)
    train_tasks = build_tasks(config, tokenizer, "train")
    val_tasks = build_tasks(config, tokenizer, "validation")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_siblings(target)
    results: dict[str, TrainResult] = {}
    with atomic_dir(target) as tmp:
        if classifier:
            from shoal.adapt.two_pass import train_classifier

            res = train_classifier(
                svf, tokenizer, train_tasks, val_tasks, config.classifier, progress
            )
            meta = expert_meta(svf, config, "classifier", res)
            meta.update(objective="supervised", skills=json.dumps(config.skills))
            summary = train_summary(svf, config, "classifier", res, config.classifier)
            write_expert_dir(tmp, res.z, meta, summary)
            results["classifier"] = res
        else:
            for s in names:
                svf.reset_z()
                res = train_expert(
                    svf, tokenizer, train_tasks[s], val_tasks[s], config.train, progress, label=s
                )
                where = tmp / s if nested else tmp
                write_expert_dir(
                    where,
                    res.z,
                    expert_meta(svf, config, s, res),
                    train_summary(svf, config, s, res, config.train),
                )
                results[s] = res
    return results


def export_expert(
    expert: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    allow_transfer: bool = False,
) -> Path:
    """Fold an expert into its base's weights and write a plain model folder (with the
    base's tokenizer), atomically — what ``shoal adapt export`` does.

    The matrices wrapped are the ones the expert names, so no config is needed; the
    folded weights are those :meth:`~shoal.adapt.svf.SVFModel.folded_weights` computes,
    i.e. the ones the wrapped model runs with.

    Raises:
        CheckpointError: The base or the expert file is unreadable.
        AdaptError: The expert belongs to another base (unless ``allow_transfer``), or
            names matrices the base lacks.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    from transformers import AutoTokenizer

    from shoal._atomic import atomic_dir, remove_stale_temp_siblings
    from shoal.adapt.expert import load_expert, read_expert
    from shoal.adapt.svf import wrap_svf
    from shoal.errors import CheckpointError, OutputExistsError

    target = Path(out)
    refuse_output_holding(target, {f"the base model {base}": base, f"the expert {expert}": expert})
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target}: exists (--overwrite replaces it)")
    base = Path(base)
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{base}: not a Hugging Face model folder (no config.json)")
    names = list(read_expert(expert).z)  # read first: a bad file fails before the model loads
    model = load_base(base)
    model.eval()
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise AdaptError(f"{expert}: names matrix {unknown[0]!r}, which {base} does not have")
    svf = wrap_svf(model, names)
    load_expert(expert, svf, allow_transfer=allow_transfer)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError):  # a base without a tokenizer exports weights only
        tokenizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_siblings(target)
    with atomic_dir(target, "export") as tmp:
        svf.save_folded(tmp, overwrite=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target
