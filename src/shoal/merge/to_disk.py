"""``merge``: execute a recipe to a checkpoint directory, streaming and atomically."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shoal._atomic import hold_lock, refuse_output_holding
from shoal._devices import resolve_device
from shoal._yaml import safe_dump
from shoal.checkpoint import (
    ShardedWriter,
    copy_config_files,
    copy_tokenizer_files,
    parse_size,
    tokenizer_files,
    with_num_layers,
)
from shoal.errors import OutputExistsError, RecipeError
from shoal.merge.card import model_card, rebuild_line
from shoal.merge.execute import iter_merged
from shoal.merge.plan import MergePlan, build_plan
from shoal.merge.sources import TensorSource, close_all, open_sources, resolve_model_path
from shoal.merge.vocab import recipe_vocabulary
from shoal.recipe import Recipe, canonical_dtype, load_recipe, rename_models
from shoal.recipe.chat_templates import BUILTIN_CHAT_TEMPLATES


def _model_dir(ref: str, recipe: Recipe, sources: Mapping[str, TensorSource]) -> Path | None:
    path = getattr(sources.get(ref), "path", None)
    if not isinstance(path, Path):
        path = resolve_model_path(ref, recipe)
    return path if path.is_dir() else None


def _model_chat_template(model_dir: Path) -> str | None:
    """The chat template a model's tokenizer carries, if any."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _chat_template(recipe: Recipe, sources: Mapping[str, TensorSource]) -> str | None:
    """The template ``chat_template`` asks for: a built-in's text, the Jinja given, or for
    ``auto`` the one most of the recipe's models carry (the first of them on a tie)."""
    value = recipe.chat_template
    if value is None:
        return None
    if value != "auto":
        return BUILTIN_CHAT_TEMPLATES.get(value, value)
    dirs = (_model_dir(ref, recipe, sources) for ref in recipe.model_refs())
    found = [t for d in dirs if d is not None and (t := _model_chat_template(d)) is not None]
    return Counter(found).most_common(1)[0][0] if found else None


def _refuse_source_as_output(
    out: Path, recipe: Recipe, sources: Mapping[str, TensorSource]
) -> None:
    """Refuse an ``out`` that is, or holds, one of the recipe's own models.

    ``--overwrite`` replaces ``out`` only after the merge; a source inside it
    would be deleted by the very merge that reads it.
    """
    paths = {ref: getattr(sources.get(ref), "path", None) for ref in recipe.model_refs()}
    refuse_output_holding(
        out,
        {f"the recipe's model {ref!r} ({p})": p for ref, p in paths.items() if isinstance(p, Path)},
    )


def _stored_recipe(
    recipe: Recipe, sources: Mapping[str, TensorSource], seed: int, float32_compute: bool = False
) -> str:
    """``shoal_recipe.yaml``: the recipe with every model path made absolute, so that its
    rebuild line works from any working directory (as a run's ``best/`` does)."""
    paths = {}
    for ref in recipe.model_refs():
        path = getattr(sources.get(ref), "path", None)
        if isinstance(path, Path):
            paths[ref] = str(path.resolve())
    data = rename_models(recipe.to_dict(), paths)
    return (
        rebuild_line(seed, float32_compute=float32_compute)
        + "\n"
        + safe_dump(data, sort_keys=False, default_flow_style=None)
    )


