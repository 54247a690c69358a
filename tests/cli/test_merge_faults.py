"""``shoal merge`` faults found by a probe round: what the writer writes is checked as the
reader checks what it reads, the stored recipe rebuilds from anywhere, one output dtype,
pickles that hold code are refused in one line, library warnings stay quiet.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import one_error_line
from safetensors.torch import load_file, save_file

NAMES = ("model.layers.0.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight")


def _model(root: Path, name: str, seed: int, dtypes: dict[str, torch.dtype] | None = None) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(6, 4, generator=gen) for n in NAMES}
    for key, dtype in (dtypes or {}).items():
        tensors[key] = tensors[key].to(dtype)
    path = root / name
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = {"model_type": "llama", "num_hidden_layers": 1, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_fp16_overflow_is_refused_and_nothing_written(tmp_path: Path, shoal_cli) -> None:
    """weight 1e7 × N(0, 1) values lie far beyond float16's 65504: the cast gives inf."""
    base, a = _model(tmp_path, "base", 0), _model(tmp_path, "a", 1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\n"
        f"models:\n  - model: {a}\n    parameters: {{weight: 1.0e+7}}\n"
    )
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(recipe), str(out), "--dtype", "float16", "-q"])
    assert code == 2
    # the first tensor in plan order holds inf; the count is the entries beyond 65504
    first = load_file(str(a / "model.safetensors"))
    base_sd = load_file(str(base / "model.safetensors"))
    name = next(n for n in NAMES if f"'{n}'" in err)
    merged = base_sd[name] + 1.0e7 * (first[name] - base_sd[name])
    n_inf = int((merged.abs() > 65504).sum())
    assert n_inf > 0
    one_error_line(err, name, f"{n_inf} infinite", "float16", "--allow-nonfinite")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]

    code, _, _ = shoal_cli(
        ["merge", str(recipe), str(out), "--dtype", "float16", "-q", "--allow-nonfinite"]
    )
    assert code == 0
    assert torch.isinf(load_file(str(out / "model.safetensors"))[name]).sum() == n_inf


def test_stored_recipe_rebuilds_from_another_directory(tmp_path: Path, shoal_cli) -> None:
    work = tmp_path / "work"
    base, a = _model(work, "base", 0), _model(work, "a", 1)
    b = _model(work, "b", 2)
    recipe = work / "r.yaml"
    recipe.write_text(
        "merge_method: dare_ties\nbase_model: base\nmodels:\n"
        "  - model: a\n    parameters: {weight: 0.6, density: 0.5}\n"
        "  - model: b\n    parameters: {weight: 0.4, density: 0.5}\n"
    )
    code, _, err = shoal_cli(["merge", "r.yaml", "out", "--seed", "3", "-q"], cwd=work)
    assert code == 0, err
    stored = (work / "out" / "shoal_recipe.yaml").read_text()
    data = yaml.safe_load(stored)
    assert data["base_model"] == str(base.resolve())
    assert [m["model"] for m in data["models"]] == [str(a.resolve()), str(b.resolve())]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "shoal_recipe.yaml").write_text(stored)
    code, _, err = shoal_cli(
        ["merge", "shoal_recipe.yaml", "again", "--seed", "3", "-q"], cwd=elsewhere
    )
    assert code == 0, err
    first = load_file(str(work / "out" / "model.safetensors"))
    again = load_file(str(elsewhere / "again" / "model.safetensors"))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_mixed_reference_dtypes_give_one_output_dtype(tmp_path: Path, shoal_cli) -> None:
    """bf16 and fp32 tensors in the reference: the output is float32 throughout (it holds
    every bf16 value exactly) and config.json says float32."""
    mixed = {"model.norm.weight": torch.bfloat16, "lm_head.weight": torch.bfloat16}
    a, b = _model(tmp_path, "a", 1, mixed), _model(tmp_path, "b", 2, mixed)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1.0}}\n"
    )
    code, _, err = shoal_cli(["merge", str(recipe), str(tmp_path / "out"), "-q"])
    assert code == 0, err
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {t.dtype for t in out.values()} == {torch.float32}
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for name in NAMES:  # the mean, computed in float32 from the stored values
        assert torch.allclose(out[name], (sa[name].float() + sb[name].float()) / 2)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"


class _Payload:
    """Unpickling this would create the marker file (code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_one_line_and_never_runs(tmp_path: Path, shoal_cli) -> None:
    marker = tmp_path / "pwned"
    model = tmp_path / "evil"
    model.mkdir()
    torch.save(
        {"lm_head.weight": torch.ones(2, 2), "x": _Payload(marker)}, model / "pytorch_model.bin"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n"
    )
    code, _, err = shoal_cli(["merge", str(recipe), str(tmp_path / "out"), "-q"])
    assert code == 2
    line = one_error_line(
        err, "pytorch_model.bin", "not plain tensors", "convert it to safetensors"
    )
    assert "weights_only=False" not in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_library_warnings_only_with_verbose(tmp_path: Path, shoal_cli, monkeypatch) -> None:
    """A library's warning during a merge is hidden; ``--verbose`` shows it as one line."""
    import shoal.merge.to_disk as to_disk

    real = to_disk.build_plan

    def noisy(*args, **kwargs):
        # attributed to a library module, as torch's or transformers' warnings are
        warnings.warn_explicit("a library speaks", UserWarning, "torch/x.py", 1, module="torch.x")
        return real(*args, **kwargs)

    monkeypatch.setattr(to_disk, "build_plan", noisy)
    a = _model(tmp_path, "a", 1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
    )
    code, _, err = shoal_cli(["merge", str(recipe), str(tmp_path / "o1"), "-q"])
    assert code == 0 and "a library speaks" not in err
    code, _, err = shoal_cli(["--verbose", "merge", str(recipe), str(tmp_path / "o2"), "-q"])
    assert code == 0
    assert [line for line in err.splitlines() if line.strip()] == ["warning: a library speaks"]


@pytest.mark.parametrize("verbose", [False, True])
def test_shoal_warnings_always_show(verbose: bool, shoal_cli, monkeypatch, tmp_path: Path) -> None:
    import shoal.merge.to_disk as to_disk

    real = to_disk.build_plan

    def warns(*args, **kwargs):
        warnings.warn_explicit("key has no effect", UserWarning, "x.py", 1, module="shoal.recipe.x")
        return real(*args, **kwargs)

    monkeypatch.setattr(to_disk, "build_plan", warns)
    a = _model(tmp_path, "a", 1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
    )
    args = ["--verbose"] * verbose + ["merge", str(recipe), str(tmp_path / "o"), "-q"]
    code, _, err = shoal_cli(args)
    assert code == 0
    assert "warning: key has no effect" in err
