"""mergekit in the side venv of ``make mergekit-venv``: run it, and compare its tensors.

Imported by name by the cross-check tests, which are skipped when the side venv is
absent (as in CI). Nothing here imports mergekit: it runs as a separate program.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MERGEKIT_YAML = Path(
    os.environ.get("MERGEKIT_YAML", ROOT / ".bench" / "mergekit-venv" / "bin" / "mergekit-yaml")
)
MERGEKIT_PYTHON = MERGEKIT_YAML.parent / "python"
HAVE_MERGEKIT = MERGEKIT_YAML.is_file()
SKIP_REASON = "no mergekit side venv (make mergekit-venv)"


def run_mergekit_tool(tool: str, *args: str) -> None:
    """Run one of the side venv's mergekit commands (``mergekit-yaml``, ``mergekit-moe``,
    ``mergekit-extract-lora``) offline; fail with its stderr's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [str(MERGEKIT_YAML.parent / tool), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def run_mergekit(recipe: Path, out: Path, *extra: str) -> Path:
    """``mergekit-yaml recipe out`` (no tokenizer copy, CPU); the output directory."""
    run_mergekit_tool(MERGEKIT_YAML.name, str(recipe), str(out), "--no-copy-tokenizer", *extra)
    return out


def run_mergekit_python(code: str, cwd: Path) -> None:
    """Run ``code`` with the side venv's Python (which can import mergekit)."""
    done = subprocess.run(
        [str(MERGEKIT_PYTHON), "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def resave_as(paths: dict[str, Path], dtype: torch.dtype) -> dict[str, Path]:
    """Store every model's tensors in ``dtype`` (a bfloat16 / float16 checkpoint: task
    vectors on the dtype's grid, so many entries tie at a magnitude cut)."""
    from safetensors.torch import load_file, save_file

    for path in paths.values():
        file = path / "model.safetensors"
        tensors = {k: v.to(dtype) for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
    return paths


def merge_both(recipe_text: str, tmp_path: Path, *mk_extra: str) -> tuple[dict, dict]:
    """Run one recipe through ``shoal.merge_to_disk`` and ``mergekit-yaml``; both outputs'
    tensors, by name."""
    from merge_helpers import state_dict

    from shoal.merge import merge_to_disk

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(recipe_text)
    ours = merge_to_disk(recipe, tmp_path / "shoal", progress=False)
    theirs = run_mergekit(recipe, tmp_path / "mergekit", *mk_extra)
    return state_dict(ours), state_dict(theirs)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their 16-bit float dtype lie between a and b.

    The bit patterns of a float16/bfloat16 are mapped to integers that count the
    representable values in order (sign-magnitude → two's complement), so 0 is equal,
    1 is one unit in the last place apart.
    """
    assert a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.view(torch.int16).to(torch.int32)
        magnitude = bits & 0x7FFF
        return torch.where(bits < 0, -magnitude, magnitude)

    return (ordered(a) - ordered(b)).abs()


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Name by name: float32 to 1e-6, float16/bfloat16 within one unit in the last place."""
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert a.shape == b.shape, name
        if a.dtype in (torch.float16, torch.bfloat16):
            worst = int(ulp_distance(a, b).max()) if a.numel() else 0
            assert worst <= 1, f"{name}: {worst} units in the last place apart"
        else:
            diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
            assert diff <= 1e-6, f"{name}: differs by {diff:g}"
