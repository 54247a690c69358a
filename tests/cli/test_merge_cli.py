"""``shoal merge`` / ``shoal inspect`` from the command line, bad input above all.

Every user error must end in exactly one line on stderr that names the file, tensor
or key, exit code 2, and no output directory.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import nothing_left, one_error_line
from safetensors.torch import load_file, save_file

NAMES = (
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
)
SHAPES = {"embed": (8, 4), "up_proj": (6, 4), "norm": (4,), "lm_head": (8, 4)}


def _shape(name: str) -> tuple[int, ...]:
    return next(s for key, s in SHAPES.items() if key in name)


def _model(root: Path, name: str, seed: int, **edits: torch.Tensor | None) -> Path:
    """A small llama-named checkpoint; ``edits`` replace (or with None drop) tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(_shape(n), generator=gen) for n in NAMES}
    for key, value in edits.items():
        full = key.replace("__", ".")
        if value is None:
            del tensors[full]
        else:
            tensors[full] = value
    path = root / name
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return path


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "models"
    root.mkdir()
    return {"base": _model(root, "base", 0), "a": _model(root, "a", 1), "b": _model(root, "b", 2)}


def _ties(m: dict[str, Path], **over: str) -> str:
    a, b, base = over.get("a", m["a"]), over.get("b", m["b"]), over.get("base", m["base"])
    return (
        f"merge_method: {over.get('method', 'ties')}\nbase_model: {base}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.5, density: {over.get('density', '0.5')}}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    )


@pytest.fixture
def cli(tmp_path: Path, shoal_cli):
    """Write a recipe and run ``shoal merge recipe out`` with extra args."""

    def _run(recipe: str, *extra: str, out: Path | None = None) -> tuple[int, str, str, Path]:
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe)
        target = out or tmp_path / "out"
        code, stdout, stderr = shoal_cli(["merge", str(path), str(target), *extra])
        return code, stdout, stderr, target

    return _run


def test_merge_succeeds(cli, models) -> None:
    code, stdout, _, out = cli(_ties(models), "--seed", "1")
    assert code == 0
    assert "wrote" in stdout
    assert set(load_file(out / "model.safetensors")) == set(NAMES)
    assert (out / "config.json").is_file() and (out / "shoal_recipe.yaml").is_file()


def test_missing_model_dir(cli, models, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "nope"
    code, _, err, out = cli(_ties(models, a=str(missing)))
    assert code == 2
    one_error_line(err, str(missing), "not found")
    nothing_left(out)


def test_missing_tensor(cli, models, tmp_path: Path) -> None:
    holey = _model(tmp_path / "models", "holey", 3, model__layers__1__mlp__up_proj__weight=None)
    code, _, err, out = cli(_ties(models, b=str(holey)))
    assert code == 2
    one_error_line(err, "model.layers.1.mlp.up_proj.weight", "holey")
    nothing_left(out)


def test_shape_mismatch(cli, models, tmp_path: Path) -> None:
    odd = _model(tmp_path / "models", "odd", 3, model__norm__weight=torch.ones(5))
    code, _, err, out = cli(_ties(models, b=str(odd)))
    assert code == 2
    one_error_line(err, "model.norm.weight", "odd", "[5]")
    nothing_left(out)


@pytest.mark.parametrize("where", ["b", "base"])
def test_integer_tensor_among_floats(cli, models, tmp_path: Path, where: str) -> None:
    """An int tensor would be merged as zeros (or ignored, if the base's); refused instead."""
    ints = torch.zeros(6, 4, dtype=torch.int64)
    odd = _model(tmp_path / "models", "ints", 3, model__layers__0__mlp__up_proj__weight=ints)
    code, _, err, out = cli(_ties(models, **{where: str(odd)}))
    assert code == 2
    one_error_line(err, "model.layers.0.mlp.up_proj.weight", "int64", "float32")
    nothing_left(out)


def test_truncated_safetensors(cli, models) -> None:
    f = models["b"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-50])
    code, _, err, out = cli(_ties(models))
    assert code == 2
    one_error_line(err, str(f))
    nothing_left(out)


def test_corrupt_header(cli, models) -> None:
    f = models["a"] / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 32)
    code, _, err, out = cli(_ties(models))
    assert code == 2
    one_error_line(err, str(f))
    nothing_left(out)


