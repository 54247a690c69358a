"""Benchmark ``shoal merge`` against raw safetensors I/O on ~160M-parameter Llama checkpoints.

Run: ``.venv/bin/python bench/merge.py`` (``make bench``). Builds three fp32 Llama
checkpoints (a base and two perturbed copies, 156M parameters, 625 MB each) once into
``.bench/merge/`` and reuses them. Prints, in one run:

- raw I/O: read every input tensor with safetensors and write one model's bytes
  with ``safetensors.torch.save_file`` (2 and 3 inputs);
- ``shoal merge`` wall and CPU time for linear, task_arithmetic, ties, dare_ties, slerp and
  mergekit's other methods (sce, della, della_linear, nearswap, karcher, multislerp,
  nuslerp, arcee_fusion), their ratios to the raw I/O of the same inputs (target for linear
  ≤ 1.5×) and to TIES (target for the newer methods ≤ 2×); CPU time is reported too
  because wall time on a shared machine mostly measures the others;
- peak memory of each merge run in a fresh subprocess: anonymous RSS above the
  process's RSS after imports (mmapped input pages are file-backed and excluded;
  target ≤ 1 GB);
- ``shoal --help`` wall time (target < 1 s);
- ``mergekit-yaml`` on the same recipes, when the side venv of ``make mergekit-venv``
  (or ``$MERGEKIT_YAML``) exists: both tools timed end to end as commands (process
  start, imports, merge, write; best of two each), with shoal's ratio to mergekit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench" / "merge"
PY = sys.executable

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2304,
    "num_hidden_layers": 14,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

METHODS = {
    "linear": ("a", "b"),
    "task_arithmetic": ("base", "a", "b"),
    "ties": ("base", "a", "b"),
    "dare_ties": ("base", "a", "b"),
    "slerp": ("a", "b"),
    "sce": ("base", "a", "b"),
    "della": ("base", "a", "b"),
    "della_linear": ("base", "a", "b"),
    "nearswap": ("base", "a"),
    "karcher": ("a", "b"),
    "multislerp": ("a", "b"),
    "nuslerp": ("a", "b"),
    "arcee_fusion": ("base", "a"),
}


def _shapes() -> dict[str, tuple[int, ...]]:
    h, f, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(int(CONFIG["num_hidden_layers"])):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (h, h)
        shapes[f"{p}mlp.gate_proj.weight"] = (f, h)
        shapes[f"{p}mlp.up_proj.weight"] = (f, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, f)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def build_models() -> dict[str, Path]:
    """Write base, a, b (streamed, one tensor in memory at a time) unless present."""
    import torch

    from shoal.checkpoint import ShardedWriter

    shapes = _shapes()
    paths = {name: BENCH / name for name in ("base", "a", "b")}
    for i, path in enumerate(paths.values()):
        if (path / "model.safetensors").is_file():
            continue
        gen = torch.Generator().manual_seed(0)
        noise = torch.Generator().manual_seed(100 + i)
        plan = {n: (s, torch.float32) for n, s in shapes.items()}
        with ShardedWriter(path, plan=plan, max_shard_bytes=10**12, overwrite=True) as w:
            for n, s in shapes.items():
                t = torch.randn(s, generator=gen) * 0.02
                if n.endswith("norm.weight"):
                    t += 1.0
                if i > 0:
                    t += torch.randn(s, generator=noise) * 0.002
                w.add(n, t)
            w.write_text("config.json", json.dumps(CONFIG, indent=2))
    return paths


def raw_io(inputs: list[Path], out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to read every tensor of ``inputs`` and write one model's bytes.

    The bound for a merge: every input byte read into memory, one model's bytes written
    and fsynced, with no arithmetic in between.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start, cpu = time.perf_counter(), time.process_time()
    result = {}
    for path in inputs:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                # clone: every byte of every input really passes through memory
                result[name] = f.get_tensor(name).clone()
    save_file(result, str(out / "model.safetensors"))
    # the same durability as shoal's writer, which fsyncs before its atomic rename
    with open(out / "model.safetensors", "rb") as fh:
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(out)
    return elapsed


_CHILD = r"""
import json, sys, threading, time, resource
def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0
from shoal.merge import merge_to_disk
import torch, safetensors, transformers  # noqa: F401 - same imports as the CLI
start_anon = anon_kb()
peak = [start_anon]
done = False
def sample():
    while not done:
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.005)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
recipe, out = sys.argv[1], sys.argv[2]
t, c = time.perf_counter(), time.process_time()
merge_to_disk(recipe, out, overwrite=True, progress=False)
elapsed, cpu = time.perf_counter() - t, time.process_time() - c
done = True
thread.join()
print(json.dumps({"seconds": elapsed, "cpu": cpu, "peak_anon_mb": (peak[0] - start_anon) / 1024,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _recipe(method: str, paths: dict[str, Path]) -> str:
    if method == "slerp":
        return (
            f"merge_method: slerp\nbase_model: {paths['a']}\n"
            f"models: [{{model: {paths['a']}}}, {{model: {paths['b']}}}]\nparameters: {{t: 0.4}}\n"
        )
    if method in ("nearswap", "arcee_fusion"):  # a base and one model
        params = "parameters: {t: 0.001}\n" if method == "nearswap" else ""
        return (
            f"merge_method: {method}\nbase_model: {paths['base']}\n"
            f"models: [{{model: {paths['a']}}}]\n{params}"
        )
    base = f"base_model: {paths['base']}\n" if METHODS[method][0] == "base" else ""
    per_model = {
        "ties": ", density: 0.5",
        "dare_ties": ", density: 0.5",
        "della": ", density: 0.5, epsilon: 0.1",
        "della_linear": ", density: 0.5, epsilon: 0.1",
    }.get(method, "")
    weights = ("", "") if method in ("karcher", "sce") else ("weight: 0.6", "weight: 0.4")
    return (
        f"merge_method: {method}\n{base}models:\n"
        f"  - model: {paths['a']}\n    parameters: {{{weights[0]}{per_model}}}\n"
        f"  - model: {paths['b']}\n    parameters: {{{weights[1]}{per_model}}}\n"
    )


def run_merge(method: str, paths: dict[str, Path]) -> dict[str, float]:
    """Merge in a fresh subprocess; its wall time and peak anonymous memory."""
    recipe = BENCH / f"{method}.yaml"
    recipe.write_text(_recipe(method, paths))
    out = BENCH / f"out-{method}"
    done = subprocess.run(
        [PY, "-c", _CHILD, str(recipe), str(out)], capture_output=True, text=True, check=True
    )
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mergekit_command() -> Path | None:
    """The ``mergekit-yaml`` of the side venv (``make mergekit-venv``), if there is one."""
    path = Path(os.environ.get("MERGEKIT_YAML", ROOT / ".bench/mergekit-venv/bin/mergekit-yaml"))
    return path if path.is_file() else None


def command_seconds(argv: list[str], out: Path) -> float:
    """Wall seconds of one command, start to exit; its output is removed after."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"{argv[0]} failed: {tail}")
    return elapsed


def compare_with_mergekit(mergekit: Path, methods: list[str]) -> None:
    """Time ``shoal merge`` and ``mergekit-yaml`` as commands on the same recipes."""
    shoal = Path(PY).with_name("shoal")
    print(f"end to end as commands, vs {mergekit}")
    print(f"{'method':<16}{'shoal s':>9}{'mergekit s':>12}{'shoal/mergekit':>16}")
    for method in methods:
        recipe = BENCH / f"{method}.yaml"
        out = BENCH / f"cmd-{method}"
        # best of two each: one end-to-end run varies by ±50 % with the page cache's state
        ours = min(
            command_seconds([str(shoal), "merge", str(recipe), str(out), "--quiet"], out)
            for _ in range(2)
        )
        theirs = min(
            command_seconds(
                [str(mergekit), str(recipe), str(out), "--no-copy-tokenizer", "--allow-crimes"],
                out,
            )
            for _ in range(2)
        )
        print(f"{method:<16}{ours:>9.2f}{theirs:>12.2f}{ours / theirs:>16.2f}")


def help_time() -> float:
    """Best of three wall times of ``shoal --help``."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([PY, "-m", "shoal.cli.main", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Build (or reuse) the checkpoints, time everything, print a table."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="methods to time (default: all; ties first when given, for the ratio)",
    )
    methods = parser.parse_args().methods

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t = time.perf_counter()
    paths = build_models()
    size = (paths["base"] / "model.safetensors").stat().st_size
    n_params = sum(int(torch.Size(s).numel()) for s in _shapes().values())
    print(
        f"checkpoints: 3 × {n_params / 1e6:.0f}M params fp32, {size / 1e6:.0f} MB each "
        f"(ready in {time.perf_counter() - t:.1f} s)"
    )
    scratch = BENCH / "raw-out"
    # best of three: the first pass may still be pulling the files into the page cache
    raw = {
        2: min(raw_io([paths["a"], paths["b"]], scratch) for _ in range(3)),
        3: min(raw_io([paths["base"], paths["a"], paths["b"]], scratch) for _ in range(3)),
    }
    for k, (wall, cpu) in raw.items():
        print(
            f"raw safetensors read+write, {k} inputs: {wall:.2f} s wall, {cpu:.2f} s CPU "
            "(best of 3)"
        )
    print(
        f"{'method':<16}{'wall s':>8}{'CPU s':>8}{'wall/raw':>10}{'CPU/raw':>9}"
        f"{'wall/ties':>11}{'peak anon MB':>14}{'max RSS MB':>12}"
    )
    ties = None
    for method in methods:
        inputs = METHODS[method]
        # best of two runs, as for the raw bound (page-cache and writeback state vary)
        runs = [run_merge(method, paths) for _ in range(2)]
        r = min(runs, key=lambda x: x["seconds"])
        r["peak_anon_mb"] = max(x["peak_anon_mb"] for x in runs)
        ties = r["seconds"] if method == "ties" else ties
        vs_ties = f"{r['seconds'] / ties:>11.2f}" if ties else f"{'—':>11}"
        wall, cpu = raw[len(inputs)]
        print(
            f"{method:<16}{r['seconds']:>8.2f}{r['cpu']:>8.2f}{r['seconds'] / wall:>10.2f}"
            f"{r['cpu'] / cpu:>9.2f}{vs_ties}{r['peak_anon_mb']:>14.0f}{r['maxrss_mb']:>12.0f}",
            flush=True,
        )
    print(f"shoal --help: {help_time():.2f} s (best of 3)")
    mergekit = mergekit_command()
    if mergekit is None:
        print("mergekit: no side venv (`make mergekit-venv`), comparison skipped")
    else:
        compare_with_mergekit(mergekit, methods)


if __name__ == "__main__":
    main()
