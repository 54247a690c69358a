"""Building a testbed: data, tokenizer, a base model, one expert per skill.

``build_testbed(out_dir, size, seed)`` writes::

    out_dir/
      testbed.json                      sizes, seeds, skills, timings, hashes
      data/<skill>/{train,validation,test}.jsonl
      base/                             Hugging Face directory (safetensors, config,
      expert-<skill>/                   tokenizer, generation_config)

Everything is built in a temporary sibling directory and renamed onto
``out_dir`` when complete, so a killed build leaves nothing half-written.

**Same build on every x86 host.** Training on the CPU is bit-reproducible for a
seed, a size and a thread count on one host, but CPU kernels round differently
on different vector widths: ATen picks AVX-512, AVX2 or plain kernels for the
host it runs on, and MKL's GEMMs pick their own code path. So a CPU build runs
in a child process whose environment pins both before torch loads
(``ATEN_CPU_CAPABILITY=avx2``, ``MKL_CBWR=AVX2``, the thread count), and ends by
hashing the weights (:mod:`shoal.testbed.fingerprint`) and scoring each expert
on its own skill's test split; both go to ``testbed.json`` under
``fingerprint``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal import errors
from shoal._atomic import (
    refuse_working_dir,
    remove_stale_temp_siblings,
    replace_dir,
    temp_sibling,
)
from shoal._devices import resolve_device
from shoal.errors import OutputExistsError
from shoal.testbed.fingerprint import short_fingerprint, weights_sha256
from shoal.testbed.sizes import TestbedSize, get_size
from shoal.testbed.skills import SKILLS, SPLITS, make_splits, terse_example
from shoal.testbed.tokenizer import train_tokenizer
from shoal.testbed.train import encode_examples, make_model, train_steps

__all__ = [
    "FORMAT_VERSION",
    "KERNEL_ENV",
    "Progress",
    "build_testbed",
    "expert_name",
    "kernels_pinned",
    "pinned_env",
    "save_model",
    "write_jsonl",
]

FORMAT_VERSION = 1

# read when torch loads (ATen) and at MKL's first call: AVX2 is the widest vector
# width every x86 server of the last ten years has, and MKL on AMD already takes
# its AVX2 path, so hosts with AVX-512 (Intel or AMD) and without it train alike
KERNEL_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}

# progress(phase, steps done in phase, steps in phase)
Progress = Callable[[str, int, int], None]


def expert_name(skill: str) -> str:
    """Directory name of the expert for ``skill``."""
    return f"expert-{skill}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _generator(seed: int, *key: int) -> torch.Generator:
    """A torch generator for one phase of the build, derived from the root seed."""
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One sorted-key JSON object a line (the testbeds' data splits); makes the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def save_model(model: Any, tokenizer: Any, path: Path, *, max_new_tokens: int = 16) -> None:
    """Save a loadable Hugging Face directory (inside the build's temporary tree), with a
    greedy generation config of ``max_new_tokens``."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def kernels_pinned() -> bool:
    """Whether this process was started with :data:`KERNEL_ENV` (torch read it at load)."""
    return all(os.environ.get(k) == v for k, v in KERNEL_ENV.items())


def pinned_env(threads: int | None) -> dict[str, str]:
    """The environment of a pinned build's child process."""
    env = dict(os.environ) | KERNEL_ENV
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def _kernels() -> dict[str, Any]:
    """What the arithmetic of this process ran on, for ``testbed.json``."""
    return {
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "pinned": kernels_pinned(),
    }


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM when the build's process dies (even by kill -9)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _build_in_child(
    out: Path,
    size: TestbedSize,
    seed: int,
    overwrite: bool,
    threads: int | None,
    progress: Progress | None,
    score: bool,
) -> Path:
    """Run the build in a child process whose kernels are pinned (see the module doc)."""
    job = {
        "out": str(out),
        "size": size.to_dict(),
        "seed": seed,
        "overwrite": overwrite,
        "threads": threads,
        "score": score,
    }
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "shoal.testbed._child", json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=pinned_env(threads),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        failure: tuple[str, str] | None = None
        try:
            assert child.stdout is not None
            for line in child.stdout:
                kind, *rest = line.rstrip("\n").split("\t")
                if kind == "progress" and progress is not None:
                    progress(rest[0], int(rest[1]), int(rest[2]))
                elif kind == "error":
                    failure = (rest[0], rest[1])
            code = child.wait()
        except BaseException:  # Ctrl-C or an error in a progress callback
            child.terminate()
            child.wait()
            remove_stale_temp_siblings(out)  # the child's, if SIGTERM ended it outright
            raise
        if failure is not None:
            cls = getattr(errors, failure[0], None)
            if isinstance(cls, type) and issubclass(cls, errors.ShoalError):
                raise cls(failure[1])
        if code != 0:
            err.seek(0)
            tail = err.read()[-4000:]
            raise RuntimeError(f"the testbed build's child process failed (exit {code}):\n{tail}")
    return out


