"""End to end on tiny Llama and GPT-2 checkpoints: files in, loadable checkpoint out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_helpers import state_dict

from shoal.merge import merge_into_module, merge_state_dicts, merge_to_disk
from shoal.recipe import METHODS
from shoal.recipe.params import interpolate


def _recipe(method: str, p: dict[str, Path]) -> str:
    """A small valid recipe of each method over the family ``p``."""
    a, b, base = p["a"], p["b"], p["base"]
    if method == "passthrough":
        return f"""
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [1, 2]}}]
"""
    if method == "slerp":
        return (
            f"merge_method: slerp\nbase_model: {a}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
            "parameters: {t: [0.2, 0.8]}\n"
        )
    if method == "splitpoint":
        return (
            f"merge_method: splitpoint\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
            "parameters: {split: 0.4, ratio: 0.7}\n"
        )
    if method in ("nearswap", "arcee_fusion"):  # the base and exactly one other model
        params = "parameters: {t: 0.01}\n" if method == "nearswap" else ""
        return f"merge_method: {method}\nbase_model: {base}\nmodels: [{{model: {a}}}]\n{params}"
    extra = {"linear": "", "task_arithmetic": "", "model_stock": ""}.get(method, ", density: 0.6")
    weight = "" if method == "model_stock" else "weight: 0.6"
    base_line = "" if method == "linear" else f"base_model: {base}\n"
    params = f"{{{weight}{extra}}}" if weight else "{}"
    return (
        f"merge_method: {method}\n{base_line}models:\n"
        f"  - model: {a}\n    parameters: {params}\n"
        f"  - model: {b}\n    parameters: {params}\n"
    )


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        return model(torch.arange(10).reshape(1, -1)).logits


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_a_loadable_llama(method: str, llama: dict, tmp_path: Path) -> None:
    out = merge_to_disk(_recipe(method, llama), tmp_path / "out", progress=False)
    assert torch.isfinite(_logits(out)).all()
    assert (out / "shoal_recipe.yaml").is_file()
    card = (out / "README.md").read_text()
    assert method in card and "sha256" in card
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "slerp", "passthrough"])
def test_gpt2(method: str, gpt2: dict, tmp_path: Path) -> None:
    out = merge_to_disk(_recipe(method, gpt2), tmp_path / "out", progress=False)
    assert torch.isfinite(_logits(out)).all()


def test_linear_is_hand_average(llama: dict, tmp_path: Path) -> None:
    text = f"""
merge_method: linear
models:
  - model: {llama["a"]}
    parameters: {{weight: 0.7}}
  - model: {llama["b"]}
    parameters: {{weight: 0.3}}
"""
    out = state_dict(merge_to_disk(text, tmp_path / "out", progress=False))
    a, b = state_dict(llama["a"]), state_dict(llama["b"])
    assert list(out) == list(a) or set(out) == set(a)
    for name in a:
        torch.testing.assert_close(out[name], 0.7 * a[name] + 0.3 * b[name])
    # weights are normalised by default (mergekit): 1.4 / 0.6 gives the same model
    text2 = text.replace("0.7", "1.4").replace("0.3", "0.6")
    out2 = state_dict(merge_to_disk(text2, tmp_path / "out2", progress=False))
    for name in a:
        torch.testing.assert_close(out2[name], out[name])


@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "slerp", "model_stock", "breadcrumbs"]
)
def test_merging_a_model_with_itself_returns_it(method: str, llama: dict, tmp_path: Path) -> None:
    a = llama["a"]
    twins = [tmp_path / "twin1", tmp_path / "twin2"]  # the same model under other names
    for twin in twins:
        twin.symlink_to(a, target_is_directory=True)
    same = {"a": a, "b": twins[0], "base": twins[1]}
    merged = merge_state_dicts(_recipe(method, same))
    ref = state_dict(a)
    for name, tensor in ref.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_gradient_and_filter_match_hand_formula(llama: dict) -> None:
    base_p, a_p = llama["base"], llama["a"]
    text = f"""
merge_method: task_arithmetic
base_model: {base_p}
models:
  - model: {a_p}
    parameters:
      weight:
        - filter: mlp
          value: [0.2, 1.0]
        - filter: self_attn
          value: 0.5
        - value: [0.0, 0.3, 0.9]
