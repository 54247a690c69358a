"""``shoal merge`` on diffusers pipelines: mistakes are one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import nothing_left, one_error_line

pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, UNet2DModel


def test_merge_of_pipelines_through_the_cli(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    a, b = tiny_pipeline(tmp_path / "a", 0), tiny_pipeline(tmp_path / "b", 1)
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(linear_recipe(tmp_path, a, b)), str(out), "-q"])
    assert code == 0, err
    assert (out / "model_index.json").read_bytes() == (a / "model_index.json").read_bytes()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_unknown_component_is_one_line(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    a, b = tiny_pipeline(tmp_path / "a", 0), tiny_pipeline(tmp_path / "b", 1)
    recipe = linear_recipe(tmp_path, a, b, extra="components: [unet, text_encoder]\n")
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(recipe), str(out)])
    assert code == 2
    one_error_line(err, "components", "'text_encoder'", "scheduler, unet")
    nothing_left(out)


def test_mismatched_unet_configs_are_one_line(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    a = tiny_pipeline(tmp_path / "a", 0)
    b = tiny_pipeline(tmp_path / "b", 1, block_out_channels=[8, 8])
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(linear_recipe(tmp_path, a, b)), str(out)])
    assert code == 2
    one_error_line(err, "components.unet", str(b / "unet" / "config.json"), "block_out_channels")
    nothing_left(out)


def test_a_plain_checkpoint_among_pipelines_is_one_line(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    a = tiny_pipeline(tmp_path / "a", 0)
    plain = tiny_pipeline(tmp_path / "p", 1) / "unet"  # a model folder, not a pipeline
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(linear_recipe(tmp_path, a, plain)), str(out)])
    assert code == 2
    one_error_line(err, str(plain), "not a diffusers pipeline folder")
    nothing_left(out)


def test_components_without_pipelines_is_one_line(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    a = tiny_pipeline(tmp_path / "a", 0) / "unet"
    b = tiny_pipeline(tmp_path / "b", 1) / "unet"
    out = tmp_path / "out"
    recipe = linear_recipe(tmp_path, a, b, extra="components: [unet]\n")
    code, _, err = shoal_cli(["merge", str(recipe), str(out)])
    assert code == 2
    one_error_line(err, "components", "model_index.json")
    nothing_left(out)


def test_plain_unet_folders_merge_as_checkpoints(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    """A component folder alone (diffusion_pytorch_model.safetensors) is a checkpoint."""
    a = tiny_pipeline(tmp_path / "a", 0) / "unet"
    b = tiny_pipeline(tmp_path / "b", 1) / "unet"
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(linear_recipe(tmp_path, a, b)), str(out), "-q"])
    assert code == 0, err
    assert not (out / "model.safetensors").exists()  # diffusers' name kept
    loaded = UNet2DModel.from_pretrained(str(out), use_safetensors=True)
    assert list(loaded.config.block_out_channels) == [8, 16]


def test_export_puts_a_runs_best_unet_into_a_pipeline(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    """`shoal export RUN --pipeline PIPE`: PIPE's files, RUN/best's U-Net, loadable."""
    a, b = tiny_pipeline(tmp_path / "a", 0), tiny_pipeline(tmp_path / "b", 1)
    run = tmp_path / "run"
    run.mkdir()  # a run's best/ is a U-Net checkpoint: here, the merge of the two U-Nets
    code, _, err = shoal_cli(
        ["merge", str(linear_recipe(tmp_path, a / "unet", b / "unet")), str(run / "best"), "-q"]
    )
    assert code == 0, err
    out = tmp_path / "shipped"
    code, _, err = shoal_cli(["export", str(run), "--pipeline", str(a), "--out", str(out)])
    assert code == 0, err
    sched = "scheduler/scheduler_config.json"
    assert (out / sched).read_bytes() == (a / sched).read_bytes()
    pipe = DDPMPipeline.from_pretrained(str(out))
    best = UNet2DModel.from_pretrained(str(run / "best"))
    ua, ub = (UNet2DModel.from_pretrained(str(p / "unet")).state_dict() for p in (a, b))
    for name, got in pipe.unet.state_dict().items():
        assert torch.equal(got, best.state_dict()[name]), name
        torch.testing.assert_close(got, 0.5 * ua[name] + 0.5 * ub[name])


def test_export_without_a_best_model_is_one_line(tmp_path: Path, shoal_cli, tiny_pipeline) -> None:
    a = tiny_pipeline(tmp_path / "a", 0)
    (tmp_path / "run").mkdir()
    out = tmp_path / "shipped"
    code, _, err = shoal_cli(
        ["export", str(tmp_path / "run"), "--pipeline", str(a), "--out", str(out)]
    )
    assert code == 2
    assert "best" in one_error_line(err)
    nothing_left(out)
    code, _, err = shoal_cli(["export", str(tmp_path / "run"), "--pipeline", str(a), "--list"])
    assert code == 2 and "exactly one of" in one_error_line(err)
    # with a best/, a folder that is no pipeline is named as such
    (tmp_path / "run" / "best").mkdir()
    code, _, err = shoal_cli(
        ["export", str(tmp_path / "run"), "--pipeline", str(tmp_path / "nope"), "--out", str(out)]
    )
    assert code == 2 and "nope: not a diffusers pipeline" in one_error_line(err)
    nothing_left(out)


def test_diffusers_model_loader_in_a_run_config(tmp_path: Path, tiny_pipeline) -> None:
    """`loader: {type: diffusers-model, model: NAME}` loads the named U-Net folder (or a
    pipeline's unet), the module candidates are built into."""
    from shoal.executors.loaders import load_resident
    from shoal.search.config import load_config

    a = tiny_pipeline(tmp_path / "a", 0)
    want = UNet2DModel.from_pretrained(str(a / "unet")).state_dict()
    for ref in (a / "unet", a):
        (tmp_path / "run.yaml").write_text(
            f"models: {{a: {ref}}}\nloader: {{type: diffusers-model, model: a}}\n"
            "tasks: {fitness: [{type: python, target: 'x:y'}]}\nalgorithm: {name: ps}\n"
        )
        cfg = load_config(tmp_path / "run.yaml")
        module, tokenizer = load_resident(cfg.loader.model_dump(), cfg.models, None)
        assert tokenizer is None and isinstance(module, UNet2DModel)
        got = module.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())