def test_nonfinite_refused_unless_allowed(cli, models, tmp_path: Path) -> None:
    bad = torch.ones(6, 4)
    bad[2, 1] = float("nan")
    nan = _model(tmp_path / "models", "nan", 3, model__layers__0__mlp__up_proj__weight=bad)
    code, _, err, out = cli(_ties(models, b=str(nan)))
    assert code == 2
    one_error_line(err, "model.layers.0.mlp.up_proj.weight", "nan", "--allow-nonfinite")
    nothing_left(out)
    code, _, _, out = cli(_ties(models, b=str(nan)), "--allow-nonfinite")
    assert code == 0 and (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        ({"method": "tiez"}, ("recipe.yaml", "merge_method", "tiez")),
        ({"density": "0.5, densty: 0.3"}, ("recipe.yaml", "models[0].parameters.densty")),
        ({"density": "lots"}, ("recipe.yaml", "models[0].parameters.density", "number")),
        ({"density": "1.5"}, ("recipe.yaml", "models[0].parameters.density", "[0, 1]")),
    ],
)
def test_bad_recipe(cli, models, edit: dict[str, str], needles: tuple[str, ...]) -> None:
    code, _, err, out = cli(_ties(models, **edit))
    assert code == 2
    one_error_line(err, *needles)
    nothing_left(out)


def test_unknown_top_level_key(cli, models) -> None:
    code, _, err, out = cli(_ties(models) + "dtpye: float16\n")
    assert code == 2
    one_error_line(err, "recipe.yaml", "dtpye")
    nothing_left(out)


def test_output_exists(cli, models, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err, _ = cli(_ties(models))
    assert code == 2
    one_error_line(err, str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    code, _, _, _ = cli(_ties(models), "--overwrite")
    assert code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_disk_full_mid_write_leaves_nothing(cli, models, monkeypatch) -> None:
    import shoal.checkpoint.writer as writer_module

    real = writer_module._tensor_bytes
    calls = {"n": 0}

    def failing(tensor: torch.Tensor) -> memoryview:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensor)

    monkeypatch.setattr(writer_module, "_tensor_bytes", failing)
    code, _, err, out = cli(_ties(models), "--out-shard-size", "200")
    assert code == 2
    one_error_line(err, str(out), "No space left on device")
    nothing_left(out)


def test_inspect(models, shoal_cli) -> None:
    code, stdout, _ = shoal_cli(["inspect", str(models["a"])])
    assert code == 0
    assert "model.layers.1.mlp.up_proj.weight" in stdout and "6×4" in stdout
    assert "7 tensors" in stdout and "layers: 2" in stdout and "float32" in stdout
    code, _, err = shoal_cli(["inspect", str(models["a"] / "nope")])
    assert code == 2
    one_error_line(err, "nope")


def _subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_help_is_fast() -> None:
    _subprocess("--help")  # warm the file cache
    start = time.perf_counter()
    done = _subprocess("--help")
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and "merge" in done.stdout
    assert elapsed < 2.0, f"shoal --help took {elapsed:.2f} s"
    version = _subprocess("--version")
    assert version.returncode == 0 and version.stdout.startswith("shoal ")


def test_real_process_exit_code(models, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_ties(models, density="2"))
    done = _subprocess("merge", str(recipe), str(tmp_path / "out"))
    assert done.returncode == 2
    one_error_line(done.stderr, "r.yaml", "density")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["merge", "r.yaml", "out", "--sed", "3"], "--sed"),
        (["merge", "r.yaml", "out", "--seed", "abc"], "--seed"),
        (["merge"], "recipe"),
        (["mrge"], "mrge"),
        (["merge", "r.yaml", "out", "--out-shard-size", "abc"], "'--out-shard-size'"),
        (["merge", "r.yaml", "out", "--dtype", "float33"], "'--dtype'"),
    ],
)
def test_usage_mistakes_are_one_line(args, needle, shoal_cli) -> None:
    code, _, err = shoal_cli(args)
    assert code == 2
    one_error_line(err, needle)


@pytest.mark.parametrize("device", ["gpu", "cuda:7", "meta"])
def test_unusable_device_is_one_line(cli, models, device: str) -> None:
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    code, _, err, out = cli(_ties(models), "--device", device)
    assert code == 2
    one_error_line(err, "--device", repr(device))
    nothing_left(out)


def test_overwrite_refuses_a_source_of_the_recipe(cli, models) -> None:
    before = (models["a"] / "model.safetensors").read_bytes()
    for target in (models["a"], models["a"].parent):  # the model itself, a folder holding it
        code, _, err, _ = cli(_ties(models), "--overwrite", out=target)
        assert code == 2
        one_error_line(err, str(target), "elsewhere")
    assert (models["a"] / "model.safetensors").read_bytes() == before


def test_repeated_yaml_key_is_refused(cli, models) -> None:
    code, _, err, out = cli("merge_method: linear\n" + _ties(models))
    assert code == 2
    one_error_line(err, "recipe.yaml:", "'merge_method' given twice")
    nothing_left(out)


