"""A recipe's ``dtype`` is the compute dtype (mergekit's meaning), ``out_dtype`` the output's.

References are written here step by step from the TIES formula, in the dtype under test;
the merge must give them bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_helpers import state_dict

from shoal.merge import merge_to_disk


def _ties_reference(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """TIES computed in ``dtype``: trim to the top max(1, int(d·n)) by magnitude (ties by
    torch's default descending sort), elect the sign of the weighted sum, average the
    agreeing weighted entries over their weights."""
    b = base.to(dtype)
    trimmed = []
    for model, w, d in zip(models, weights, densities, strict=True):
        delta = model.to(dtype) - b
        mag = delta.abs().reshape(-1).float()
        keep = torch.argsort(mag, descending=True)[: max(1, int(d * mag.numel()))]
        mask = torch.zeros(mag.numel(), dtype=dtype)
        mask[keep] = 1
        trimmed.append(delta * mask.reshape(delta.shape) * torch.tensor(w, dtype=dtype))
    stacked = torch.stack(trimmed)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(dtype)
    agree = (stacked.sign() == elected).to(dtype)
    total = (stacked * agree).sum(0)
    wcol = torch.tensor(weights, dtype=dtype).reshape(-1, *([1] * b.ndim))
    divisor = (wcol * agree).sum(0)
    divisor[divisor == 0] = 1
    return b + total / divisor


RECIPE = """
models:
  - model: {a}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {b}
    parameters: {{weight: 0.3, density: 0.6}}
merge_method: ties
base_model: {base}
dtype: bfloat16
"""


def _ties_recipe(llama: dict[str, Path], tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "ties.yaml"
    path.write_text(RECIPE.format(**llama) + extra)
    return path


def test_bf16_dtype_computes_in_bf16(llama: dict[str, Path], tmp_path: Path) -> None:
    recipe = _ties_recipe(llama, tmp_path)
    out = state_dict(merge_to_disk(recipe, tmp_path / "out", progress=False))
    src = {k: state_dict(p) for k, p in llama.items()}
    for name, tensor in out.items():
        assert tensor.dtype == torch.bfloat16
        want = _ties_reference(
            src["base"][name],
            [src["a"][name], src["b"][name]],
            [0.7, 0.3],
            [0.3, 0.6],
            torch.bfloat16,
        )
        assert torch.equal(tensor, want), name


def test_float32_compute_is_the_explicit_departure(llama: dict[str, Path], tmp_path: Path) -> None:
    recipe = _ties_recipe(llama, tmp_path)
    default = state_dict(merge_to_disk(recipe, tmp_path / "default", progress=False))
    out = merge_to_disk(recipe, tmp_path / "f32", progress=False, float32_compute=True)
    f32 = state_dict(out)
    src = {k: state_dict(p) for k, p in llama.items()}
    differ = 0
    for name, tensor in f32.items():
        assert tensor.dtype == torch.bfloat16
        want = _ties_reference(
            src["base"][name],
            [src["a"][name], src["b"][name]],
            [0.7, 0.3],
            [0.3, 0.6],
            torch.float32,
        ).to(torch.bfloat16)
        assert torch.equal(tensor, want), name
        differ += int((tensor != default[name]).sum())
    assert differ > 0  # the compute dtype moves the cut and the rounding
    first = (out / "shoal_recipe.yaml").read_text().splitlines()[0]
    assert first.endswith("--float32-compute")


def test_out_dtype_is_the_output_dtype(llama: dict[str, Path], tmp_path: Path) -> None:
    """dtype: bfloat16 + out_dtype: float32: computed in bf16, written as float32."""
    recipe = _ties_recipe(llama, tmp_path, "out_dtype: float32\n")
    out = merge_to_disk(recipe, tmp_path / "out", progress=False)
    wide = state_dict(out)
    narrow = state_dict(
        merge_to_disk(_ties_recipe(llama, tmp_path), tmp_path / "bf16", progress=False)
    )
    for name, tensor in wide.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, narrow[name].float()), name
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_linear_rounds_inputs_to_the_compute_dtype(
    dtype: str, llama: dict[str, Path], tmp_path: Path
) -> None:
    """mergekit casts each input to dtype as it loads it, then averages in float32."""
    path = tmp_path / "linear.yaml"
    path.write_text(
        f"merge_method: linear\nmodels:\n  - model: {llama['a']}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {llama['b']}\n    parameters: {{weight: 0.5}}\ndtype: {dtype}\n"
    )
    out = state_dict(merge_to_disk(path, tmp_path / "out", progress=False))
    a, b = state_dict(llama["a"]), state_dict(llama["b"])
    td = getattr(torch, dtype)
    for name, tensor in out.items():
        want = (0.3 * a[name].to(td).float() + 0.5 * b[name].to(td).float()) / 0.8
        assert torch.equal(tensor, want.to(td)), name
