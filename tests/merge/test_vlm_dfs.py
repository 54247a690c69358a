"""DFS (``layer_path``) on a LLaVA's language part, and baselines into a resident VLM.

The tiny VLM testbed (seeded, seconds) gives a ``LlavaForConditionalGeneration`` (``vlm``,
saved in the legacy layout of names) and a ``LlamaForCausalLM`` of its language model's
architecture (``expert``). Expected values come from the checkpoints on disk and from the
causal-LM layer path, which ``tests/merge/test_layer_path.py`` checks on its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shoal.errors import MergeError
from shoal.executors.build import SourceMap, build_candidate
from shoal.merge.layer_path import build_layer_path_model, export_layer_path, load_model
from shoal.merge.vlm import LAYOUTS, to_language_name, to_layout

pytestmark = pytest.mark.filterwarnings("ignore")

VISION = ("model.vision_tower.", "model.multi_modal_projector.")


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shoal.testbed.vlm import build_vlm_testbed

    return build_vlm_testbed(tmp_path_factory.mktemp("vlm") / "tb", "tiny", 0, score=False)


@pytest.fixture(scope="module")
def models(testbed: Path) -> dict[str, Any]:
    return {"vlm": load_model(testbed / "vlm"), "expert": load_model(testbed / "expert")}


def _disk(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under the module layout's names (legacy names renamed)."""
    tensors = load_file(str(path / "model.safetensors"))
    if any(n.startswith("language_model.") for n in tensors):
        return {to_layout(n, LAYOUTS["legacy"]): t for n, t in tensors.items()}
    return tensors


def _vision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in state.items() if n.startswith(VISION)}


def _inputs(testbed: Path, model: Any) -> dict[str, torch.Tensor]:
    """Two image questions: the image token repeated, then a few text tokens, and pixels."""
    n, image = int(model.config.image_seq_length), int(model.config.image_token_index)
    ids = torch.tensor([[image] * n + [5, 9, 12, 7], [image] * n + [3, 4, 8, 11]])
    pixels = torch.from_numpy(np.load(testbed / "data" / "images.npy")[:2]).float()
    return {"input_ids": ids, "pixel_values": pixels}


def _language_as_lm(vlm: Any) -> Any:
    """The VLM's language model as a ``LlamaForCausalLM`` with the same tensors (copied)."""
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(vlm.config.text_config).eval()
    layout = LAYOUTS["module"]
    state = {to_language_name(n, layout): t for n, t in vlm.state_dict().items()}
    lm.load_state_dict({n: t for n, t in state.items() if n is not None})
    return lm


# -- building a layer path ------------------------------------------------------------------


@torch.inference_mode()
def test_identity_path_over_the_vlms_layers_gives_the_vlm(testbed: Path, models) -> None:
    vlm = models["vlm"]
    built = build_layer_path_model(models, [("vlm", 0), ("vlm", 1)])
    assert type(built).__name__ == "LlavaForConditionalGeneration"
    ours, theirs = built.state_dict(), vlm.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    x = _inputs(testbed, vlm)
    assert torch.equal(built(**x).logits, vlm(**x).logits)


