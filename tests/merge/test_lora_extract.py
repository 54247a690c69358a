"""``extract_lora``: a PEFT adapter of model − base, checked by loading it with PEFT.

The models are tiny seeded Llama / Qwen2 / GPT-2 families built here. Reference values
come from the checkpoints themselves (read with safetensors) and from float64 SVDs
computed in the tests, never from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from merge_helpers import build_family, llama_config, state_dict
from mergekit_side import HAVE_MERGEKIT, SKIP_REASON, run_mergekit_tool

from shoal.errors import CheckpointError, MergeError, OutputExistsError, ShoalError
from shoal.merge.lora_extract import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    REPORT_FILE,
    extract_lora,
    factorize,
)

peft = pytest.importorskip("peft")

PREFIX = "base_model.model."


def _qwen2_config(**over: object) -> object:
    from transformers import Qwen2Config

    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen2Config(**{**fields, **over})


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _with_adapter(base: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(_load(base), adapter).eval()


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def _report(out: Path) -> dict:
    return json.loads((out / REPORT_FILE).read_text())


def _delta(paths: dict[str, Path], model: str, name: str) -> torch.Tensor:
    return state_dict(paths[model])[name].double() - state_dict(paths["base"])[name].double()


@pytest.fixture(scope="module")
def full_rank(llama: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter of llama a − base at a rank above every layer's (full rank)."""
    out = tmp_path_factory.mktemp("lora") / "full"
    extract_lora(llama["base"], llama["a"], out, rank=1024, progress=False)
    return out


def test_full_rank_reproduces_the_model(llama: dict[str, Path], full_rank: Path) -> None:
    """Base + adapter, merged by PEFT, is the fine-tuned model: weights and logits."""
    tuned = _load(llama["a"])
    peft_model = _with_adapter(llama["base"], full_rank)
    x = _tokens()
    with torch.no_grad():
        want = tuned(x).logits
        unmerged = peft_model(x).logits
        merged = peft_model.merge_and_unload()
        got = merged(x).logits
    assert float((unmerged - want).abs().max()) < 1e-4
    assert float((got - want).abs().max()) < 1e-4
    theirs = tuned.state_dict()
    for name, value in merged.state_dict().items():
        assert float((value - theirs[name]).abs().max()) < 1e-4, name


