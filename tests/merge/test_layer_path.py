"""Layer-path models: assembly in memory, scales, generation, export and reload."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from merge_helpers import TINY_LLAMA, llama_config  # noqa: E402

from shoal.errors import MergeError, OutputExistsError, RecipeError  # noqa: E402
from shoal.merge.layer_path import (  # noqa: E402
    build_from_recipe,
    build_layer_path_model,
    export_layer_path,
    load_model,
    parse_layer_path,
)


def _seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model.eval()


def _llama(seed: int, layers: int = 3, tie: bool = False) -> torch.nn.Module:
    cfg = llama_config(
        layers, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return _seeded(transformers.LlamaForCausalLM(cfg), seed)


def _gpt2(seed: int) -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64, pad_token_id=0
    )
    return _seeded(transformers.GPT2LMHeadModel(cfg), seed)


@pytest.fixture(scope="module")
def pair() -> dict[str, torch.nn.Module]:
    return {"A": _llama(1), "B": _llama(2)}


IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 40, 11], [7, 7, 30, 2, 15, 9, 1, 60]])


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _stacked_reference(
    models: dict[str, torch.nn.Module], path: list[tuple[str, int]]
) -> torch.nn.Module:
    """Independent construction: a fresh model whose state dict is filled by renaming keys."""
    head = models["A"]
    cfg = head.config.__class__.from_dict(head.config.to_dict())
    cfg.num_hidden_layers = len(path)
    ref = head.__class__(cfg).eval()
    state = {}
    for k, v in head.state_dict().items():
        if ".layers." not in k:
            state[k] = v
    for h, (m, i) in enumerate(path):
        prefix = f"model.layers.{i}."
        for k, v in models[m].state_dict().items():
            if k.startswith(prefix):
                state[f"model.layers.{h}." + k[len(prefix) :]] = v
    ref.load_state_dict(state)
    return ref


def test_identity_path_reproduces_model(pair: dict[str, torch.nn.Module]) -> None:
    model = build_layer_path_model(pair, [("A", 0), ("A", 1), ("A", 2)])
    assert torch.equal(_logits(model), _logits(pair["A"]))


def test_mixed_path_matches_stacked_state_dict(pair: dict[str, torch.nn.Module]) -> None:
    path = [("A", 0), ("B", 1), ("B", 1), ("A", 2), ("B", 0)]
    model = build_layer_path_model(pair, path)
    assert model.config.num_hidden_layers == 5
    torch.testing.assert_close(
        _logits(model), _logits(_stacked_reference(pair, path)), rtol=0, atol=1e-6
    )


def test_layers_share_weights(pair: dict[str, torch.nn.Module]) -> None:
    model = build_layer_path_model(pair, [("A", 0), ("B", 1), ("B", 1), ("A", 2)])
    layers = model.model.layers
    q = pair["B"].model.layers[1].self_attn.q_proj.weight
    assert layers[1].self_attn.q_proj.weight is q and layers[2].self_attn.q_proj.weight is q
    assert model.model.embed_tokens.weight is pair["A"].model.embed_tokens.weight
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    # the sources keep their own numbering
    assert pair["B"].model.layers[1].self_attn.layer_idx == 1


def test_scales_multiply_the_hidden_state_entering_each_layer(
    pair: dict[str, torch.nn.Module],
) -> None:
    path = [("A", 0), ("B", 2), ("A", 1), ("A", 2)]
    scales = [1.0, 0.5, 1.7, 0.9]
    model = build_layer_path_model(pair, path, scales)
    seen_in: dict[int, torch.Tensor] = {}
    seen_out: dict[int, torch.Tensor] = {}

    def grab(h: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            seen_in[h] = x.detach().clone()
            out = output[0] if isinstance(output, tuple) else output
            seen_out[h] = out.detach().clone()

        return hook

    handles = [
        layer.register_forward_hook(grab(h), with_kwargs=True, prepend=False)
        for h, layer in enumerate(model.model.layers)
    ]
    # forward hooks see the args after pre-hooks: input of h == scale_h * output of h-1
    _logits(model)
    for handle in handles:
        handle.remove()
    for h in range(1, len(path)):
        torch.testing.assert_close(seen_in[h], scales[h] * seen_out[h - 1])
    # and the scales change the result
    assert not torch.allclose(_logits(model), _logits(build_layer_path_model(pair, path)))


def test_generation_with_repeated_layers_matches_no_cache(
    pair: dict[str, torch.nn.Module],
) -> None:
    model = build_layer_path_model(
        pair, [("A", 0), ("B", 1), ("A", 1), ("B", 1), ("A", 2)], [1, 1.1, 0.9, 1, 1]
    )
    prompt = IDS[:1, :5]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    ids = prompt
    for _ in range(6):  # greedy decoding by hand, full recompute each step
        nxt = _logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("tie", [False, True])
def test_export_reload_reproduces_logits(tmp_path, tie: bool) -> None:
    models = {"A": _llama(3, tie=tie), "B": _llama(4, tie=tie)}
    path = [("A", 0), ("B", 1), ("A", 1), ("B", 1), ("A", 2)]
    scales = [1.0, 1.25, 0.8, 1.0, 1.1]
    model = build_layer_path_model(models, path, scales)
    out = export_layer_path(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config["shoal_layer_scales"] == scales
    assert config["shoal_layer_path"] == [list(p) for p in path]
    reloaded = load_model(out)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=1e-6, atol=1e-6)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_export_unit_scales_loads_with_plain_transformers(tmp_path) -> None:
    models = {"A": _llama(5), "B": _llama(6)}
    path = [("A", 0), ("B", 2), ("A", 2)]
    export_layer_path(build_layer_path_model(models, path), tmp_path / "o")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    torch.testing.assert_close(_logits(plain), _logits(_stacked_reference(models, path)))
    with pytest.raises(OutputExistsError, match="exists"):
        export_layer_path(build_layer_path_model(models, path), tmp_path / "o")


def test_export_from_recipe_of_directories(tmp_path) -> None:
    a, b = _llama(7), _llama(8)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    ra, rb = str(tmp_path / "a"), str(tmp_path / "b")
    recipe = {
        "merge_method": "layer_path",
        "models": [{"model": ra}, {"model": rb}],
        "parameters": {"path": [[ra, 0], [rb, 1], [ra, 2]], "scales": [1.0, 0.7, 1.2]},
    }
    export_layer_path(recipe, tmp_path / "out")
    built = build_from_recipe(recipe, {ra: a, rb: b})
    torch.testing.assert_close(_logits(load_model(tmp_path / "out")), _logits(built))


def test_gpt2_path() -> None:
    models = {"A": _gpt2(1), "B": _gpt2(2)}
    ident = build_layer_path_model(models, [("A", 0), ("A", 1), ("A", 2)])
    assert torch.equal(_logits(ident), _logits(models["A"]))
    mixed = build_layer_path_model(models, [("A", 0), ("B", 1), ("B", 1), ("A", 2)])
    assert [blk.attn.layer_idx for blk in mixed.transformer.h] == [0, 1, 2, 3]
    prompt = IDS[:1, :4]
    out = mixed.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    for _ in range(4):
        ids = torch.cat([ids, _logits(mixed, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_builder_errors(pair: dict[str, torch.nn.Module]) -> None:
    with pytest.raises(MergeError, match="layer 3 of 'B'"):
        build_layer_path_model(pair, [("A", 0), ("B", 3)])
    with pytest.raises(MergeError, match="'C'"):
        build_layer_path_model(pair, [("A", 0), ("C", 0)])
    wide = _llama(9)
    wide.config.hidden_size = 48  # only the config is checked
    with pytest.raises(MergeError, match="hidden size"):
        build_layer_path_model({"A": pair["A"], "W": wide}, [("A", 0)])


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ({"merge_method": "layer_path", "models": ["A"], "parameters": {"path": []}}, "path"),
        (
            {"merge_method": "layer_path", "models": ["A"], "parameters": {"path": [["B", 0]]}},
            r"path\[0\].*'B'",
        ),
        (
            {"merge_method": "layer_path", "models": ["A"], "parameters": {"path": [["A", -1]]}},
            r"path\[0\]",
        ),
        (
            {
                "merge_method": "layer_path",
                "models": ["A"],
                "parameters": {"path": [["A", 0]], "scales": [1, 2]},
            },
            "scales",
        ),
        (
            {"merge_method": "layer_path", "models": ["A"], "parameters": {"paht": []}},
            "parameters.paht",
        ),
        ({"merge_method": "layer_path", "modls": ["A"]}, "modls"),
    ],
)
def test_recipe_errors_name_the_key(recipe: dict, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        parse_layer_path(recipe)


def test_recipe_round_trip() -> None:
    recipe = {
        "merge_method": "layer_path",
        "models": [{"model": "A"}, {"model": "B"}],
        "parameters": {"path": [["A", 0], ["B", 1]], "scales": [1.0, 0.5]},
    }
    lp = parse_layer_path(recipe)
    assert lp.path == (("A", 0), ("B", 1)) and lp.head == "A"
    assert parse_layer_path(lp.to_recipe()) == lp


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_other_llama_family_models(family: str) -> None:
    cfg_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    cfg = cfg_cls(**TINY_LLAMA, num_hidden_layers=3)
    models = {"A": _seeded(model_cls(cfg), 1), "B": _seeded(model_cls(cfg), 2)}
    ident = build_layer_path_model(models, [("A", 0), ("A", 1), ("A", 2)])
    assert torch.equal(_logits(ident), _logits(models["A"]))
    mixed = build_layer_path_model(models, [("A", 0), ("B", 1), ("A", 1), ("B", 1), ("A", 2)])
    types = getattr(mixed.config, "layer_types", None)
    assert types is None or len(types) == 5
    prompt = IDS[:1, :4]
    out = mixed.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    ids = prompt
    for _ in range(4):
        ids = torch.cat([ids, _logits(mixed, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