def test_diffusers_loader_on_a_folder_that_is_no_diffusers_model(tmp_path: Path, shoal_cli) -> None:
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text('{"model_type": "llama"}')
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "lm" / "model.safetensors"))
    (tmp_path / "run.yaml").write_text(
        "models: {a: lm}\nloader: {type: diffusers-model, model: a}\n"
        "tasks: {fitness: [{type: python, target: 'x:y'}]}\nalgorithm: {name: ps}\n"
    )
    run = tmp_path / "r"
    code, _, err = shoal_cli(["evolve", str(tmp_path / "run.yaml"), "--run-dir", str(run)])
    assert code == 2
    assert "_class_name" in one_error_line(err)
    nothing_left(run)


def _as_bin(pipe: Path) -> Path:
    """Re-save a pipeline's U-Net as diffusers' ``diffusion_pytorch_model.bin``."""
    unet = UNet2DModel.from_pretrained(str(pipe / "unet"))
    for f in (pipe / "unet").glob("*.safetensors"):
        f.unlink()
    unet.save_pretrained(str(pipe / "unet"), safe_serialization=False)
    assert (pipe / "unet" / "diffusion_pytorch_model.bin").is_file()
    return pipe


def test_a_bin_unet_merges_under_diffusers_name(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    """A U-Net saved as .bin is read, and the merge is written where diffusers looks."""
    a = _as_bin(tiny_pipeline(tmp_path / "a", 0))
    b = tiny_pipeline(tmp_path / "b", 1)
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(linear_recipe(tmp_path, a, b)), str(out), "-q"])
    assert code == 0, err
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    merged = DDPMPipeline.from_pretrained(str(out)).unet.state_dict()
    ua = UNet2DModel.from_pretrained(str(a / "unet")).state_dict()
    ub = UNet2DModel.from_pretrained(str(b / "unet")).state_dict()
    for name, got in merged.items():
        torch.testing.assert_close(got, 0.5 * ua[name] + 0.5 * ub[name])