def test_zero_weight_sum_names_the_tensor(cli, models) -> None:
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {models['b']}\n    parameters: {{weight: -1}}\n"
    )
    code, _, err, out = cli(recipe)
    assert code == 2
    one_error_line(err, "tensor 'lm_head.weight'", "sum to zero", "normalize: false")
    nothing_left(out)


def test_leftover_of_a_killed_merge_is_removed(cli, models, tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = tmp_path / f".out.tmp-{int(dead.stdout)}"  # that process has exited
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    code, _, _, out = cli(_ties(models))
    assert code == 0 and out.is_dir()
    assert not stale.exists()


def test_sigterm_unwinds_and_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM (timeout, docker stop) mid-build: 'aborted', exit 130, no output, no temp.

    Python loses an exception its signal handler raises inside a finalizer ("Exception
    ignored in ..."), so under load one SIGTERM can go unnoticed; every SIGTERM raises
    again, and the test sends another while the build still runs.
    """
    import signal

    out = tmp_path / "tb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "testbed", "build", str(out), "--size", "small"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,  # out of the test run's process group and its signals
    )
    err = ""
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".tb.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the build has started once its temporary tree exists
        for _ in range(6):
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # 130, as a shell reports it: CPython sometimes ends an interrupted run by killing
    # itself with SIGINT (it does when a KeyboardInterrupt crossed one of its C entry
    # points), which a shell also shows as 128 + 2; the cleanup has run either way
    assert proc.returncode in (130, -signal.SIGINT), err
    assert err.strip().splitlines()[-1] == "aborted"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("recipe", "needle"),
    [
        ("merge_method: passthrough\nslices: []\n", "slices"),
        ('merge_method: linear\nmodels:\n  - model: ""\n', "models[0].model"),
        ('merge_method: linear\nbase_model: ""\nmodels:\n  - model: a\n', "base_model"),
    ],
)
def test_empty_lists_and_names_are_one_line(cli, recipe: str, needle: str) -> None:
    code, _, err, out = cli(recipe)
    assert code == 2
    one_error_line(err, "recipe.yaml", needle)
    nothing_left(out)


def test_working_directory_is_never_the_output(models, tmp_path: Path, shoal_cli) -> None:
    """``.`` or ``o/..`` as output would replace the folder the user stands in."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("precious")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_ties(models))
    for target in (".", "o/..", str(tmp_path)):
        code, _, err = shoal_cli(["merge", str(recipe), target, "--overwrite"], cwd=work)
        assert code == 2, err
        one_error_line(err, "working directory")
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]  # no stray o/ either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "recipe.yaml", "work"]


def _slerp_with_weights(m: dict[str, Path]) -> str:
    """A recipe that runs under mergekit: slerp ignores the per-model weights."""
    return (
        f"merge_method: slerp\nbase_model: {m['base']}\nparameters: {{t: 0.3}}\nmodels:\n"
        f"  - model: {m['base']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {m['a']}\n    parameters: {{weight: 0.5}}\n"
    )


def test_a_key_mergekit_ignores_is_a_warning_line(cli, models) -> None:
    code, _, err, out = cli(_slerp_with_weights(models), "-q")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [
        "warning: models[0].parameters.weight: weight has no effect for slerp "
        "(ignored, as mergekit does)",
        "warning: models[1].parameters.weight: weight has no effect for slerp "
        "(ignored, as mergekit does)",
    ]
    # the merge is the one without the weights: slerp of base and a at t = 0.3
    plain = cli(
        _slerp_with_weights(models)
        .replace("parameters: {weight: 1.0}", "parameters: {}")
        .replace("parameters: {weight: 0.5}", "parameters: {}"),
        "-q",
        out=out.parent / "plain",
    )
    assert plain[0] == 0
    got, want = (
        load_file(str(out / "model.safetensors")),
        load_file(str(out.parent / "plain" / "model.safetensors")),
    )
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_strict_refuses_a_key_without_effect(cli, models) -> None:
    code, _, err, out = cli(_slerp_with_weights(models), "--strict")
    assert code == 2
    one_error_line(err, "recipe.yaml", "models[0].parameters.weight", "no effect", "--strict")
    nothing_left(out)


def test_a_misspelt_key_stays_an_error(cli, models) -> None:
    code, _, err, out = cli(
        _ties(models).replace("density: 0.5}\n  - model", "densty: 0.5}\n  - model", 1)
    )
    assert code == 2
    one_error_line(err, "models[0].parameters.densty", "unknown parameter")
    nothing_left(out)
