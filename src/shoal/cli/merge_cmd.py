"""``shoal merge`` and ``shoal inspect``.

Command bodies import torch and the library inside, so registering them costs
nothing at ``shoal --help`` time.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import typer

__all__ = ["register"]


def _methods_help() -> str:
    from shoal.recipe.methods import METHODS

    lines = []
    for spec in METHODS.values():
        params = ", ".join(spec.param_names) or "no parameters"
        entry = f"  {spec.name}: {spec.help} ({params})"
        # an unwrapped block (\b): wrapped here to fit an 80-column help panel
        lines += textwrap.wrap(entry, width=78, subsequent_indent="      ")
    return "\b\n" + "\n".join(lines)


_MERGE_HELP = f"""Merge models as a recipe (mergekit YAML) says, into OUT_DIR.

The recipe names local checkpoints (directories with safetensors, or files);
shoal never downloads. Tensors are merged one at a time and streamed into
safetensors shards; OUT_DIR appears only when everything is written.

Example recipe (ties.yaml):

\b
    models:
      - model: ./expert-a
        parameters: {{weight: 0.5, density: 0.5}}
      - model: ./expert-b
        parameters: {{weight: 0.5, density: [1, 0.5, 0.2]}}
    merge_method: ties
    base_model: ./base
    dtype: bfloat16

\b
    shoal merge ties.yaml merged/ --seed 0

Methods:

{_methods_help()}
"""


def _format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} TB"  # pragma: no cover


def _check_size(value: str) -> str:
    """``--out-shard-size``: refused as the option's own error, before any work."""
    from shoal.checkpoint import parse_size
    from shoal.errors import ShoalError

    try:
        parse_size(value)
    except ShoalError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _check_dtype(value: str | None) -> str | None:
    """``--dtype``: one of the dtypes a merge can write."""
    from shoal.recipe import canonical_dtype

    if value is not None and canonical_dtype(value) is None:
        raise typer.BadParameter(f"{value!r} is not float32, float16, bfloat16 or float64")
    return value


def register(app: typer.Typer) -> None:
    """Add the ``merge`` and ``inspect`` commands to ``app``."""

    @app.command("merge", help=_MERGE_HELP)
    def merge_command(
        recipe: Path = typer.Argument(
            ..., help="Recipe YAML (mergekit format).", show_default=False
        ),
        out_dir: Path = typer.Argument(..., help="Directory to create.", show_default=False),
        device: str = typer.Option("cpu", "--device", help="Where to compute: cpu, cuda, cuda:1."),
        out_shard_size: str = typer.Option(
            "2GB",
            "--out-shard-size",
            help="Largest output shard, e.g. 500MB, 2GB.",
            callback=_check_size,
        ),
        dtype: str | None = typer.Option(
            None,
            "--dtype",
            help="Output dtype: float32, float16, bfloat16, float64 (default: the recipe's, "
            "else the sources').",
            callback=_check_dtype,
        ),
        seed: int = typer.Option(
            0, "--seed", help="Seed of the random drops of the dare_* methods."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
        allow_nonfinite: bool = typer.Option(
            False, "--allow-nonfinite", help="Merge inputs that hold NaN/Inf instead of refusing."
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
        float32_compute: bool = typer.Option(
            False,
            "--float32-compute",
            help="Compute in float32 whatever the recipe's dtype says (by default dtype is "
            "the compute dtype, as in mergekit; out_dtype the output's).",
        ),
        strict: bool = typer.Option(
            False,
            "--strict",
            help="Refuse recipe keys that have no effect (mergekit ignores them; by default "
            "each is a warning line).",
        ),
        keep_intermediates: bool = typer.Option(
            False,
            "--keep-intermediates",
            help="Multi-stage recipe: keep the stages' outputs in .OUT_DIR.stages beside "
            "OUT_DIR (reused on a rerun while their recipes do not change).",
        ),
    ) -> None:
        from shoal.merge import merge_to_disk

        start = time.perf_counter()
        out = merge_to_disk(
            recipe,
            out_dir,
            device=device,
            out_shard_size=out_shard_size,
            dtype=dtype,
            seed=seed,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            progress=not quiet,
            float32_compute=float32_compute,
            strict=strict,
            keep_intermediates=keep_intermediates,
        )
        if not quiet:
            # rglob: a diffusers pipeline keeps its weights in component folders
            size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
            typer.echo(
                f"wrote {out} ({_format_bytes(size)}) in {time.perf_counter() - start:.1f} s"
            )

    @app.command("inspect")
    def inspect_command(
        path: Path = typer.Argument(
            ..., help="A model directory or a weights file.", show_default=False
        ),
        filter_: str | None = typer.Option(
            None, "--filter", "-f", help="Only tensors whose name contains this."
        ),
    ) -> None:
        """Show a checkpoint's tensors: names, shapes, dtypes, layers and sizes.

        Reads headers only (no tensor data). Example: shoal inspect ./merged
        """
        from collections import Counter

        from rich.console import Console
        from rich.table import Table

        from shoal.checkpoint import layer_index, num_layers, open_checkpoint

        console = Console()
        with open_checkpoint(path) as reader:
            names = [n for n in reader if filter_ is None or filter_ in n]
            rows = []
            total_params = total_bytes = 0
            dtypes: Counter[str] = Counter()
            layers: set[int] = set()
            for name in names:
                dtype = str(reader.dtype(name)).removeprefix("torch.")
                numel = reader.numel(name)
                nbytes = numel * reader.dtype(name).itemsize
                layer = layer_index(name)
                total_params += numel
                total_bytes += nbytes
                dtypes[dtype] += 1
                if layer is not None:
                    layers.add(layer)
                shape = "×".join(str(d) for d in reader.shape(name)) or "scalar"
                rows.append(
                    (name, shape, dtype, "" if layer is None else str(layer), _format_bytes(nbytes))
                )
            columns = ("tensor", "shape", "dtype", "layer", "size")
            if console.is_terminal:
                table = Table(title=str(path), show_lines=False)
                for col in columns:
                    table.add_column(col, justify="right" if col in ("layer", "size") else "left")
                for row in rows:
                    table.add_row(*row)
                console.print(table)
            else:  # piped: whole names, tab-separated, for grep / cut / awk
                typer.echo("\t".join(columns))
                for row in rows:
                    typer.echo("\t".join(row))
            declared = num_layers(reader.config) if reader.config else None
            model_type = (reader.config or {}).get("model_type", "?")
            typer.echo(
                f"{len(names)} tensors, {total_params:,} parameters, "
                f"{_format_bytes(total_bytes)}; layers: {len(layers)}"
                + (f" (config: {declared})" if declared is not None else "")
                + f"; dtypes: {', '.join(f'{k} ×{v}' for k, v in sorted(dtypes.items()))}"
                + f"; model_type: {model_type}"
            )
