"""``build_moe``: Mixtral / Qwen MoE checkpoints from tiny dense models, loaded back with
transformers.

Expected gate vectors are computed here from their definitions (seeded draws, the
base model's hidden states through transformers, the embedding matrix read with
safetensors), never with the code under test.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from merge_helpers import TINY_LLAMA, build_family, gpt2_config, llama_config, state_dict
from mergekit_side import HAVE_MERGEKIT, SKIP_REASON, run_mergekit_tool
from vocab_helpers import word_tokenizer

from shoal.errors import CheckpointError, MergeError, OutputExistsError, RecipeError
from shoal.merge.moe import build_moe

WORDS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(61))]  # 64 tokens
H, LAYERS = 32, 2


def _with_tokenizer(paths: dict[str, Path]) -> dict[str, Path]:
    tok = word_tokenizer(WORDS)
    for path in paths.values():
        tok.save_pretrained(path)
    return paths


def _mistral_config() -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        **TINY_LLAMA, num_hidden_layers=LAYERS, tie_word_embeddings=False, sliding_window=16
    )


def _qwen2_config() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**TINY_LLAMA, num_hidden_layers=LAYERS, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama base and fine-tunes a, b with a word tokenizer; a Mistral and a Qwen2 base."""
    root = tmp_path_factory.mktemp("moe_models")
    paths = _with_tokenizer(build_family(root / "llama", llama_config(layers=LAYERS)))
    paths["mistral"] = build_family(root / "mistral", _mistral_config(), ("mistral",))["mistral"]
    qwen = build_family(root / "qwen2", _qwen2_config(), ("qbase", "qa"))
    return {**paths, **_with_tokenizer(qwen)}


def _load(path: Path, **kw: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(seed))


def _config(base: Path, experts: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    return {"base_model": str(base), "experts": experts, **over}


def _expert(path: Path, pos: list[str] | None = None, neg: list[str] | None = None) -> dict:
    out: dict[str, Any] = {"source_model": str(path)}
    if pos is not None:
        out["positive_prompts"] = pos
    if neg is not None:
        out["negative_prompts"] = neg
    return out


def _router(out: Path, layer: int, arch: str = "mixtral") -> torch.Tensor:
    name = "block_sparse_moe.gate" if arch == "mixtral" else "mlp.gate"
    return state_dict(out)[f"model.layers.{layer}.{name}.weight"]


# -- the MoE computes what its experts do ----------------------------------------------


@pytest.mark.parametrize(
    ("base", "mode", "n_same"),
    [("base", "hidden", 1), ("mistral", "uniform", 1), ("base", "random", 2)],
)
def test_experts_equal_to_the_base_give_the_base_logits(
    fam: dict[str, Path], tmp_path: Path, base: str, mode: str, n_same: int
) -> None:
    """One expert (or two, top-2) equal to the base: routing weights sum to one, so the
    MixtralForCausalLM computes what the dense Llama / Mistral does."""
    experts = [_expert(fam[base], [f"w{3 + i} w9"]) for i in range(n_same)]
    cfg = _config(fam[base], experts, gate_mode=mode, experts_per_token=n_same)
    out = tmp_path / "moe"
    result = build_moe(cfg, out, allow_same_experts=True, progress=False)
    assert result.architecture == "Mixtral"
    moe, dense = _load(out), _load(fam[base])
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert type(dense).__name__ == (
        "MistralForCausalLM" if base == "mistral" else "LlamaForCausalLM"
    )
    x = _tokens()
    with torch.no_grad():
        diff = float((moe(x).logits - dense(x).logits).abs().max())
    assert diff < 1e-5
    if base == "mistral":  # kept, not dropped as by mergekit
        assert moe.config.sliding_window == 16


def test_two_experts_tensors_load_and_generate(fam: dict[str, Path], tmp_path: Path) -> None:
    cfg = _config(
        fam["base"],
        [_expert(fam["a"], ["w1 w2 w3", "w4"]), _expert(fam["b"], ["w10 w11"], ["w1"])],
        gate_mode="hidden",
        experts_per_token=2,
    )
    out = tmp_path / "moe"
    build_moe(cfg, out, progress=False)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "shoal_moe.yaml"} <= files
    tensors = state_dict(out)
    base, a, b = state_dict(fam["base"]), state_dict(fam["a"]), state_dict(fam["b"])
    for layer in range(LAYERS):
        for e, src in enumerate((a, b)):
            for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                got = tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                assert torch.equal(got, src[f"model.layers.{layer}.mlp.{proj}.weight"])
    for name, value in base.items():  # everything but the MLPs is the base's
        if ".mlp." not in name:
            assert torch.equal(tensors[name], value), name
    assert not any(".mlp." in n for n in tensors)
    model = _load(out)
    prompt = _tokens()[:1, :5]
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9) and torch.equal(generated[:, :5], prompt)
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2


