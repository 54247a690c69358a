"""``shoal extract-lora`` and ``shoal moe`` from the command line, bad input above all.

Every user error must end in exactly one line on stderr that names the file or key,
exit code 2, and nothing at the output path.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from cli_helpers import nothing_left, one_error_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "merge"))
from merge_helpers import build_family, gpt2_config, llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama base and two fine-tunes, a GPT-2 and a wider Llama."""
    root = tmp_path_factory.mktemp("cli_models")
    paths = build_family(root / "llama", llama_config(), ("base", "a", "b"))
    paths["gpt2"] = build_family(root / "gpt2", gpt2_config(), ("gpt2",))["gpt2"]
    paths["wide"] = build_family(root / "wide", llama_config(intermediate_size=96), ("wide",))[
        "wide"
    ]
    return paths


# -- extract-lora ------------------------------------------------------------------------


def test_extract_lora_help(shoal_cli) -> None:
    code, out, _ = shoal_cli(["extract-lora", "--help"])
    assert code == 0
    for needle in ("lora_A", "--rank", "--embed-lora", "lora_report.json", "PeftModel"):
        assert needle in out


def test_extract_lora_writes_adapter_and_table(shoal_cli, family, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "lora"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = tmp_path / f".lora.tmp-{int(dead.stdout)}"  # a killed run's, that process gone
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    args = ["extract-lora", "--base", str(family["base"]), "--model", str(family["a"])]
    code, stdout, stderr = shoal_cli([*args, "--rank", "4", str(out)])
    assert code == 0, stderr
    assert not stale.exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_report.json"} <= {
        p.name for p in out.iterdir()
    }
    report = json.loads((out / "lora_report.json").read_text())
    q = next(m for m in report["modules"] if m["name"] == "model.layers.0.self_attn.q_proj")
    assert q["kind"] == "lora" and q["rank"] == 4
    # the table row and the summary line
    row = next(line for line in stdout.splitlines() if "model.layers.0.self_attn.q_proj" in line)
    assert f"{q['relative_error']:.2e}" in row
    assert "14 LoRA modules, 7 saved whole, 0 skipped, 0 unchanged" in stdout
    # quiet: nothing on stdout; an existing output is refused, then replaced
    code, stdout, stderr = shoal_cli([*args, "-q", str(out)])
    assert code == 2
    one_error_line(stderr, str(out), "exists")
    code, stdout, _ = shoal_cli([*args, "-q", "--overwrite", str(out)])
    assert code == 0 and stdout == ""


