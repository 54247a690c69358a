"""``shoal adapt train|eval|export`` end to end on the toy world, in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_adapt_train import SKILLS, ToyWorld, make_toy_world

from shoal.adapt.config import load_adapt_config
from shoal.adapt.expert import load_expert, save_expert
from shoal.adapt.svf import wrap_svf
from shoal.adapt.train import build_tasks, load_wrapped, train_expert

FAST = {"steps": 3, "batch_size": 4, "eval_every": 1, "max_new_tokens": 2, "lr": 0.05}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    torch.set_num_threads(1)
    return make_toy_world(tmp_path_factory.mktemp("toy"))


def _write(world: ToyWorld, data: dict[str, Any]) -> Path:
    path = world.root / "adapt.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_train_one_skill_writes_an_expert_that_reproduces_the_trained_z(
    world: ToyWorld, shoal_cli: Any, tmp_path: Path
) -> None:
    cfg = _write(world, world.config(**FAST))
    out = tmp_path / "first"
    code, _, err = shoal_cli(
        ["adapt", "train", str(cfg), "--skill", "first", "--out", str(out), "-q"]
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["expert.safetensors", "train.json"]
    # the same training in this process, independently of the CLI
    config = load_adapt_config(cfg)
    svf, tok = load_wrapped(config)
    tasks = {s: build_tasks(config, tok, s)["first"] for s in ("train", "validation")}
    res = train_expert(svf, tok, tasks["train"], tasks["validation"], config.train, False)
    svf.reset_z()
    expert = load_expert(out / "expert.safetensors", svf)
    assert expert.skill == "first" and expert.base_fingerprint == svf.fingerprint
    for n, v in res.z.items():
        assert torch.equal(expert.z[n], v) and torch.equal(svf.get_z()[n], v)
    import json

    summary = json.loads((out / "train.json").read_text())
    assert summary["best_validation"] == res.best_score
    assert summary["base_fingerprint"] == svf.fingerprint
    assert [r["step"] for r in summary["history"]] == [r["step"] for r in res.history]


def test_train_all_skills_then_eval(world: ToyWorld, shoal_cli: Any, tmp_path: Path) -> None:
    cfg = _write(world, world.config(**FAST))
    out = tmp_path / "experts"
    code, _, err = shoal_cli(["adapt", "train", str(cfg), "--out", str(out), "-q"])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(SKILLS)
    assert (out / "last" / "expert.safetensors").is_file()
    js = tmp_path / "eval.json"
    args = ["adapt", "eval", str(cfg), "--experts", str(out), "--strategy", "oracle"]
    code, stdout, err = shoal_cli([*args, "--strategy", "base", "--json", str(js)])
    assert code == 0, err
    assert "oracle" in stdout and "base" in stdout and "mean" in stdout
    import json

    results = json.loads(js.read_text())["results"]
    assert [r["strategy"] for r in results] == ["oracle", "base"]
    assert set(results[0]["per_skill"]) == set(SKILLS)
    # a --json that is a folder or an input is refused before anything is evaluated
    for bad, needle in [(tmp_path, "is a folder"), (cfg, "would replace the input")]:
        code, _, err = shoal_cli([*args, "--json", str(bad)])
        assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert yaml.safe_load(cfg.read_text())["base"]  # the config is still the config
    code, _, err = shoal_cli([*args, "--json", str(out / "first" / "expert.safetensors")])
    assert code == 2 and "would replace the input" in err
    # an existing output is refused, in one line
    code, _, err = shoal_cli(["adapt", "train", str(cfg), "--out", str(out), "-q"])
    assert code == 2 and err.count("\n") == 1 and "exists" in err


def test_config_error_is_one_line_and_writes_nothing(
    world: ToyWorld, shoal_cli: Any, tmp_path: Path
) -> None:
    cfg = _write(world, world.config(**FAST, lrr=1))
    out = tmp_path / "x"
    code, _, err = shoal_cli(["adapt", "train", str(cfg), "--skill", "first", "--out", str(out)])
    assert code == 2
    assert err == f"error: {cfg}: train.lrr: unknown key\n"
    assert not out.exists() and list(tmp_path.iterdir()) == []
    code, _, err = shoal_cli(
        ["adapt", "train", str(_write(world, world.config())), "--skill", "nope", "--out", str(out)]
    )
    assert code == 2 and "'nope': not a skill" in err and not out.exists()


def test_export_equals_the_wrapped_model_and_loads(
    world: ToyWorld, shoal_cli: Any, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    svf = wrap_svf(world.model())
    g = torch.Generator().manual_seed(0)
    z = {n: 2 * torch.rand(r, generator=g) for n, r in svf.lengths().items()}
    expert = save_expert(
        tmp_path / "e.safetensors", z, {"base_fingerprint": svf.fingerprint, "skill": "x"}
    )
    out = tmp_path / "folded"
    code, _, err = shoal_cli(
        ["adapt", "export", str(expert), "--base", str(world.base), "--out", str(out)]
    )
    assert code == 0, err
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([world.tokenizer("Q: first 1 2 3\nA: 1")["input_ids"]] * 2)
    svf.set_z(z)
    with torch.no_grad():
        want, got = svf(input_ids=ids).logits, plain(input_ids=ids).logits
        base = world.model()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - base).abs().max() > 1e-3  # z did change the model
    assert AutoTokenizer.from_pretrained(out).get_vocab() == world.tokenizer.get_vocab()
    # an expert of another base: one line, exit 2, nothing written
    other = save_expert(tmp_path / "o.safetensors", z, {"base_fingerprint": "0" * 64, "skill": "x"})
    code, _, err = shoal_cli(
        ["adapt", "export", str(other), "--base", str(world.base), "--out", str(tmp_path / "o")]
    )
    assert code == 2 and err.count("\n") == 1 and "expert trained on base 0000" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["testbed-small.yaml", "testbed-small-supervised.yaml"])
def test_example_configs_validate(name: str) -> None:
    import shoal.executors.testbed_task  # noqa: F401  (registers type: testbed)

    example = Path(__file__).resolve().parents[2] / "examples" / "adapt" / name
    cfg = load_adapt_config(example)
    assert cfg.skills == ["chain_sum", "spell_backward", "gcd"]
    assert cfg.base.endswith(".testbed/small/base")


def test_outputs_that_overwrite_would_delete_inputs_are_refused(
    world: ToyWorld, shoal_cli: Any, tmp_path: Path
) -> None:
    """--overwrite replaces OUT: never the base, the expert, the config's folder or ``.``."""
    cfg = _write(world, world.config(**FAST))
    before = sorted(p.name for p in world.base.iterdir())
    train = ["adapt", "train", str(cfg), "--skill", "first", "-q", "--overwrite", "--out"]
    for out, needle in [
        (world.base, "holds the base model"),
        (world.root, "holds the base model"),
        (cfg.parent, "holds the base model"),
        (Path("."), "is the working directory"),
    ]:
        code, _, err = shoal_cli([*train, str(out)], tmp_path)
        assert code == 2 and err.count("\n") == 1 and needle in err, (out, err)
    svf = wrap_svf(world.model())
    z = {n: torch.ones(r) for n, r in svf.lengths().items()}
    experts = tmp_path / "experts"
    meta = {"base_fingerprint": svf.fingerprint, "skill": "x"}
    expert = save_expert(experts / "e.safetensors", z, meta)
    export = ["adapt", "export", str(expert), "--base", str(world.base), "--overwrite", "--out"]
    for out, needle in [
        (world.base, "holds the base model"),
        (experts, "holds the expert"),
        (expert, "holds the expert"),
    ]:
        code, _, err = shoal_cli([*export, str(out)], tmp_path)
        assert code == 2 and err.count("\n") == 1 and needle in err, (out, err)
    assert sorted(p.name for p in world.base.iterdir()) == before and expert.is_file()
    assert cfg.is_file()