# -- gate modes against their definitions ----------------------------------------------


@pytest.mark.parametrize("mode", ["random", "uniform", "uniform_random"])
def test_random_gates(fam: dict[str, Path], tmp_path: Path, mode: str) -> None:
    cfg = _config(fam["base"], [_expert(fam["a"]), _expert(fam["b"]), _expert(fam["base"])])
    cfg.update(gate_mode=mode, experts_per_token=2)
    out = tmp_path / "moe"
    build_moe(cfg, out, seed=7, progress=False)
    torch.manual_seed(7)  # the global generator, as mergekit-moe --random-seed 7 draws
    if mode == "random":
        want = torch.randn(LAYERS, 3, H)
    else:
        bound = 1 / math.sqrt(H)
        want = torch.rand(LAYERS, 3, H) * 2 * bound - bound
    for layer in range(LAYERS):
        got = _router(out, layer)
        assert got.shape == (3, H)
        assert torch.equal(got, want[layer])
        if mode != "random":
            assert float(got.abs().max()) <= 1 / math.sqrt(H)
    # the seed matters
    build_moe(cfg, tmp_path / "moe2", seed=8, progress=False)
    assert not torch.equal(_router(tmp_path / "moe2", 0), _router(out, 0))


def _prompt_ids(tok: Any, prompt: str) -> torch.Tensor:
    return torch.tensor([[tok.convert_tokens_to_ids(w) for w in ["<s>", *prompt.split()]]])


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_gates(fam: dict[str, Path], tmp_path: Path, mode: str) -> None:
    """Row e of layer l's router: the base's hidden state entering layer l (last token,
    or the mean over tokens), averaged over positive prompts minus negative, unit norm."""
    experts = [
        {"pos": ["w1 w2 w3", "w4 w5"], "neg": ["w20"]},
        {"pos": ["w30 w31 w32 w33"], "neg": None},
    ]
    cfg = _config(
        fam["base"],
        [_expert(fam[n], e["pos"], e["neg"]) for n, e in zip(("a", "b"), experts, strict=True)],
        gate_mode=mode,
        experts_per_token=1,
    )
    out = tmp_path / "moe"
    build_moe(cfg, out, progress=False)
    tok = word_tokenizer(WORDS)
    dense = _load(fam["base"])

    def state(prompt: str) -> torch.Tensor:  # layers × hidden
        with torch.no_grad():
            hs = dense(_prompt_ids(tok, prompt), output_hidden_states=True).hidden_states
        per_layer = [hs[layer][0] for layer in range(LAYERS)]  # inputs of layers 0, 1
        return torch.stack([h[-1] if mode == "hidden" else h.mean(0) for h in per_layer])

    for e, spec in enumerate(experts):
        v = torch.stack([state(p) for p in spec["pos"]]).mean(0)
        if spec["neg"]:
            v = v - torch.stack([state(p) for p in spec["neg"]]).mean(0)
        v = v / v.norm(dim=-1, keepdim=True)
        for layer in range(LAYERS):
            got = _router(out, layer)[e]
            assert torch.allclose(got, v[layer], atol=1e-5), (e, layer)
            assert float(got.norm()) == pytest.approx(1.0, abs=1e-5)