@torch.inference_mode()
def test_language_path_matches_the_causal_lm_path(testbed: Path, models) -> None:
    """On text, a path over the VLM's and the expert's layers computes what the same path
    over two causal LMs (the VLM's language part copied into a Llama) computes."""
    path = [("vlm", 0), ("expert", 1), ("expert", 0), ("vlm", 1)]
    scales = [1.0, 0.9, 1.2, 1.1]
    built = build_layer_path_model(models, path, scales)
    lms = {"vlm": _language_as_lm(models["vlm"]), "expert": models["expert"]}
    reference = build_layer_path_model(lms, path, scales)
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    assert torch.equal(built(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert built.config.text_config.num_hidden_layers == 4
    assert built.config.shoal_layer_scales == scales
    # no copies: the path's layers and the vision tower are the sources' tensors
    layers = built.model.language_model.layers
    assert layers[1].mlp.up_proj.weight is models["expert"].model.layers[1].mlp.up_proj.weight
    vision = dict(built.named_parameters())
    for name, p in models["vlm"].named_parameters():
        if name.startswith(VISION):
            assert vision[name] is p
    generated = built.generate(
        **_inputs(testbed, models["vlm"]), max_new_tokens=3, min_new_tokens=3
    )
    assert generated.shape == (2, 4 + 4 + 3)  # image tokens, text, new tokens


@torch.inference_mode()
def test_causal_lm_head_gives_the_language_part_vlm_the_vision(models) -> None:
    built = build_layer_path_model(
        models, [("expert", 0), ("vlm", 1), ("expert", 1)], head="expert"
    )
    assert type(built).__name__ == "LlavaForConditionalGeneration"
    expert, vlm = models["expert"], models["vlm"]
    assert built.model.language_model.embed_tokens.weight is expert.model.embed_tokens.weight
    assert built.lm_head.weight is expert.lm_head.weight
    assert built.model.vision_tower.embeddings.patch_embedding.weight is (
        vlm.model.vision_tower.embeddings.patch_embedding.weight
    )
    assert built.model.language_model.config is built.config.text_config
    assert built.config.text_config.num_hidden_layers == 3


def test_export_loads_as_llava_with_vision_bit_equal(testbed: Path, models, tmp_path) -> None:
    from transformers import LlavaForConditionalGeneration

    scales = [1.0, 1.3, 0.8]
    built = build_layer_path_model(models, [("vlm", 0), ("expert", 1), ("vlm", 1)], scales)
    out = export_layer_path(built, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert config["text_config"]["num_hidden_layers"] == 3
    assert config["shoal_layer_path"] == [["vlm", 0], ["expert", 1], ["vlm", 1]]
    assert (out / "tokenizer.json").is_file()

    loaded = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    vlm_disk, expert_disk = (
        _disk(testbed / "vlm"),
        load_file(str(testbed / "expert" / "model.safetensors")),
    )
    vision = _vision(vlm_disk)
    assert len(vision) > 10
    assert all(torch.equal(loaded[n], t) for n, t in vision.items())
    assert torch.equal(
        loaded["model.language_model.layers.1.self_attn.q_proj.weight"],
        expert_disk["model.layers.1.self_attn.q_proj.weight"],
    )
    assert torch.equal(
        loaded["model.language_model.layers.2.mlp.down_proj.weight"],
        vlm_disk["model.language_model.layers.1.mlp.down_proj.weight"],
    )
    reloaded = load_model(out)  # puts the scales back
    x = _inputs(testbed, models["vlm"])
    with torch.inference_mode():
        assert torch.equal(reloaded(**x).logits, built(**x).logits)


# -- baselines: a source as it is, into a resident VLM ------------------------------------


def _sources(testbed: Path, names: tuple[str, ...] = ("vlm", "expert")) -> SourceMap:
    from shoal.checkpoint import open_checkpoint

    def load(path: str) -> dict[str, torch.Tensor]:
        with open_checkpoint(path) as reader:
            return {n: reader.get(n) for n in reader}

    return SourceMap({n: str(testbed / n) for n in names}, None, load)


def test_causal_lm_baseline_becomes_the_vlms_language_part(testbed: Path) -> None:
    from transformers import AutoModelForImageTextToText

    resident = AutoModelForImageTextToText.from_pretrained(testbed / "vlm").eval()
    with torch.no_grad():  # a candidate built before: the vision tower must be put back
        for p in resident.parameters():
            p.zero_()
    build_candidate(resident, {"model": "expert"}, _sources(testbed), 0)
    state = resident.state_dict()
    expert = load_file(str(testbed / "expert" / "model.safetensors"))
    vision = _vision(_disk(testbed / "vlm"))
    assert all(torch.equal(state[n], t) for n, t in vision.items())
    language = {n: t for n, t in state.items() if not n.startswith(VISION)}
    assert len(language) == len(expert)
    for name, t in expert.items():
        vlm_name = (
            "lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name[6:]
        )
        assert torch.equal(language[vlm_name], t)

    build_candidate(resident, {"model": "vlm"}, _sources(testbed), 0)  # legacy names on disk
    vlm = _disk(testbed / "vlm")
    assert all(torch.equal(resident.state_dict()[n], t) for n, t in vlm.items())


def test_causal_lm_baseline_without_a_vlm_source_is_refused(testbed: Path) -> None:
    from transformers import AutoModelForImageTextToText

    resident = AutoModelForImageTextToText.from_pretrained(testbed / "vlm").eval()
    with pytest.raises(MergeError, match=r"'expert'.*no model of the config is a VLM"):
        build_candidate(resident, {"model": "expert"}, _sources(testbed, ("expert",)), 0)


# -- run configs: the hf-vlm loader, DFS and PS + DFS runs --------------------------------


def test_hf_vlm_loader_model_resolves_against_the_config_file(
    testbed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shoal.executors.loaders import hf_model_dir
    from shoal.search.config import load_config

    folder = tmp_path / "configs"
    folder.mkdir()
    rel = os.path.relpath(testbed / "vlm", folder)
    (folder / "run.yaml").write_text(
        f"models: {{expert: {testbed / 'expert'}}}\n"
        f"loader: {{type: hf-vlm, model: {rel}}}\n"
        "tasks: {fitness: [{type: vqa, path: x.jsonl}]}\n"
        "algorithm: {name: dfs}\n"
    )
    monkeypatch.chdir(testbed)  # the path must not be read from the working directory
    config = load_config(folder / "run.yaml")
    assert config.loader.type == "hf-vlm"
    assert Path(config.loader.model or "").resolve() == (testbed / "vlm").resolve()
    # without loader.model the VLM is chosen, not the (plain LM) base model
    models = {"base": str(testbed / "base"), "vlm": str(testbed / "vlm")}
    assert hf_model_dir({"type": "hf-vlm"}, models, "base", "hf-vlm") == testbed / "vlm"


def _run_config(testbed: Path, algorithm: dict[str, Any]) -> dict[str, Any]:
    data, images = testbed / "data", str(testbed / "data" / "images.npy")

    def task(name: str) -> dict[str, Any]:
        return {"type": "vqa", "path": str(data / f"{name}.jsonl"), "images": images, "limit": 4}

    return {
        "models": {n: str(testbed / n) for n in ("base", "vlm", "expert")},
        "base_model": "base",
        "loader": {"type": "hf-vlm", "model": "vlm"},
        "tasks": {
            "fitness": [task("digits-train"), task("increment-train")],
            "test": [task("digits-test")],
        },
        **algorithm,
        "budget": {"evaluations": 4},
        "executor": {"type": "serial"},
        "progress": False,
        "seed": 0,
    }


def _check_run(run: Path, testbed: Path) -> dict[str, Any]:
    from transformers import LlavaForConditionalGeneration

    events = [json.loads(line) for log in run.rglob("events.jsonl") for line in log.open()]
    errors = [e["error"] for e in events if e.get("error")]
    assert not errors, errors[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["recipe"]["merge_method"] == "layer_path"
    best = LlavaForConditionalGeneration.from_pretrained(run / "best").state_dict()
    vision = _vision(_disk(testbed / "vlm"))
    assert all(torch.equal(best[n], t) for n, t in vision.items())
    return summary


def test_dfs_run_on_a_vlm_and_an_lm_with_baselines(testbed: Path, tmp_path: Path) -> None:
    from shoal.search.runner import evolve

    algorithm = {"name": "dfs", "models": ["vlm", "expert"], "repeats": 2, "popsize": 4}
    config = _run_config(testbed, {"algorithm": algorithm, "baselines": True})
    assert evolve(config, tmp_path / "run").status == "completed"
    summary = _check_run(tmp_path / "run", testbed)
    assert set(summary["baselines"]) == {"base", "vlm", "expert"}
    path = summary["best"]["recipe"]["parameters"]["path"]
    assert path[0] == ["vlm", 0] and path[-1] == ["vlm", 1]  # model A's pinned layers


def test_ps_then_dfs_on_a_vlm(testbed: Path, tmp_path: Path) -> None:
    from shoal.search.runner import evolve

    stages = [
        {"name": "ps", "algorithm": {"name": "ps", "models": ["vlm", "expert"], "popsize": 4}},
        {"name": "dfs", "algorithm": {"name": "dfs", "models": ["ps", "expert"], "popsize": 4}},
    ]
    config = _run_config(testbed, {"stages": stages})
    assert evolve(config, tmp_path / "run").status == "completed"
    summary = _check_run(tmp_path / "run", testbed)
    assert {m for m, _ in summary["best"]["recipe"]["parameters"]["path"]} <= {"ps", "expert"}
