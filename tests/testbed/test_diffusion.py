"""The diffusion testbed: layout, determinism, and what the experts could not have learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from shoal.errors import OutputExistsError
from shoal.testbed.diffusion import (
    NULL_CLASS,
    DiffusionSettings,
    build_diffusion_testbed,
    load_classifier,
)

QUICK = DiffusionSettings(base_steps=3, expert_steps=3, batch_size=16, classifier_steps=3)
WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_diffusion_testbed(tmp_path_factory.mktemp("d") / "tb", seed=0, settings=QUICK)


def test_layout_and_pipelines_load(testbed: Path) -> None:
    from diffusers import DiffusionPipeline

    meta = json.loads((testbed / "testbed.json").read_text())
    assert meta["models"] == ["base", "expert-0-4", "expert-5-9"]
    for name in meta["models"]:
        pipe = DiffusionPipeline.from_pretrained(str(testbed / name))
        assert type(pipe).__name__ == "DDPMPipeline"
        assert pipe.unet.config.num_class_embeds == NULL_CLASS + 1
    assert load_classifier(testbed / "classifier")(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_class_rows_an_expert_never_saw_stay_the_bases(testbed: Path) -> None:
    """Adam moves nothing whose gradient is exactly zero: the class embedding rows of the
    other group's digits (and all ten in the base, trained on the null label only)."""
    from shoal.testbed.diffusion import _make_unet

    key = "class_embedding.weight"
    init = _make_unet(0).state_dict()[key]
    base = load_file(str(testbed / "base" / WEIGHTS))[key]
    assert torch.equal(base[:NULL_CLASS], init[:NULL_CLASS])
    assert not torch.equal(base[NULL_CLASS], init[NULL_CLASS])
    low = load_file(str(testbed / "expert-0-4" / WEIGHTS))[key]
    high = load_file(str(testbed / "expert-5-9" / WEIGHTS))[key]
    assert torch.equal(low[5:NULL_CLASS], base[5:NULL_CLASS])
    assert not torch.equal(low[:5], base[:5])
    assert torch.equal(high[:5], base[:5])
    assert not torch.equal(high[5:NULL_CLASS], base[5:NULL_CLASS])


def test_same_seed_same_tensors(testbed: Path, tmp_path: Path) -> None:
    again = build_diffusion_testbed(tmp_path / "again", seed=0, settings=QUICK)
    first = json.loads((testbed / "testbed.json").read_text())["fingerprint"]
    assert json.loads((again / "testbed.json").read_text())["fingerprint"] == first
    other = build_diffusion_testbed(tmp_path / "other", seed=1, settings=QUICK)
    assert json.loads((other / "testbed.json").read_text())["fingerprint"] != first


def test_existing_output_is_refused(testbed: Path) -> None:
    before = (testbed / "testbed.json").read_bytes()
    with pytest.raises(OutputExistsError, match="exists"):
        build_diffusion_testbed(testbed, settings=QUICK)
    assert (testbed / "testbed.json").read_bytes() == before


def test_cli_refuses_an_existing_output_in_one_line(testbed: Path, shoal_cli) -> None:
    code, _, err = shoal_cli(["testbed", "build", "--kind", "diffusion", str(testbed)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(testbed) in lines[0]