def test_extract_lora_scale_flags(shoal_cli, family, tmp_path: Path) -> None:
    """Σ½ on each factor by default and with mergekit's --distribute-scale; all of Σ on
    lora_A with --no-distribute-scale (lora_B = U, orthonormal columns); lora_B·lora_A
    the same either way; both flags at once: one line, exit 2, nothing written."""
    import torch
    from safetensors.torch import load_file

    args = ["extract-lora", "--base", str(family["base"]), "--model", str(family["a"]), "-q"]
    factors = {}
    for name, extra in [
        ("default", []),
        ("on", ["--distribute-scale"]),
        ("off", ["--no-distribute-scale"]),
    ]:
        code, _, stderr = shoal_cli([*args, "--rank", "4", *extra, str(tmp_path / name)])
        assert code == 0, stderr
        factors[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    key = next(k for k in factors["default"] if k.endswith("q_proj.lora_A.weight"))
    a, b = (
        {n: f[key] for n, f in factors.items()},
        {n: f[key.replace("lora_A", "lora_B")] for n, f in factors.items()},
    )
    assert torch.equal(a["default"], a["on"]) and torch.equal(b["default"], b["on"])
    assert not torch.allclose(a["default"], a["off"])
    eye = torch.eye(b["off"].shape[1])
    assert torch.allclose(b["off"].T @ b["off"], eye, atol=1e-5)
    assert torch.allclose(b["default"] @ a["default"], b["off"] @ a["off"], atol=1e-5)
    both = tmp_path / "both"
    code, _, stderr = shoal_cli([*args, "--distribute-scale", "--no-distribute-scale", str(both)])
    assert code == 2
    one_error_line(stderr, "not both")
    nothing_left(both)


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("rank0", ("--rank", "0")),
        ("rank-neg", ("--rank", "-2")),
        ("no-base", ("nope",)),
        ("no-model", ("nope",)),
        ("arch", ("model_type", "config.json", "gpt2")),
        ("shape", ("model.layers.0.mlp.down_proj.weight", "[32, 96]")),
        ("missing-key", ("model.layers.1.mlp.up_proj.weight", "holey")),
        ("dtype", ("--dtype", "int8")),
        ("save-module", ("--save-module 'nonexistent'", "no module")),
    ],
)
def test_extract_lora_refusals(
    shoal_cli, family, tmp_path: Path, case: str, needles: tuple[str, ...]
) -> None:
    base, model = family["base"], family["a"]
    extra: list[str] = []
    if case == "rank0":
        extra = ["--rank", "0"]
    elif case == "rank-neg":
        extra = ["--rank", "-2"]
    elif case == "no-base":
        base = tmp_path / "nope"
    elif case == "no-model":
        model = tmp_path / "nope"
    elif case == "arch":
        base = family["gpt2"]
    elif case == "shape":
        model = family["wide"]
    elif case == "missing-key":
        from safetensors.torch import load_file, save_file

        model = tmp_path / "holey"
        shutil.copytree(family["a"], model)
        tensors = load_file(model / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    elif case == "dtype":
        extra = ["--dtype", "int8"]
    elif case == "save-module":
        extra = ["--save-module", "nonexistent"]
    out = tmp_path / "out"
    code, _, err = shoal_cli(
        ["extract-lora", "--base", str(base), "--model", str(model), *extra, str(out)]
    )
    assert code == 2
    one_error_line(err, *needles)
    nothing_left(out)


# -- moe ---------------------------------------------------------------------------------


def test_moe_help(shoal_cli) -> None:
    code, out, _ = shoal_cli(["moe", "--help"])
    assert code == 0
    for needle in ("hidden", "cheap_embed", "uniform_random", "Mixtral", "Qwen MoE", "--seed"):
        assert needle in out


def _moe_yaml(path: Path, base: Path, experts: list[Path], **over: object) -> Path:
    import yaml

    cfg = {
        "base_model": str(base),
        "gate_mode": "random",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(e), "positive_prompts": [f"p{i}"]} for i, e in enumerate(experts)
        ],
        **over,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_moe_builds(shoal_cli, family, tmp_path: Path) -> None:
    cfg = _moe_yaml(tmp_path / "moe.yaml", family["base"], [family["a"], family["b"]])
    out = tmp_path / "moe"
    code, stdout, stderr = shoal_cli(["moe", str(cfg), str(out), "--seed", "1"])
    assert code == 0, stderr
    assert "Mixtral, 2 layers" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 2
    assert (out / "shoal_moe.yaml").read_text() == cfg.read_text()
    code, _, stderr = shoal_cli(["moe", str(cfg), str(out)])
    assert code == 2
    one_error_line(stderr, str(out), "exists")
    # the folder holding the config is no output, even with --overwrite
    code, _, stderr = shoal_cli(["moe", str(cfg), str(tmp_path), "--overwrite"])
    assert code == 2
    one_error_line(stderr, str(tmp_path), "holds the config")
    assert cfg.is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize(
    "flag", ["--allow-same-experts", "--i-understand-this-is-not-useful-without-training"]
)
def test_moe_of_one_model_needs_the_flag(shoal_cli, family, tmp_path: Path, flag: str) -> None:
    """Every expert the same model: refused (one line, exit 2, nothing written), built with
    shoal's flag or with mergekit's name for it (hidden from --help: too long for the table)."""
    cfg = _moe_yaml(tmp_path / "moe.yaml", family["base"], [family["a"], family["a"]])
    out = tmp_path / "moe"
    code, _, stderr = shoal_cli(["moe", str(cfg), str(out), "-q"])
    assert code == 2
    one_error_line(stderr, "all are the same model")
    nothing_left(out)
    code, _, stderr = shoal_cli(["moe", str(cfg), str(out), "-q", flag])
    assert code == 0, stderr
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("gate_mode", ("moe.yaml", "gate_mode", "'sparse'")),
        ("top_k", ("moe.yaml", "experts_per_token", "3")),
        ("unknown_key", ("moe.yaml", "moe_layers", "unknown key")),
        ("no_file", ("nope.yaml", "not found")),
        ("bad_yaml", ("moe.yaml", "not valid YAML")),
        ("arch", ("experts[1]", "gpt2", "llama")),
        ("shape", ("experts[1]", "model.layers.0.mlp.gate_proj.weight", "[96, 32]")),
        ("missing_key", ("experts[0]", "model.layers.1.mlp.up_proj.weight", "holey")),
        ("no_base", ("base_model", "nope")),
    ],
)
def test_moe_refusals(
    shoal_cli, family, tmp_path: Path, case: str, needles: tuple[str, ...]
) -> None:
    base, experts = family["base"], [family["a"], family["b"]]
    over: dict[str, object] = {}
    cfg = tmp_path / "moe.yaml"
    if case == "gate_mode":
        over["gate_mode"] = "sparse"
    elif case == "top_k":
        over["experts_per_token"] = 3
    elif case == "unknown_key":
        over["moe_layers"] = [0]
    elif case == "arch":
        experts[1] = family["gpt2"]
    elif case == "shape":
        experts[1] = family["wide"]
    elif case == "missing_key":
        from safetensors.torch import load_file, save_file

        holey = tmp_path / "holey"
        shutil.copytree(family["a"], holey)
        tensors = load_file(holey / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, str(holey / "model.safetensors"), metadata={"format": "pt"})
        experts[0] = holey
    elif case == "no_base":
        base = tmp_path / "nope"
    _moe_yaml(cfg, base, experts, **over)
    if case == "no_file":
        cfg = tmp_path / "nope.yaml"
    elif case == "bad_yaml":
        cfg.write_text("base_model: [unclosed\n")
    out = tmp_path / "out"
    code, _, err = shoal_cli(["moe", str(cfg), str(out)])
    assert code == 2
    one_error_line(err, *needles)
    nothing_left(out)
