"""What the testbed benchmarks share: one ``shoal evolve`` of an example config, pointed at a
testbed build, in a child process on the build's kernels; and the host's speed, measured.

``bench/testbed_grid.py``, ``bench/cycleqd_testbed.py`` and ``bench/cycleqd_simplex.py``
import it (each script's folder is on ``sys.path`` when it runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: one thread and the AVX2 kernels, as the testbed build trains (docs/testbed.md)
PINNED_KERNELS = {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def evolve_example(example: Path, build: Path, run_dir: Path, args: Sequence[str] = ()) -> None:
    """Run ``shoal evolve`` on ``example`` with its ``../.testbed/small`` paths pointed at
    ``build``, into ``run_dir`` (the rewritten config is written beside it); ``args`` are
    extra command-line arguments (``--set`` overrides)."""
    cfg = run_dir.parent / f"{run_dir.name}.yaml"
    cfg.write_text(example.read_text().replace("../.testbed/small", str(build.resolve())))
    command = [sys.executable, "-m", "shoal.cli.main", "evolve", str(cfg)]
    command += ["--run-dir", str(run_dir), "--no-progress", *args]
    print(f"running {run_dir.name} ...", flush=True)
    subprocess.run(command, check=True, env={**os.environ, **PINNED_KERNELS})


def gemm_floor() -> float:
    """Seconds for 3,000 float32 384 × 384 GEMMs on one thread: the host's speed, printed
    beside a benchmark's times so that runs on different hosts compare."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in range(3000):
        a @ a
    torch.set_num_threads(threads)
    return time.perf_counter() - t0