def test_cheap_embed_gates(fam: dict[str, Path], tmp_path: Path) -> None:
    cfg = _config(
        fam["base"],
        [_expert(fam["a"], ["w1 w2", "w3"], ["w4"]), _expert(fam["b"], ["w40 w41"])],
        gate_mode="cheap_embed",
        experts_per_token=1,
    )
    out = tmp_path / "moe"
    build_moe(cfg, out, progress=False)
    embed = state_dict(fam["base"])["model.embed_tokens.weight"]
    ids = {w: i for i, w in enumerate(WORDS)}

    def unit_sum(prompts: list[str]) -> torch.Tensor:
        total = sum(embed[ids[w]] for p in prompts for w in ["<s>", *p.split()])
        return total / total.norm()

    want = [unit_sum(["w1 w2", "w3"]) - unit_sum(["w4"]), unit_sum(["w40 w41"])]
    for layer in range(LAYERS):  # the same vectors for every layer
        for e, v in enumerate(want):
            assert torch.allclose(_router(out, layer)[e], v / v.norm(), atol=1e-6)


# -- Qwen MoE ----------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["base", "qbase"])
def test_qwen_moe_with_shared_expert(fam: dict[str, Path], tmp_path: Path, base: str) -> None:
    """One shared expert selects Qwen MoE: its MLP is the shared expert, its gate vector
    the shared-expert gate; q/k/v biases are the base's (zeros for a Llama)."""
    expert = fam["a"] if base == "base" else fam["qa"]
    cfg = _config(
        fam[base],
        [_expert(expert), _expert(fam[base])],
        gate_mode="random",
        experts_per_token=1,
        shared_experts=[_expert(fam[base])],
    )
    out = tmp_path / "moe"
    result = build_moe(cfg, out, seed=3, progress=False)
    assert result.architecture == "Qwen MoE"
    tensors, src = state_dict(out), state_dict(fam[base])
    torch.manual_seed(3)
    want = torch.randn(LAYERS, 3, H)  # experts, then the shared expert
    for layer in range(LAYERS):
        pre = f"model.layers.{layer}"
        assert torch.equal(tensors[f"{pre}.mlp.gate.weight"], want[layer, :2])
        assert torch.equal(tensors[f"{pre}.mlp.shared_expert_gate.weight"], want[layer, 2:])
        assert torch.equal(
            tensors[f"{pre}.mlp.shared_expert.up_proj.weight"], src[f"{pre}.mlp.up_proj.weight"]
        )
        bias = tensors[f"{pre}.self_attn.k_proj.bias"]
        want_bias = src.get(f"{pre}.self_attn.k_proj.bias", torch.zeros(16))
        assert torch.equal(bias, want_bias)
    model = _load(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    generated = model.generate(_tokens()[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)


def test_architecture_selection(fam: dict[str, Path], tmp_path: Path) -> None:
    experts = [_expert(fam["a"]), _expert(fam["b"])]
    out = tmp_path / "moe"
    with pytest.raises(RecipeError, match="Qwen MoE needs exactly one shared expert"):
        build_moe(
            _config(fam["base"], experts, gate_mode="random", architecture="qwen"),
            out,
            progress=False,
        )
    with pytest.raises(RecipeError, match="architecture: 'deepseek'"):
        build_moe(
            _config(fam["base"], experts, gate_mode="random", architecture="deepseek"),
            out,
            progress=False,
        )
    with pytest.raises(RecipeError, match="Mixtral is built from llama or mistral models"):
        build_moe(
            _config(fam["qbase"], [_expert(fam["qa"]), _expert(fam["qbase"])], gate_mode="random"),
            out,
            progress=False,
        )
    assert not out.exists()


def test_dtype_noise_and_residual_scale(fam: dict[str, Path], tmp_path: Path) -> None:
    spec = {**_expert(fam["a"]), "noise_scale": 0.1}
    scaled = {**_expert(fam["b"]), "residual_scale": 0.5}
    cfg = _config(fam["base"], [spec, scaled], gate_mode="random", dtype="bfloat16")
    out = tmp_path / "moe"
    build_moe(cfg, out, progress=False)
    tensors = state_dict(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert _load(out).config.dtype == torch.bfloat16
    a, b = state_dict(fam["a"]), state_dict(fam["b"])
    pre = "model.layers.1"
    got = tensors[f"{pre}.block_sparse_moe.experts.1.w2.weight"]
    assert torch.equal(got, (b[f"{pre}.mlp.down_proj.weight"] * 0.5).to(torch.bfloat16))
    noise = (
        tensors[f"{pre}.block_sparse_moe.experts.0.w1.weight"].float()
        - a[f"{pre}.mlp.gate_proj.weight"]
    )
    assert float(noise.std()) == pytest.approx(0.1, rel=0.1)
    assert abs(float(noise.mean())) < 0.02
    build_moe(cfg, tmp_path / "again", progress=False)  # seeded: the same noise
    assert torch.equal(
        state_dict(tmp_path / "again")[f"{pre}.block_sparse_moe.experts.0.w1.weight"],
        tensors[f"{pre}.block_sparse_moe.experts.0.w1.weight"],
    )


def test_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/moe/*.yaml on a stand-in testbed (its model paths are relative)."""
    examples = sorted((Path(__file__).resolve().parents[2] / "examples" / "moe").glob("*.yaml"))
    assert examples
    names = ("base", "expert-chain_sum", "expert-spell_backward", "expert-gcd")
    root = tmp_path / "tb"
    _with_tokenizer(build_family(root / ".testbed" / "small", llama_config(layers=3), names))
    monkeypatch.chdir(root)
    for example in examples:
        out = tmp_path / example.stem
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stand-in's gate vectors may be alike
            build_moe(example, out, progress=False)
        model = _load(out)
        assert type(model).__name__ == "MixtralForCausalLM"


# -- refusals --------------------------------------------------------------------------


def _write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_refusals_name_the_key(fam: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "models"
    wide = build_family(root, llama_config(layers=LAYERS, intermediate_size=96), ("wide",))
    gpt2 = build_family(root, gpt2_config(), ("gpt2",))
    holey = root / "holey"
    shutil.copytree(fam["a"], holey)
    from safetensors.torch import load_file, save_file

    tensors = load_file(holey / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(holey / "model.safetensors"), metadata={"format": "pt"})
    no_tok = root / "no_tok"
    shutil.copytree(fam["base"], no_tok, ignore=shutil.ignore_patterns("tokenizer*"))

    good = [_expert(fam["a"], ["w1"]), _expert(fam["b"], ["w2"])]
    cases = [
        (_config(fam["base"], good, gate_mode="softmax"), RecipeError, "gate_mode: 'softmax'"),
        (_config(fam["base"], good, experts_per_token=3), RecipeError, "experts_per_token: 3"),
        (_config(fam["base"], good, experts_per_token=0), RecipeError, "experts_per_token: 0"),
        ({**_config(fam["base"], good), "moe_layers": 2}, RecipeError, "moe_layers: unknown key"),
        ({"experts": good}, RecipeError, "base_model"),
        (_config(fam["base"], good, dtype="int4"), RecipeError, "dtype: 'int4'"),
        (
            _config(fam["base"], [_expert(fam["a"], ["w1"]), _expert(fam["b"])]),
            RecipeError,
            "experts[1].positive_prompts",
        ),
        (
            _config(fam["base"], [_expert(fam["a"], ["w1"]), _expert(fam["b"], ["w1"])]),
            RecipeError,
            "same prompts",
        ),
        (
            _config(fam["base"], [_expert(fam["a"], ["w1"]), _expert(fam["a"], ["w2"])]),
            RecipeError,
            "same model",
        ),
        (_config(tmp_path / "nope", good), CheckpointError, "nope"),
        (
            _config(fam["base"], [*good, _expert(tmp_path / "gone", ["w5"])]),
            CheckpointError,
            "experts[2]",
        ),
        (_config(fam["base"], [*good, _expert(gpt2["gpt2"], ["w5"])]), MergeError, "gpt2"),
        (
            _config(fam["base"], [*good, _expert(wide["wide"], ["w5"])]),
            MergeError,
            "model.layers.0.mlp.gate_proj.weight",
        ),
        (
            _config(fam["base"], [*good, _expert(holey, ["w5"])]),
            MergeError,
            "model.layers.1.mlp.up_proj.weight",
        ),
        (_config(no_tok, good), RecipeError, "no tokenizer files"),
    ]
    out = tmp_path / "out"
    for i, (cfg, error, needle) in enumerate(cases):
        with pytest.raises(error) as info:
            build_moe(_write(tmp_path / f"c{i}.yaml", cfg), out, progress=False)
        assert needle in str(info.value), (i, str(info.value))
        if error is RecipeError:
            assert str(info.value).startswith(str(tmp_path / f"c{i}.yaml")), str(info.value)
        assert not out.exists()
    out.mkdir()
    with pytest.raises(OutputExistsError):
        build_moe(_config(fam["base"], good), out, progress=False)
    expert = tmp_path / "expert"  # --overwrite would delete a model being read
    shutil.copytree(fam["b"], expert)
    cfg = _config(fam["base"], [_expert(fam["a"], ["w1"]), _expert(expert, ["w2"])])
    with pytest.raises(OutputExistsError, match="holds the input"):
        build_moe(cfg, expert, overwrite=True, progress=False)
    assert (expert / "model.safetensors").is_file()


# -- mergekit-moe on the same models ------------------------------------------------------


def _mergekit_moe(cfg_path: Path, out: Path, seed: int) -> Path:
    run_mergekit_tool("mergekit-moe", str(cfg_path), str(out), "--random-seed", str(seed))
    return out


@pytest.mark.skipif(not HAVE_MERGEKIT, reason=SKIP_REASON)
@pytest.mark.parametrize(
    ("mode", "shared", "atol"),
    [
        ("cheap_embed", False, 0.0),
        ("random", False, 0.0),
        ("uniform_random", False, 0.0),
        ("random", True, 0.0),
        # mergekit runs the base in bfloat16 for the hidden states, shoal in float32
        ("hidden", False, 1e-2),
    ],
)
def test_same_model_as_mergekit_moe(
    fam: dict[str, Path], tmp_path: Path, mode: str, shared: bool, atol: float
) -> None:
    """Both tools on one config; the two checkpoints, loaded by transformers (mergekit
    writes Mixtral in transformers 5's fused layout, shoal in the hub layout), hold the
    same tensors: exactly, but for the bfloat16 hidden states of mergekit's gates."""
    cfg = _config(
        fam["base"],
        [_expert(fam["a"], ["w1 w2 w3", "w5"]), _expert(fam["b"], ["w7 w8"], ["w1"])],
        gate_mode=mode,
        experts_per_token=2,
    )
    if shared:
        cfg["shared_experts"] = [_expert(fam["base"], ["w9 w10"])]
    path = _write(tmp_path / "moe.yaml", cfg)
    theirs = _load(_mergekit_moe(path, tmp_path / "mergekit", seed=5)).state_dict()
    build_moe(path, tmp_path / "shoal", seed=5, progress=False)
    ours = _load(tmp_path / "shoal").state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        diff = float((value - theirs[name]).abs().max())
        limit = atol if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) else 0.0
        assert diff <= limit, (name, diff)
