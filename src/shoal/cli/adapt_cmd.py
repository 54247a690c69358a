"""``shoal adapt train|eval|export``: Transformer² from the command line.

Command bodies import the library inside, so registering them costs nothing at
``shoal --help`` time.
"""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register"]

_TRAIN_HELP = """Train SVF experts (one z vector per adapted matrix) as CONFIG says.

With --skill, one expert goes to OUT/expert.safetensors with OUT/train.json
(validation history, best score, base fingerprint, seconds); without, one
expert per skill goes to OUT/<skill>/. With --classifier, the classifier
strategy's expert (it answers a prompt's skill name) goes to OUT/. OUT
appears only when everything is written.

\b
    base: tb/base
    tasks:
      gcd:
        train:      {type: testbed, dir: tb, skill: gcd, split: train}
        validation: {type: testbed, dir: tb, skill: gcd, split: validation}
        test:       {type: testbed, dir: tb, skill: gcd, split: test}
    train: {objective: reinforce, steps: 200, batch_size: 64, kl: 0.1}

\b
    shoal adapt train adapt.yaml --skill gcd --out experts/gcd
    shoal adapt train adapt.yaml --out experts              # every skill
    shoal adapt train adapt.yaml --classifier --out experts/classifier
"""

_EVAL_HELP = """Score two-pass strategies on the test split of every skill.

Strategies: prompt (the base names the skill), classifier (the classifier
expert names it), fewshot (CEM mixes the experts on a few validation
examples of each skill), oracle (each skill's own expert), base (no expert).
Prints per-skill and mean test accuracy; --json writes them too.

\b
    shoal adapt eval adapt.yaml --experts experts --strategy oracle \\
        --strategy base
    shoal adapt eval adapt.yaml --experts experts --strategy prompt \\
        --json eval.json
"""

_EXPORT_HELP = """Fold an expert's z into plain weights: a model folder that \
from_pretrained loads, with the base's tokenizer, and no trace of SVF.

\b
    shoal adapt export experts/gcd/expert.safetensors --base tb/base \\
        --out gcd-svf
"""


def _prepare() -> None:
    """Register the task types above ``shoal.adapt`` and keep the loaders' bars quiet."""
    from transformers.utils import logging as hf_logging

    # the testbed task type lives above shoal.adapt; importing it registers `type: testbed`
    import shoal.executors.testbed_task  # noqa: F401

    hf_logging.disable_progress_bar()  # "Loading weights" bars would break the one-line errors


def register(app: typer.Typer) -> None:
    """Add the ``adapt`` sub-app to ``app``."""
    sub = typer.Typer(
        name="adapt",
        help="Transformer²: train SVF experts, route prompts to them, fold them into weights.",
        no_args_is_help=True,
    )

    @sub.command("train", help=_TRAIN_HELP)
    def train_cmd(
        config: Path = typer.Argument(..., help="Adapt config (YAML).", show_default=False),
        out: Path = typer.Option(..., "--out", help="Folder to write.", show_default=False),
        skill: str = typer.Option(None, "--skill", help="Train this skill only."),
        classifier: bool = typer.Option(
            False, "--classifier", help="Train the classifier strategy's expert instead."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    ) -> None:
        from shoal.adapt.config import load_adapt_config
        from shoal.adapt.train import run_training
        from shoal.errors import RecipeError

        _prepare()
        cfg = load_adapt_config(config)
        if classifier and skill is not None:
            raise RecipeError("give --skill or --classifier, not both")
        results = run_training(
            cfg,
            out,
            skills=None if skill is None else [skill],
            nested=skill is None,
            overwrite=overwrite,
            progress=not quiet,
            classifier=classifier,
        )
        if not quiet:
            for name, r in results.items():
                typer.echo(
                    f"{name}: validation {r.base_score:.4f} (base) -> {r.best_score:.4f} "
                    f"at step {r.best_step} of {r.steps} ({r.stopped}), {r.seconds:.1f} s"
                )
            typer.echo(f"wrote {out}")

    @sub.command("eval", help=_EVAL_HELP)
    def eval_cmd(
        config: Path = typer.Argument(..., help="Adapt config (YAML).", show_default=False),
        experts: Path = typer.Option(
            None, "--experts", help="Folder of experts (<skill>/expert.safetensors)."
        ),
        strategy: list[str] = typer.Option(
            ["oracle", "base"],
            "--strategy",
            help="prompt, classifier, fewshot, fewshot-unseen (the skill's own expert left out), "
            "oracle, base.",
        ),
        classifier: Path = typer.Option(
            None,
            "--classifier",
            help="The classifier expert (default EXPERTS/classifier/expert.safetensors).",
        ),
        json_out: Path = typer.Option(None, "--json", help="Also write the results here."),
    ) -> None:
        import json

        from rich.console import Console
        from rich.table import Table

        from shoal._atomic import write_text_atomic
        from shoal.adapt.config import load_adapt_config
        from shoal.adapt.two_pass import run_eval

        _prepare()
        cfg = load_adapt_config(config)
        if json_out is not None:
            _check_json_out(json_out, config, [experts, cfg.base, classifier])
        results = run_eval(cfg, experts, strategy, classifier=classifier)
        table = Table(title="test accuracy")
        table.add_column("strategy")
        for s in cfg.skills:
            table.add_column(s, justify="right")
        table.add_column("mean", justify="right")
        for r in results:
            table.add_row(
                r.strategy, *(f"{r.per_skill[s]:.4f}" for s in cfg.skills), f"{r.mean:.4f}"
            )
        Console(width=max(80, 16 * (len(cfg.skills) + 2))).print(table)
        if json_out is not None:
            body = {"config": str(config), "results": [r.to_dict() for r in results]}
            write_text_atomic(json_out, json.dumps(body, indent=2) + "\n")
            typer.echo(f"wrote {json_out}")

    @sub.command("export", help=_EXPORT_HELP)
    def export_cmd(
        expert: Path = typer.Argument(..., help="An expert file.", show_default=False),
        base: Path = typer.Option(..., "--base", help="The base model folder.", show_default=False),
        out: Path = typer.Option(..., "--out", help="Folder to write.", show_default=False),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
        allow_transfer: bool = typer.Option(
            False,
            "--allow-transfer",
            help="Apply an expert trained on another base with the same matrices.",
        ),
    ) -> None:
        from shoal.adapt.train import export_expert

        _prepare()
        path = export_expert(expert, base, out, overwrite=overwrite, allow_transfer=allow_transfer)
        typer.echo(f"exported: {path}")

    app.add_typer(sub)


def _check_json_out(json_out: Path, config: Path, inputs: list[Path | str | None]) -> None:
    """Refuse, before anything is evaluated, a --json path that is a folder, the config, or
    an existing file among what the evaluation reads (writing it would replace an input)."""
    from shoal.errors import OutputExistsError

    if json_out.is_dir():
        raise OutputExistsError(f"--json {json_out}: is a folder; name a file")
    target = json_out.resolve()
    for path in [config, *(Path(p) for p in inputs if p is not None)]:
        source = Path(path).resolve()
        if target == source or (json_out.exists() and source in target.parents):
            raise OutputExistsError(f"--json {json_out}: would replace the input {path}")