def test_a_nested_folder_named_like_a_component_is_copied(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    a, b = tiny_pipeline(tmp_path / "a", 0), tiny_pipeline(tmp_path / "b", 1)
    (a / "extras" / "unet").mkdir(parents=True)
    (a / "extras" / "unet" / "notes.txt").write_text("kept")
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(linear_recipe(tmp_path, a, b)), str(out), "-q"])
    assert code == 0, err
    assert (out / "extras" / "unet" / "notes.txt").read_text() == "kept"


def test_a_component_without_weights_fails_before_any_merge(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    a, b = tiny_pipeline(tmp_path / "a", 0), tiny_pipeline(tmp_path / "b", 1)
    recipe = linear_recipe(tmp_path, a, b, extra="components: [unet, scheduler]\n")
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(recipe), str(out)])
    assert code == 2
    line = one_error_line(err)
    assert "components.scheduler" in line and "no weights" in line
    nothing_left(out)


def test_export_refuses_weights_that_are_not_the_component(
    tmp_path: Path, shoal_cli, tiny_pipeline
) -> None:
    """best/ holding another model (here a U-Net of other widths) is one line, exit 2."""
    a = tiny_pipeline(tmp_path / "a", 0)
    other = tiny_pipeline(tmp_path / "o", 1, block_out_channels=[8, 8])
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    for f in (other / "unet").iterdir():
        (run / "best" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "shipped"
    code, _, err = shoal_cli(["export", str(run), "--pipeline", str(a), "--out", str(out)])
    assert code == 2
    assert "has shape" in one_error_line(err)
    nothing_left(out)


def test_export_into_its_own_pipeline_is_refused(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    a, b = tiny_pipeline(tmp_path / "a", 0), tiny_pipeline(tmp_path / "b", 1)
    run = tmp_path / "run"
    run.mkdir()
    recipe = linear_recipe(tmp_path, a / "unet", b / "unet")
    assert shoal_cli(["merge", str(recipe), str(run / "best"), "-q"])[0] == 0
    before = sorted(p.relative_to(a) for p in a.rglob("*"))
    for out, extra in ((a / "sub", []), (a, ["--overwrite"])):
        args = ["export", str(run), "--pipeline", str(a), "--out", str(out), *extra]
        code, _, err = shoal_cli(args)
        assert code == 2 and "inside the model" in one_error_line(err)
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == before


def test_export_over_a_folder_holding_its_inputs_is_refused(
    tmp_path: Path, shoal_cli, tiny_pipeline, linear_recipe
) -> None:
    """--overwrite replaces OUT once the copy is made: an OUT that holds the run's best/ or
    the pipeline would delete them."""
    work = tmp_path / "work"
    a, b = tiny_pipeline(work / "a", 0), tiny_pipeline(work / "b", 1)
    run = work / "run"
    run.mkdir()
    recipe = linear_recipe(tmp_path, a / "unet", b / "unet")
    assert shoal_cli(["merge", str(recipe), str(run / "best"), "-q"])[0] == 0
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    for out in (work, run):
        args = ["export", str(run), "--pipeline", str(a), "--out", str(out), "--overwrite"]
        code, _, err = shoal_cli(args)
        assert code == 2 and "holds the" in one_error_line(err)
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