"""
    merged = merge_state_dicts(text)
    base, a = state_dict(base_p), state_dict(a_p)
    n_layers = 2
    for name in base:
        idx = next((int(p) for p in name.split(".") if p.isdigit()), None)
        t = 0.0 if idx is None else idx / (n_layers - 1)  # non-layer tensors: t = 0
        if "mlp" in name:
            w = interpolate([0.2, 1.0], t)
        elif "self_attn" in name:
            w = 0.5
        else:
            # the filter-less gradient has points at t = 0, 0.5, 1; here t is 0 or 1
            w = {0.0: 0.0, 1.0: 0.9}[t]
        expected = base[name] + w * (a[name] - base[name])
        torch.testing.assert_close(merged[name], expected, msg=lambda m, n=name: f"{n}: {m}")
    # concrete spot checks written out by hand
    torch.testing.assert_close(
        merged["model.layers.0.mlp.up_proj.weight"],
        base["model.layers.0.mlp.up_proj.weight"]
        + 0.2
        * (a["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]),
    )
    torch.testing.assert_close(
        merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"]
    )
    # the head, after the layers, is read at t = 0 too (weight 0.0): the base's
    torch.testing.assert_close(merged["lm_head.weight"], base["lm_head.weight"])


def test_gradient_on_non_layer_tensors_is_read_at_t0(llama: dict) -> None:
    """mergekit reads every tensor outside the layers at t = 0, the head and norm too."""
    a_p, b_p = llama["a"], llama["b"]
    text = f"""
merge_method: linear
dtype: float32
models:
  - model: {a_p}
    parameters: {{weight: 1.0}}
  - model: {b_p}
    parameters: {{weight: [0, 1]}}
