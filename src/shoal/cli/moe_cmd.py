"""``shoal moe``: a mixture-of-experts checkpoint from dense models (mergekit-moe's config).

The command body imports torch and the library inside, so registering it costs nothing
at ``shoal --help`` time.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

__all__ = ["register"]

_HELP = """Build a mixture-of-experts model as CONFIG (mergekit-moe YAML) says, into \
OUT_DIR.

Every layer of the output keeps the base model's attention, norms and
embeddings and gets one expert per `experts` entry: that model's MLP
(gate/up/down projections). The router row of expert e in layer l is its gate
vector, set by gate_mode:

\b
  hidden       base model's hidden state at layer l's input, last token,
               averaged over the positive prompts minus the negative ones,
               unit length
  hidden_avg   the same, each prompt averaged over its tokens
  cheap_embed  sum of the prompts' token embeddings, unit length (every layer)
  random       N(0, 1) entries (seeded by --seed)
  uniform_random (or uniform)  U(-1/√hidden, 1/√hidden) entries (seeded)

Output: Mixtral (Llama/Mistral models, no shared experts) or Qwen MoE (one
shared expert), chosen as mergekit does or by `architecture:`; config.json,
safetensors and the base's tokenizer; loads with transformers'
AutoModelForCausalLM.

\b
    base_model: ./base
    gate_mode: hidden
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: ./expert-math
        positive_prompts: ["Compute 12 * 7"]
      - source_model: ./expert-code
        positive_prompts: ["def fib(n):"]
        negative_prompts: ["Once upon a time"]

Optional keys: `architecture:` (mixtral or qwen); per expert `noise_scale`
(Gaussian noise added to its MLP weights) and `residual_scale` (a factor on
its down projection); `shared_experts:` (Qwen MoE: exactly one, always
active). See docs/moe-and-lora.md.

\b
    shoal moe moe.yaml moe-model/
"""


def _check_size(value: str) -> str:
    from shoal.checkpoint import parse_size
    from shoal.errors import ShoalError

    try:
        parse_size(value)
    except ShoalError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def register(app: typer.Typer) -> None:
    """Add the ``moe`` command to ``app``."""

    @app.command("moe", help=_HELP)
    def moe_command(
        config: Path = typer.Argument(
            ..., help="MoE config YAML (mergekit-moe format).", show_default=False
        ),
        out_dir: Path = typer.Argument(..., help="Directory to create.", show_default=False),
        device: str = typer.Option(
            "cpu", "--device", help="Where the hidden-state pass runs: cpu, cuda."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of random gates and expert noise."),
        out_shard_size: str = typer.Option(
            "2GB", "--out-shard-size", help="Largest output shard.", callback=_check_size
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
        allow_same_experts: bool = typer.Option(
            False,
            "--allow-same-experts",
            help="Build even if every expert is the same model (useful only to train it).",
        ),
        mergekit_allow_same: bool = typer.Option(  # mergekit's name: too long for a help table
            False, "--i-understand-this-is-not-useful-without-training", hidden=True
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    ) -> None:
        from shoal.merge.moe import build_moe

        start = time.perf_counter()
        result = build_moe(
            config,
            out_dir,
            device=device,
            seed=seed,
            out_shard_size=out_shard_size,
            overwrite=overwrite,
            allow_same_experts=allow_same_experts or mergekit_allow_same,
            progress=not quiet,
        )
        if not quiet:
            layers, gated, _ = result.gates.shape
            typer.echo(
                f"wrote {result.out} ({result.architecture}, {layers} layers, {gated} gate "
                f"vectors per layer) in "
                f"{time.perf_counter() - start:.1f} s"
            )
