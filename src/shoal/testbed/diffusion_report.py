"""``shoal testbed build --kind diffusion``: build the diffusion testbed with progress bars, then
print each U-Net's accuracy of the intended class per digit on the held-out seeds."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["build_and_report"]


def build_and_report(
    out_dir: Path, *, seed: int = 0, overwrite: bool = False, score: bool = True
) -> Path:
    """Build the testbed at ``out_dir`` and print its table; returns ``out_dir``.

    See :func:`~shoal.testbed.diffusion.build_diffusion_testbed` for what it holds.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false (before any work).
    """
    from rich.console import Console
    from rich.table import Table

    from shoal._progress import phase_bars
    from shoal.errors import OutputExistsError
    from shoal.testbed.diffusion import NULL_CLASS, TEST_SEEDS, build_diffusion_testbed

    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir}: exists (pass --overwrite to replace it)")
    with phase_bars() as on_progress:
        path = build_diffusion_testbed(
            out_dir, seed=seed, overwrite=overwrite, progress=on_progress, score=score
        )
    meta = json.loads((path / "testbed.json").read_text())
    console = Console()
    by_class = meta.get("test_accuracy_by_class")
    if by_class:
        seeds = f"seeds {TEST_SEEDS.start}–{TEST_SEEDS.stop - 1}"
        table = Table(title=f"intended class seen by the classifier (%), {seeds}, {path}")
        table.add_column("model")
        for digit in range(NULL_CLASS):
            table.add_column(str(digit), justify="right")
        table.add_column("all", justify="right")
        for model, accs in by_class.items():
            mean = 100 * sum(accs) / len(accs)
            table.add_row(model, *(f"{100 * a:.0f}" for a in accs), f"{mean:.1f}")
        console.print(table)
    console.print(
        f"testbed written to {path} in {meta['build_seconds']:.1f} s (fingerprint "
        f"{meta['fingerprint']}, classifier test accuracy {meta['classifier_test_accuracy']:.3f})"
    )
    return path
