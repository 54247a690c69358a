"""``shoal extract-lora``: a PEFT LoRA adapter of the difference between two checkpoints.

The command body imports torch and the library inside, so registering it costs nothing
at ``shoal --help`` time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from shoal.merge.lora_extract import LoraExtraction

__all__ = ["register"]

_HELP = """Extract a LoRA adapter (PEFT format) of MODEL − BASE into OUT_DIR.

Every linear layer whose weight differs is factorised by a truncated SVD of
the difference Δ = U Σ Vᵀ: lora_A = Σ½ Vᵀ, lora_B = U Σ½ (rank --rank, capped
at the layer's own rank), so that PEFT's W + lora_B·lora_A is the fine-tuned
weight up to the dropped singular values. Embeddings and the output head are
saved whole (or factorised with --embed-lora); changed norms and other
non-linear modules are saved whole (or left out with --skip-undecomposable); a
linear whose bias changed is saved whole. Unchanged modules are left out.

OUT_DIR gets adapter_config.json, adapter_model.safetensors, README.md and
lora_report.json (per module: rank and relative error ‖Δ −
lora_B·lora_A‖/‖Δ‖); the same table is printed. Tensors are read one module at
a time; OUT_DIR appears only when complete.

\b
    shoal extract-lora --base ./base --model ./fine-tuned --rank 32 lora/
\b
    from peft import PeftModel
    model = PeftModel.from_pretrained(base_model, "lora/").merge_and_unload()
"""


def _check_dtype(value: str | None) -> str | None:
    if value is not None and value not in ("float32", "float16", "bfloat16"):
        raise typer.BadParameter(f"{value!r} is not float32, float16 or bfloat16")
    return value


def _fmt_error(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def _print_report(result: LoraExtraction, out: Path, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: whole names, no wrapping
        console = Console(width=200)
    table = Table(title=f"LoRA of rank {result.rank}: {out}")
    for col, justify in (
        ("module", "left"),
        ("shape", "right"),
        ("stored as", "left"),
        ("rank", "right"),
        ("rel. error", "right"),
        ("note", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for m in result.modules:
        table.add_row(
            m.name,
            "×".join(str(d) for d in m.shape),
            m.kind,
            "" if m.rank is None else str(m.rank),
            _fmt_error(m.relative_error),
            m.reason,
        )
    console.print(table)
    counts = {k: sum(m.kind == k for m in result.modules) for k in ("full", "skipped")}
    n_lora = sum(m.kind.startswith("lora") for m in result.modules)
    worst = max(
        (m for m in result.modules if m.kind.startswith("lora")),
        key=lambda m: m.relative_error or 0.0,
        default=None,
    )
    worst_txt = (
        f"; largest relative error {worst.relative_error:.2e} ({worst.name})"
        if worst is not None and worst.relative_error is not None
        else ""
    )
    typer.echo(
        f"wrote {out} in {seconds:.1f} s: {n_lora} LoRA modules, {counts['full']} saved "
        f"whole, {counts['skipped']} skipped, {result.unchanged} unchanged{worst_txt}"
    )


def register(app: typer.Typer) -> None:
    """Add the ``extract-lora`` command to ``app``."""

    @app.command("extract-lora", help=_HELP)
    def extract_lora_command(
        out_dir: Path = typer.Argument(..., help="Adapter folder to create.", show_default=False),
        base: Path = typer.Option(
            ..., "--base", "--base-model", help="The base model folder.", show_default=False
        ),
        model: Path = typer.Option(
            ..., "--model", help="The fine-tuned model folder.", show_default=False
        ),
        rank: int = typer.Option(
            128, "--rank", "--max-rank", help="LoRA rank (each layer's is capped at its own)."
        ),
        all_scale_on_a: bool = typer.Option(
            False,
            "--no-distribute-scale",
            help="Put all of Σ on lora_A (default: Σ½ on lora_A and on lora_B).",
        ),
        # mergekit's name for the default, which its examples spell out; hidden, so that
        # its pairing with --no-distribute-scale does not squeeze the help table
        distribute_scale: bool = typer.Option(False, "--distribute-scale", hidden=True),
        embed_lora: bool = typer.Option(
            False, "--embed-lora", help="Factorise embeddings and the head instead of saving them."
        ),
        save_modules: list[str] = typer.Option(
            [], "--save-module", help="A module (name or last part) to save whole; repeatable."
        ),
        include: list[str] = typer.Option(
            [], "--include", "-i", help="Only modules matching this regex; repeatable."
        ),
        exclude: list[str] = typer.Option(
            [], "--exclude", "-e", help="Leave out modules matching this regex; repeatable."
        ),
        sv_epsilon: float = typer.Option(
            0.0, "--sv-epsilon", help="Drop singular values at or below this."
        ),
        skip_undecomposable: bool = typer.Option(
            False,
            "--skip-undecomposable",
            help="Leave out changed non-linear modules (norms) instead of saving them whole.",
        ),
        dtype: str | None = typer.Option(
            None,
            "--dtype",
            help="Adapter dtype: float32, float16, bfloat16 (default: the model's).",
            callback=_check_dtype,
        ),
        device: str = typer.Option("cpu", "--device", help="Where to compute: cpu, cuda."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
    ) -> None:
        from shoal.merge.lora_extract import extract_lora

        if distribute_scale and all_scale_on_a:
            raise typer.BadParameter(
                "give --distribute-scale or --no-distribute-scale, not both",
                param_hint="--no-distribute-scale",
            )

        start = time.perf_counter()
        result = extract_lora(
            base,
            model,
            out_dir,
            rank=rank,
            distribute_scale=not all_scale_on_a,
            embed_lora=embed_lora,
            save_modules=save_modules,
            include=include,
            exclude=exclude,
            sv_epsilon=sv_epsilon,
            skip_undecomposable=skip_undecomposable,
            dtype=dtype,
            device=device,
            overwrite=overwrite,
            progress=not quiet,
        )
        if not quiet:
            _print_report(result, out_dir, time.perf_counter() - start)