def _write_tokenizer(tokenizer: Any, writer: ShardedWriter) -> None:
    """Save a tokenizer with transformers and put its files into the output."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        copy_tokenizer_files(tmp, writer)


def _one_dtype(plan: MergePlan) -> str | None:
    """The output dtype when the recipe names none but the reference mixes float dtypes.

    A checkpoint with bf16 and fp32 tensors would come out mixed while its config.json
    names one dtype. It is computed and written in float32, which holds every value of
    the others exactly, and config.json says so. ``None`` when the floating tensors share
    one dtype.
    """
    found = {tp.dtype for tp in plan.tensors if tp.dtype.is_floating_point}
    return "float32" if len(found) > 1 else None


def _config_updates(
    plan: MergePlan, config: dict[str, Any] | None, out_dtype: str | None
) -> dict[str, Any]:
    if config is None:
        return {}
    updated = dict(config)
    if plan.vocab is not None:  # one row per output token (padded), as the tensors hold
        if isinstance(updated.get("text_config"), dict) and "vocab_size" not in updated:
            updated["text_config"] = {**updated["text_config"], "vocab_size": plan.vocab.rows}
        else:
            updated["vocab_size"] = plan.vocab.rows
    if plan.num_layers is not None:
        updated = with_num_layers(updated, plan.num_layers, layer_sources=plan.layer_sources)
    if out_dtype is not None:
        # transformers 5 reads "dtype", older versions "torch_dtype"; keep whichever exists
        keys = [k for k in ("dtype", "torch_dtype") if k in updated] or ["torch_dtype"]
        for key in keys:
            updated[key] = out_dtype
    return updated


def merge_to_disk(
    recipe: Recipe | str | Path | Mapping[str, Any],
    out_dir: str | Path,
    *,
    device: str = "cpu",
    out_shard_size: str | int = "2GB",
    dtype: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
    float32_compute: bool = False,
    strict: bool = False,
    keep_intermediates: bool = False,
) -> Path:
    """Execute a recipe and write the merged model as a Hugging Face checkpoint.

    The plan is checked against every model's metadata first (missing tensors, shape
    mismatches), then tensors are merged one at a time and streamed into
    safetensors shards in a temporary sibling directory, renamed onto ``out_dir``
    only when complete. Config and tokenizer files come from the base model (or
    ``tokenizer_source``); the recipe is stored as ``shoal_recipe.yaml`` with a
    model card ``README.md``.

    Args:
        recipe: a :class:`~shoal.recipe.Recipe`, a YAML path or text, or a dict.
        out_dir: the directory to create.
        device: where to compute (``cpu``, ``cuda``, ``cuda:1``).
        out_shard_size: largest shard, e.g. ``"2GB"``, ``"500MB"`` or bytes.
        dtype: output dtype (overrides the recipe's ``out_dtype`` / ``dtype``).
        seed: seed of the random drops (DARE).
        overwrite: replace ``out_dir`` if it exists.
        allow_nonfinite: merge inputs that hold NaN/Inf instead of refusing.
        progress: show a progress bar.
        float32_compute: compute in float32 whatever the recipe's ``dtype`` says (by
            default ``dtype`` is the compute dtype, as in mergekit).
        strict: refuse recipe keys that have no effect (by default a warning line each).
        keep_intermediates: a multi-stage recipe (several YAML documents with ``name:``)
            keeps its work folder ``.<out name>.stages`` beside ``out_dir``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ShoalError: a user-caused problem (recipe, checkpoint, merge, output exists,
            another merge writing ``out_dir`` now: it holds ``.<name>.lock`` beside
            ``out_dir``); nothing is left at ``out_dir`` in that case.

    Example:
        >>> merge_to_disk("recipe.yaml", "out/merged", dtype="bfloat16")  # doctest: +SKIP
    """
    from shoal import __version__

    resolve_device(device)
    if isinstance(recipe, str | Path):
        from shoal.merge.multi import merge_stages, read_stages

        stages = read_stages(recipe)
        if stages is not None:
            return merge_stages(
                recipe,
                stages,
                out_dir,
                keep_intermediates=keep_intermediates,
                device=device,
                out_shard_size=out_shard_size,
                dtype=dtype,
                seed=seed,
                overwrite=overwrite,
                allow_nonfinite=allow_nonfinite,
                progress=progress,
                float32_compute=float32_compute,
                strict=strict,
            )
    recipe_file = Path(recipe) if isinstance(recipe, str | Path) else None
    recipe = load_recipe(recipe, strict=strict)
    out = Path(out_dir)
    # before any model is read: --overwrite would delete the working directory or the recipe
    refuse_output_holding(out, {f"the recipe {recipe_file}": recipe_file} if recipe_file else {})
    from shoal.merge.pipeline import (
        merge_pipeline,
        pipeline_paths,
        rename_weights,
        uses_diffusers_names,
    )

    pipelines = pipeline_paths(recipe)
    if pipelines is not None:  # diffusers pipeline folders: merged component by component
        return merge_pipeline(
            recipe,
            pipelines,
            out_dir,
            overwrite=overwrite,
            device=device,
            out_shard_size=out_shard_size,
            dtype=dtype,
            seed=seed,
            allow_nonfinite=allow_nonfinite,
            progress=progress,
            float32_compute=float32_compute,
            strict=strict,
        )
    max_bytes = parse_size(out_shard_size)
    sources, opened = open_sources(recipe)
    try:
        _refuse_source_as_output(out, recipe, sources)
        tok = recipe.vocabulary_source()
        lead = recipe.base_model or recipe.model_refs()[0]  # union: lead's files + new tokens
        tok_ref = recipe.base_model if tok is None else lead if tok in ("base", "union") else tok
        if tok is not None:  # before the tokenizers are read: a clear line for no files
            tok_dir = _model_dir(str(tok_ref), recipe, sources)
            if tok_dir is None or not tokenizer_files(tok_dir):
                tok_at = tok_dir or resolve_model_path(str(tok_ref), recipe)
                key = "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"
                raise RecipeError(f"{key}: {tok!r} ({tok_at}) holds no tokenizer files")
        vocab = recipe_vocabulary(recipe, sources)
        plan = build_plan(
            recipe, sources, dtype=dtype, float32_compute=float32_compute, vocab=vocab
        )
        mixed = _one_dtype(plan) if dtype is None and recipe.output_dtype() is None else None
        if mixed:  # shoal's rule, not mergekit's (it writes the mix): float32 throughout
            plan = build_plan(recipe, sources, dtype=mixed, float32_compute=True, vocab=vocab)
        out_dtype = dtype or recipe.output_dtype() or mixed
        if dtype:  # the stored recipe rebuilds the model without the command's options
            recipe = recipe.model_copy(update={"out_dtype": canonical_dtype(dtype) or dtype})
        ref_dir = _model_dir(plan.reference, recipe, sources)
        tok_dir = _model_dir(tok_ref, recipe, sources) if tok_ref else ref_dir
        config = sources[plan.reference].config
        updates = _config_updates(plan, config, canonical_dtype(out_dtype) if out_dtype else None)
        # one writer per output: a second merge to it (--overwrite or not) is refused
        target = Path(os.path.abspath(out))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only or full disk above the output: one line
            reason = exc.strerror or os.strerror(exc.errno or 0)
            where = f"{out}: cannot create its folder {target.parent}"
            raise OutputExistsError(f"{where} ({reason})") from None
        lock = target.with_name(f".{target.name}.lock")
        with (
            hold_lock(lock, str(out), remove=True),
            ShardedWriter(
                out, plan=plan.writer_plan(), max_shard_bytes=max_bytes, overwrite=overwrite
            ) as writer,
        ):
            for name, tensor in iter_merged(
                plan,
                sources,
                device=device,
                seed=seed,
                allow_nonfinite=allow_nonfinite,
                progress=progress,
            ):
                writer.add(name, tensor)
            if ref_dir is not None:
                copy_config_files(ref_dir, writer, config_updates=updates)
            elif config is not None:  # a reference given as a file: its config as parsed
                writer.write_text("config.json", json.dumps(updates, indent=2) + "\n")
            if vocab is not None and vocab.rewritten:  # new tokens added, or stripped
                _write_tokenizer(vocab.tokenizer, writer)
            elif tok_dir is not None:  # every file from one model: a mix would load as neither
                copy_tokenizer_files(tok_dir, writer)
            template = _chat_template(recipe, sources)
            if template is not None:  # transformers prefers it to tokenizer_config's
                writer.write_text("chat_template.jinja", template)
            writer.write_text(
                "shoal_recipe.yaml", _stored_recipe(recipe, sources, seed, float32_compute)
            )
            writer.write_text(
                "README.md",
                model_card(
                    recipe,
                    seed=seed,
                    num_tensors=len(plan.tensors),
                    version=__version__,
                    float32_compute=float32_compute,
                ),
            )
    finally:
        close_all(opened)
    if ref_dir is not None and uses_diffusers_names(ref_dir):  # a diffusers model folder
        rename_weights(out)
    return out