def prepare_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` unless ``overwrite``; create its parent."""
    refuse_working_dir(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def build_testbed(
    out_dir: str | Path,
    size: str | TestbedSize = "tiny",
    seed: int = 0,
    *,
    overwrite: bool = False,
    threads: int | None = 1,
    progress: Progress | None = None,
    device: str | None = None,
    pin_kernels: bool = True,
    score: bool = True,
) -> Path:
    """Build a base model and one expert per skill, with held-out data.

    Args:
        out_dir: Where the testbed goes; must not exist unless ``overwrite``.
        size: ``"tiny"`` (seconds; a pipeline smoke test) or ``"small"`` (a few
            minutes on two cores; experts clearly beat the base), or a preset.
        seed: Root seed; the same seed, size and thread count give identical
            tensors (on the CPU, on any x86 host with AVX2 while
            ``pin_kernels``).
        overwrite: Replace an existing ``out_dir`` once the new one is complete.
        threads: torch intra-op threads during the build (restored after);
            ``None`` leaves torch's setting alone. The count is part of the
            build: 1 and 2 threads train the same weights here, 3 do not. One
            thread is the default because on a shared 2-core host two threads
            spin waiting for each other (4x slower per step, measured).
        progress: Called as ``progress(phase, done, total)`` while training.
        device: Where to train (``"cuda"``, ...); ``None`` means CPU. Initial
            weights and batch order are drawn on the CPU, so only the arithmetic
            differs between devices.
        pin_kernels: On the CPU, train in a child process with
            :data:`KERNEL_ENV` and the thread count in its environment (unless
            this process already has them). False trains here, on whatever
            kernels this host picked: the weights then depend on the host.
        score: Score each expert on its own skill's test split at the end
            (``fingerprint.own_skill_test`` in ``testbed.json``).

    Returns:
        The path of the finished testbed.

    Raises:
        OutputExistsError: If ``out_dir`` exists and ``overwrite`` is false.
        TaskError: If the size is unknown or a generator runs out of questions.
    """
    out = Path(os.path.abspath(out_dir))  # "." and "o/.." have a name
    preset = get_size(size) if isinstance(size, str) else size
    resolve_device(device)
    prepare_target(out, overwrite)
    on_cpu = device is None or torch.device(device).type == "cpu"
    if pin_kernels and on_cpu and not kernels_pinned():
        return _build_in_child(out, preset, seed, overwrite, threads, progress, score)
    remove_stale_temp_siblings(out)  # also a leftover under our own pid
    tmp = temp_sibling(out)
    saved_threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        tmp.mkdir(parents=True)
        meta = _build_into(tmp, preset, seed, progress, device)
        meta["build_seconds"] = round(time.perf_counter() - started, 2)
        meta["threads"] = torch.get_num_threads()
        meta["kernels"] = _kernels()
        full = weights_sha256(tmp, meta["models"])
        meta["fingerprint"] = {"weights": short_fingerprint(full), "weights_sha256": full}
        (tmp / "testbed.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if score:
            t0 = time.perf_counter()
            meta["fingerprint"]["own_skill_test"] = _own_skill_scores(tmp, device)
            meta["score_seconds"] = round(time.perf_counter() - t0, 2)
            (tmp / "testbed.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    finally:
        torch.set_num_threads(saved_threads)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _own_skill_scores(root: Path, device: str | None) -> dict[str, float]:
    """Each expert's exact match (percent, 2 decimals) on its own skill's test split."""
    from transformers import AutoModelForCausalLM

    from shoal.testbed.load import load_testbed

    bed = load_testbed(root)
    tokenizer = bed.tokenizer()
    scores: dict[str, float] = {}
    for skill in bed.skills:
        model = AutoModelForCausalLM.from_pretrained(root / expert_name(skill))
        if device is not None:
            model = model.to(device)  # type: ignore[arg-type]
        values = bed.task(skill, "test", device=device, tokenizer=tokenizer).score(model)
        scores[skill] = round(100.0 * float(values.mean()), 2) if len(values) else 0.0
    return scores


def _build_into(
    root: Path, size: TestbedSize, seed: int, progress: Progress | None, device: str | None
) -> dict[str, Any]:
    """Write data and models under ``root``; return the metadata of the build."""
    import transformers

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    skills = list(SKILLS)
    splits = {skill: make_splits(skill, seed, size.split_sizes()) for skill in skills}
    data_hashes: dict[str, dict[str, str]] = {}
    for skill in skills:
        data_hashes[skill] = {}
        for split in SPLITS:
            path = root / "data" / skill / f"{split}.jsonl"
            write_jsonl(path, splits[skill][split])
            data_hashes[skill][split] = _sha256(path)
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    corpus = [e["prompt"] + " " + e["answer"] for s in skills for e in splits[s]["train"]]
    tokenizer = train_tokenizer(corpus, size.vocab_size, split_digits=size.split_digits)
    encoded = {s: encode_examples(tokenizer, splits[s]["train"]) for s in skills}
    timings["tokenizer"] = time.perf_counter() - t0

    def reporter(phase: str, total: int) -> Any:
        if progress is None:
            return None
        progress(phase, 0, total)
        return lambda step, _loss: progress(phase, step + 1, total)

    t0 = time.perf_counter()
    base = make_model(size, tokenizer, _generator(seed, 0)).to(device or "cpu")
    if size.terse_base:  # the skills in short prompts; experts learn the full ones
        terse = [terse_example(s, e) for s in skills for e in splits[s]["train"]]
        mix = encode_examples(tokenizer, terse)
    else:
        mix = [row for s in skills for row in encoded[s]]
    base_losses = train_steps(
        base,
        mix,
        steps=size.base_steps,
        size=size,
        pad_id=tokenizer.pad_token_id,
        generator=_generator(seed, 1),
        on_step=reporter("base", size.base_steps),
        device=device,
    )
    save_model(base, tokenizer, root / "base")
    timings["base"] = time.perf_counter() - t0
    models: dict[str, dict[str, Any]] = {
        "base": {"path": "base", "skill": None, "final_loss": base_losses[-1]}
    }

    for index, skill in enumerate(skills):
        t0 = time.perf_counter()
        expert = copy.deepcopy(base)
        losses = train_steps(
            expert,
            encoded[skill],
            steps=size.expert_steps,
            size=size,
            pad_id=tokenizer.pad_token_id,
            generator=_generator(seed, 2, index),
            on_step=reporter(expert_name(skill), size.expert_steps),
            device=device,
            lr=size.expert_lr,
        )
        save_model(expert, tokenizer, root / expert_name(skill))
        timings[expert_name(skill)] = time.perf_counter() - t0
        models[expert_name(skill)] = {
            "path": expert_name(skill),
            "skill": skill,
            "final_loss": losses[-1],
        }

    for info in models.values():
        info["sha256"] = _sha256(root / info["path"] / "model.safetensors")
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "size": size.to_dict(),
        "skills": skills,
        "skill_specs": {
            s: {"config": SKILLS[s].config, "max_new_tokens": SKILLS[s].max_new_tokens}
            for s in skills
        },
        "split_sizes": {s: {k: len(v) for k, v in splits[s].items()} for s in skills},
        "prompt_format": "Q: {question}\\nA:",
        "models": models,
        "num_parameters": sum(p.numel() for p in base.parameters()),
        "data_sha256": data_hashes,
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "device": str(device or "cpu"),
        "versions": _versions(transformers.__version__),
    }


def _versions(transformers_version: str) -> dict[str, str]:
    """Versions of what the build's numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__, "transformers": transformers_version}
    for dist in ("tokenizers", "reasoning-gym", "numpy"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "absent"
    found["python"] = sys.version.split()[0]
    return found