def test_full_rank_files_and_config(llama: dict[str, Path], full_rank: Path) -> None:
    assert {p.name for p in full_rank.iterdir()} == {
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        REPORT_FILE,
        "README.md",
    }
    cfg = json.loads((full_rank / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    # the largest layer rank is min(64, 32) = 32; k/v projections (16 × 32) have 16
    assert cfg["r"] == cfg["lora_alpha"] == 32
    assert cfg["rank_pattern"] == {
        f"model.layers.{i}.self_attn.{p}": 16 for i in (0, 1) for p in ("k_proj", "v_proj")
    }
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert cfg["base_model_name_or_path"] == str(llama["base"].resolve())
    # as mergekit: embeddings, head and norms (all changed here) saved whole
    assert set(cfg["modules_to_save"]) == {
        "model.embed_tokens",
        "lm_head",
        "model.norm",
        *(
            f"model.layers.{i}.{n}"
            for i in (0, 1)
            for n in ("input_layernorm", "post_attention_layernorm")
        ),
    }
    assert len(cfg["target_modules"]) == 14  # 7 linears × 2 layers
    tensors = state_dict(full_rank)
    a = tensors[f"{PREFIX}model.layers.0.mlp.down_proj.lora_A.weight"]
    b = tensors[f"{PREFIX}model.layers.0.mlp.down_proj.lora_B.weight"]
    assert a.shape == (32, 64) and b.shape == (32, 32)
    ref = state_dict(llama["a"])["model.norm.weight"]
    assert torch.equal(tensors[f"{PREFIX}model.norm.weight"], ref)


def test_full_rank_reported_errors_are_tiny(full_rank: Path) -> None:
    report = _report(full_rank)
    lora = [m for m in report["modules"] if m["kind"] == "lora"]
    assert len(lora) == 14
    assert max(m["relative_error"] for m in lora) < 1e-5


@pytest.mark.parametrize("distribute", [True, False])
def test_low_rank_error_is_reported_truthfully(
    llama: dict[str, Path], tmp_path: Path, distribute: bool
) -> None:
    """Rank 4: each reported error equals ‖Δ − B·A‖/‖Δ‖ computed here from the files,
    and that is the Eckart–Young optimum √(Σ_{i>4} σᵢ²/Σ σᵢ²) of a float64 SVD."""
    out = tmp_path / "r4"
    result = extract_lora(
        llama["base"], llama["a"], out, rank=4, distribute_scale=distribute, progress=False
    )
    report = {m["name"]: m for m in _report(out)["modules"]}
    assert {m.name: m.relative_error for m in result.modules} == {
        n: m["relative_error"] for n, m in report.items()
    }
    tensors = state_dict(out)
    checked = 0
    for name, entry in report.items():
        if entry["kind"] != "lora":
            continue
        assert entry["rank"] == 4
        delta = _delta(llama, "a", f"{name}.weight")
        a = tensors[f"{PREFIX}{name}.lora_A.weight"].double()
        b = tensors[f"{PREFIX}{name}.lora_B.weight"].double()
        mine = float(torch.linalg.norm(delta - b @ a) / torch.linalg.norm(delta))
        sigma = torch.linalg.svdvals(delta)
        optimum = float((sigma[4:].square().sum() / sigma.square().sum()).sqrt())
        assert entry["relative_error"] == pytest.approx(mine, rel=1e-5)
        assert mine == pytest.approx(optimum, rel=1e-4)
        assert 0.3 < mine < 1.0
        # the split of Σ: BᵀB = AAᵀ = diag(σ) (distributed), or BᵀB = I, AAᵀ = diag(σ²)
        s = sigma[:4]
        if distribute:
            assert torch.allclose(b.T @ b, torch.diag(s), atol=1e-5)
            assert torch.allclose(a @ a.T, torch.diag(s), atol=1e-5)
        else:
            assert torch.allclose(b.T @ b, torch.eye(4, dtype=torch.float64), atol=1e-5)
            assert torch.allclose(a @ a.T, torch.diag(s.square()), atol=1e-5)
        checked += 1
    assert checked == 14


def test_factorize_caps_rank_and_epsilon() -> None:
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(6, 2, generator=gen) @ torch.randn(2, 5, generator=gen)  # rank 2
    a, b = factorize(low, 50)
    assert a.shape == (5, 5) and b.shape == (6, 5)  # capped at min(6, 5)
    assert torch.allclose(b @ a, low, atol=1e-5)
    a, b = factorize(low, 50, sv_epsilon=1e-4)
    assert a.shape == (2, 5)  # the zero singular values are dropped
    assert torch.allclose(b @ a, low, atol=1e-5)


def _edited(paths: dict[str, Path], dst: Path, edits: dict[str, torch.Tensor]) -> Path:
    """A copy of the base model with some tensors replaced."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(paths["base"], dst)
    tensors = load_file(dst / "model.safetensors")
    tensors.update(edits)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_unchanged_modules_are_left_out(llama: dict[str, Path], tmp_path: Path) -> None:
    base = state_dict(llama["base"])
    gen = torch.Generator().manual_seed(5)
    q = "model.layers.1.self_attn.q_proj.weight"
    norm = "model.layers.0.input_layernorm.weight"
    tuned = _edited(
        llama,
        tmp_path / "tuned",
        {q: base[q] + 0.01 * torch.randn(32, 32, generator=gen), norm: base[norm] * 1.5},
    )
    out = tmp_path / "lora"
    result = extract_lora(llama["base"], tuned, out, rank=8, progress=False)
    assert [(m.name, m.kind) for m in result.modules] == [
        ("model.layers.0.input_layernorm", "full"),
        ("model.layers.1.self_attn.q_proj", "lora"),
    ]
    assert result.unchanged == len({k.rsplit(".", 1)[0] for k in base}) - 2
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    assert cfg["modules_to_save"] == ["model.layers.0.input_layernorm"]
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {}
    assert set(state_dict(out)) == {
        f"{PREFIX}model.layers.0.input_layernorm.weight",
        f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight",
        f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight",
    }
    # skip_undecomposable leaves the norm out; --exclude the projection
    out2 = tmp_path / "lora2"
    result = extract_lora(
        llama["base"], tuned, out2, rank=8, skip_undecomposable=True, progress=False
    )
    assert [(m.kind, m.reason) for m in result.modules] == [
        ("skipped", "--skip-undecomposable"),
        ("lora", ""),
    ]
    with pytest.raises(MergeError, match="nothing to extract"):
        extract_lora(
            llama["base"],
            tuned,
            tmp_path / "lora3",
            skip_undecomposable=True,
            exclude=[r"q_proj"],
            progress=False,
        )
    assert not (tmp_path / "lora3").exists()
    # only the norm: PEFT would refuse an adapter without a LoRA layer
    with pytest.raises(MergeError, match=r"only modules saved whole .*input_layernorm"):
        extract_lora(llama["base"], tuned, tmp_path / "lora4", exclude=[r"q_proj"], progress=False)
    assert not (tmp_path / "lora4").exists()


def test_save_module_include_and_dtype(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "lora"
    result = extract_lora(
        llama["base"],
        llama["b"],
        out,
        rank=2,
        include=[r"layers\.0\."],
        save_modules=["o_proj"],
        dtype="bfloat16",
        progress=False,
    )
    kinds = {m.name: (m.kind, m.reason) for m in result.modules}
    # embeddings are saved whatever --include says (as mergekit); layer 1 is left out
    assert kinds["model.embed_tokens"] == ("full", "embedding (no --embed-lora)")
    assert kinds["model.layers.0.self_attn.o_proj"] == ("full", "--save-module")
    assert kinds["model.layers.0.self_attn.q_proj"] == ("lora", "")
    assert kinds["model.layers.1.self_attn.q_proj"] == ("skipped", "--include/--exclude")
    assert kinds["model.norm"] == ("skipped", "--include/--exclude")
    assert {t.dtype for t in state_dict(out).values()} == {torch.bfloat16}


def test_embed_lora_untied(llama: dict[str, Path], tmp_path: Path) -> None:
    """--embed-lora: the embedding as lora_embedding_A/B of Δᵀ, the head as a linear."""
    out = tmp_path / "lora"
    result = extract_lora(
        llama["base"], llama["a"], out, rank=1024, embed_lora=True, progress=False
    )
    kinds = {m.name: m.kind for m in result.modules}
    assert kinds["model.embed_tokens"] == "lora_embedding"
    assert kinds["lm_head"] == "lora"
    tensors = state_dict(out)
    assert tensors[f"{PREFIX}model.embed_tokens.lora_embedding_A"].shape == (32, 64)
    assert tensors[f"{PREFIX}model.embed_tokens.lora_embedding_B"].shape == (32, 32)
    merged = _with_adapter(llama["base"], out).merge_and_unload()
    want = state_dict(llama["a"])
    for name, value in merged.state_dict().items():
        assert float((value - want[name]).abs().max()) < 1e-4, name


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen2 family with tied embeddings and q/k/v biases."""
    return build_family(tmp_path_factory.mktemp("qwen2"), _qwen2_config(), ("base", "a"))


@pytest.mark.parametrize("embed_lora", [False, True])
def test_tied_embeddings_and_biases(
    qwen2: dict[str, Path], tmp_path: Path, embed_lora: bool
) -> None:
    """Qwen2: changed biases put q/k/v whole; the tied head is saved with its embedding
    (also with --embed-lora: PEFT cannot both run and merge a factorised tied embedding)."""
    out = tmp_path / "lora"
    result = extract_lora(
        qwen2["base"], qwen2["a"], out, rank=1024, embed_lora=embed_lora, progress=False
    )
    kinds = {m.name: (m.kind, m.reason) for m in result.modules}
    assert kinds["model.layers.0.self_attn.q_proj"] == ("full", "bias differs")
    assert kinds["model.layers.0.self_attn.o_proj"] == ("lora", "")
    assert kinds["model.embed_tokens"][0] == "full"
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert "lm_head" in cfg["modules_to_save"]
    tensors = state_dict(out)
    assert torch.equal(
        tensors[f"{PREFIX}lm_head.weight"], tensors[f"{PREFIX}model.embed_tokens.weight"]
    )
    assert torch.equal(
        tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.bias"],
        state_dict(qwen2["a"])["model.layers.0.self_attn.q_proj.bias"],
    )
    tuned = _load(qwen2["a"])
    peft_model = _with_adapter(qwen2["base"], out)
    x = _tokens(1)
    with torch.no_grad():
        want = tuned(x).logits
        assert float((peft_model(x).logits - want).abs().max()) < 1e-4
        merged = peft_model.merge_and_unload()
        assert float((merged(x).logits - want).abs().max()) < 1e-4


# -- refusals: one error naming the key or file, nothing written -----------------------


def test_bad_rank_and_options(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    for kwargs, needle in (
        ({"rank": 0}, "--rank"),
        ({"rank": -3}, "--rank"),
        ({"sv_epsilon": -1.0}, "--sv-epsilon"),
        ({"exclude": ["("]}, "--exclude"),
        ({"dtype": "int8"}, "--dtype"),
    ):
        with pytest.raises(ShoalError, match=needle):
            extract_lora(llama["base"], llama["a"], out, progress=False, **kwargs)
    assert not out.exists()


def test_missing_models(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="nope"):
        extract_lora(tmp_path / "nope", llama["a"], out, progress=False)
    with pytest.raises(CheckpointError, match="nope"):
        extract_lora(llama["base"], tmp_path / "nope", out, progress=False)
    assert not out.exists()


def test_different_architectures(
    llama: dict[str, Path], gpt2: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="model_type") as info:
        extract_lora(gpt2["base"], llama["a"], out, progress=False)
    assert "config.json" in str(info.value)
    assert not out.exists()


def test_different_shapes_and_missing_key(llama: dict[str, Path], tmp_path: Path) -> None:
    wide = build_family(tmp_path / "wide", llama_config(intermediate_size=96), ("base",))
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\[32, 96\]"):
        extract_lora(llama["base"], wide["base"], out, progress=False)
    from safetensors.torch import load_file, save_file

    holey = tmp_path / "holey"
    shutil.copytree(llama["a"], holey)
    tensors = load_file(holey / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(holey / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*holey"):
        extract_lora(llama["base"], holey, out, progress=False)
    assert not out.exists()


def test_existing_output(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="exists"):
        extract_lora(llama["base"], llama["a"], out, progress=False)
    assert (out / "keep.txt").is_file()
    extract_lora(llama["base"], llama["a"], out, rank=2, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / ADAPTER_WEIGHTS).is_file()


# -- mergekit-extract-lora on the same models -------------------------------------------


@pytest.mark.skipif(not HAVE_MERGEKIT, reason=SKIP_REASON)
def test_same_tensors_as_mergekit(llama: dict[str, Path], tmp_path: Path) -> None:
    """Every tensor mergekit-extract-lora writes (all modules differ here), same name and
    value: the LoRA factors of the same float32 SVD, norms and embeddings whole."""
    theirs_dir = tmp_path / "mergekit"
    run_mergekit_tool(
        "mergekit-extract-lora",
        *("--model", str(llama["a"]), "--base-model", str(llama["base"])),
        *("--out-path", str(theirs_dir), "--max-rank", "8"),
    )
    ours_dir = tmp_path / "shoal"
    extract_lora(llama["base"], llama["a"], ours_dir, rank=8, progress=False)
    ours, theirs = state_dict(ours_dir), state_dict(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        assert value.shape == theirs[name].shape, name
        assert float((value - theirs[name]).abs().max()) < 1e-5, name
    cfg_ours = json.loads((ours_dir / ADAPTER_CONFIG).read_text())
    cfg_theirs = json.loads((theirs_dir / ADAPTER_CONFIG).read_text())
    assert cfg_ours["r"] == cfg_theirs["r"] and cfg_ours["lora_alpha"] == cfg_theirs["lora_alpha"]


def test_output_holding_an_input_is_refused(llama: dict[str, Path], tmp_path: Path) -> None:
    """--overwrite would delete the model being read: refused before anything is read."""
    model = tmp_path / "tuned"
    shutil.copytree(llama["a"], model)
    for out in (model, tmp_path):
        with pytest.raises(OutputExistsError, match="holds the input"):
            extract_lora(llama["base"], model, out, overwrite=True, progress=False)
    assert (model / "model.safetensors").is_file()