"""
    merged = merge_state_dicts(text)
    a, b = state_dict(a_p), state_dict(b_p)
    # t = 0: weights 1 and 0, so the first model's tensors exactly
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert torch.equal(merged[name], a[name]), name
    # layers as before: layer 0 at t = 0 (weights 1, 0), layer 1 at t = 1 (1, 1 → halves)
    name0, name1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(merged[name0], a[name0])
    torch.testing.assert_close(merged[name1], (a[name1] + b[name1]) / 2)


def test_passthrough_slices_stack_layers(llama: dict, tmp_path: Path) -> None:
    out = merge_to_disk(_recipe("passthrough", llama), tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    merged, a, b = state_dict(out), state_dict(llama["a"]), state_dict(llama["b"])
    for name, tensor in a.items():
        if ".layers." not in name:
            if "embed" in name:
                torch.testing.assert_close(merged[name], tensor)  # first slice's model
            else:
                torch.testing.assert_close(merged[name], b[name])  # last slice's model
    for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        torch.testing.assert_close(
            merged[f"model.layers.0.{suffix}"], a[f"model.layers.0.{suffix}"]
        )
        torch.testing.assert_close(
            merged[f"model.layers.1.{suffix}"], a[f"model.layers.1.{suffix}"]
        )
        torch.testing.assert_close(
            merged[f"model.layers.2.{suffix}"], b[f"model.layers.1.{suffix}"]
        )
    assert _logits(out).shape == (1, 10, 64)


def test_sharded_output_and_sharded_input(llama: dict, llama_sharded: dict, tmp_path: Path) -> None:
    text = _recipe("ties", llama)
    single = merge_to_disk(text, tmp_path / "single", progress=False)
    sharded = merge_to_disk(text, tmp_path / "sharded", out_shard_size="30KB", progress=False)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state_dict(single))
    a, b = state_dict(single), state_dict(sharded)
    for name in a:
        assert torch.equal(a[name], b[name])
    torch.testing.assert_close(_logits(single), _logits(sharded))
    # the same recipe over checkpoints saved in shards gives the same tensors
    from_shards = merge_state_dicts(_recipe("ties", llama_sharded))
    for name in a:
        assert torch.equal(from_shards[name], a[name])


def test_dtype_option_and_config(llama: dict, tmp_path: Path) -> None:
    out = merge_to_disk(
        _recipe("linear", llama), tmp_path / "out", dtype="bfloat16", progress=False
    )
    tensors = state_dict(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    config = json.loads((out / "config.json").read_text())
    assert "bfloat16" in (config.get("dtype"), config.get("torch_dtype"))


def test_dare_is_deterministic_by_seed(llama: dict) -> None:
    text = _recipe("dare_ties", llama)
    one = merge_state_dicts(text, seed=0)
    two = merge_state_dicts(text, seed=0)
    other = merge_state_dicts(text, seed=1)
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert any(not torch.equal(one[n], other[n]) for n in one)


def test_in_memory_sources_and_in_place_merge(llama: dict) -> None:
    from transformers import AutoModelForCausalLM

    text = _recipe("dare_linear", llama)
    expected = merge_state_dicts(text, seed=3)
    given = {str(llama[k]): state_dict(llama[k]) for k in ("a", "b", "base")}
    in_memory = merge_state_dicts(text, given, seed=3)
    assert all(torch.equal(expected[n], in_memory[n]) for n in expected)

    model = AutoModelForCausalLM.from_pretrained(llama["base"])
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    merge_into_module(model, text, given, seed=3)
    for name, param in model.named_parameters():
        assert param.data_ptr() == pointers[name]  # written in place
        assert torch.equal(param.detach(), expected[name])


def test_splitpoint_matches_flat_reference(llama: dict) -> None:
    import transformers

    from shoal.checkpoint import open_checkpoint
    from shoal.ops.splitpoint import splitpoint_flat

    a, b = state_dict(llama["a"]), state_dict(llama["b"])
    # the flat order is the module's (as the resident model in `shoal evolve` has it),
    # not the file's (sorted by name)
    module = transformers.AutoModelForCausalLM.from_pretrained(llama["a"])
    order = [n for n in module.state_dict() if n in a]
    with open_checkpoint(llama["a"]) as reader:
        assert reader.keys() != order and sorted(reader.keys()) == sorted(order)
    a_vec = torch.cat([a[n].reshape(-1) for n in order])
    b_vec = torch.cat([b[n].reshape(-1) for n in order])
    for angle in ("global", "segment"):
        text = _recipe("splitpoint", llama).replace("ratio: 0.7", f"ratio: 0.7, angle: {angle}")
        merged = merge_state_dicts(text)
        out_vec = torch.cat([merged[n].reshape(-1) for n in order])
        split = round(0.4 * a_vec.numel())
        ref = splitpoint_flat(a_vec, b_vec, split, 0.7, angle=angle)  # type: ignore[arg-type]
        torch.testing.assert_close(out_vec, ref, rtol=1e-5, atol=1e-6)
        # state dicts in module order, as a worker passes them, give the same model
        given = {str(llama[k]): {n: sd[n] for n in order} for k, sd in (("a", a), ("b", b))}
        from_dicts = merge_state_dicts(text, given)
        for name in order:
            assert torch.equal(from_dicts[name], merged[name]), name
    # ends: all "before" with t = 0 is A; all "after" with t = 1 is B
    only_a = merge_state_dicts(
        _recipe("splitpoint", llama).replace("split: 0.4, ratio: 0.7", "split: 1.0, ratio: 0.0")
    )
    only_b = merge_state_dicts(
        _recipe("splitpoint", llama).replace("split: 0.4, ratio: 0.7", "split: 0.0, ratio: 0.0")
    )
    for name in a:
        torch.testing.assert_close(only_a[name], a[name])
        torch.testing.assert_close(only_b[name], b[name])


def test_model_stock_filter_wise_reaches_the_operator(llama: dict) -> None:
    """mergekit's ``filter_wise`` option: one angle per row, as the operator computes it."""
    from shoal.ops import model_stock

    p = llama
    text = (
        f"merge_method: model_stock\nbase_model: {p['base']}\n"
        f"models: [{{model: {p['a']}}}, {{model: {p['b']}}}]\n"
    )
    per_row = merge_state_dicts(text + "parameters: {filter_wise: true}\n")
    whole = merge_state_dicts(text)
    base, a, b = state_dict(p["base"]), state_dict(p["a"]), state_dict(p["b"])
    name = "model.layers.0.mlp.up_proj.weight"
    expected = model_stock(base[name], [a[name], b[name]], filter_wise=True)
    torch.testing.assert_close(per_row[name], expected)
    assert not torch.allclose(per_row[name], whole[name])