def test_a_broken_base_is_one_line(world: ToyWorld, shoal_cli: Any, tmp_path: Path) -> None:
    """NaN weights or a truncated file: one line naming the base (and tensor), exit 2."""
    import shutil

    from safetensors.torch import load_file, save_file

    nan_base, cut_base = tmp_path / "nan", tmp_path / "cut"
    for b in (nan_base, cut_base):
        shutil.copytree(world.base, b)
    weights = sorted(nan_base.glob("*.safetensors"))[0]
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if k.endswith("mlp.up_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    cut = sorted(cut_base.glob("*.safetensors"))[0]
    cut.write_bytes(cut.read_bytes()[:200])
    for base, needle in [
        (nan_base, f"tensor {name!r} holds 1 NaN and 0 infinite"),
        (cut_base, "cannot load"),
    ]:
        data = {**world.config(**FAST), "base": str(base)}
        cfg = tmp_path / f"{base.name}.yaml"
        cfg.write_text(yaml.safe_dump(data))
        out = tmp_path / f"out-{base.name}"
        args = ["adapt", "train", str(cfg), "--skill", "first", "--out", str(out)]
        code, _, err = shoal_cli(args)
        assert code == 2 and err.count("\n") == 1 and needle in err and str(base) in err, err
        assert not out.exists()
