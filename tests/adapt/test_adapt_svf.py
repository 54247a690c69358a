"""SVF wrapper: exact identity at z = 1, the W′ formula, gradients, selection, unwrap, fold."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import transformers

from shoal.adapt.svf import AdaptError, select_matrices, wrap_svf
from shoal.errors import OutputExistsError


def _logits(model: Callable[..., object], ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[attr-defined]


def _random_z(lengths: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(r, generator=g) * 2 for n, r in lengths.items()}


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", [False, True])
def test_z_one_reproduces_logits_bit_for_bit(
    which: str, attention: bool, request: pytest.FixtureRequest, input_ids: torch.Tensor
) -> None:
    model = request.getfixturevalue(which)
    ref = _logits(model, input_ids)
    svf = wrap_svf(model, attention=attention)
    assert torch.equal(_logits(svf, input_ids), ref)
    # a z away from 1 does change them (so the comparison above can fail)
    svf.set_z(_random_z(svf.lengths()))
    assert not torch.allclose(_logits(svf, input_ids), ref, atol=1e-3)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_patched_weight_is_u_sigma_z_vt(which: str, request: pytest.FixtureRequest) -> None:
    """W′ against U diag(σ ⊙ z) Vᵀ from an independent float64 numpy SVD."""
    model = request.getfixturevalue(which)
    name = select_matrices(model)[0]
    w0 = model.get_submodule(name).weight.detach().double().numpy().copy()
    svf = wrap_svf(model, [name])
    z = _random_z(svf.lengths(), seed=3)
    svf.set_z(z)
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    expected = (u * (s * z[name].double().numpy())) @ vt  # sign flips of U, V cancel
    got = model.get_submodule(name).weight.detach().double().numpy()
    np.testing.assert_allclose(got, expected, atol=2e-6)
    # z = 0 removes the whole matrix
    svf.set_z({name: torch.zeros(svf.lengths()[name])})
    assert model.get_submodule(name).weight.abs().max() < 1e-5


def test_conv1d_module_output_uses_transposed_weight(gpt2: torch.nn.Module) -> None:
    name = "transformer.h.0.mlp.c_fc"
    conv = gpt2.get_submodule(name)
    w0 = conv.weight.detach().double().numpy().copy()  # (in, out): y = x W + b
    b = conv.bias.detach().double().numpy().copy()
    svf = wrap_svf(gpt2, [name])
    z = _random_z(svf.lengths(), seed=5)
    svf.set_z(z)
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    w_new = (u * (s * z[name].double().numpy())) @ vt
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = conv(x).double().numpy()
    np.testing.assert_allclose(y, x.double().numpy() @ w_new + b, atol=1e-5)


def test_rescale_keeps_sum_of_singular_values(llama: torch.nn.Module) -> None:
    name = "model.layers.1.mlp.down_proj"
    s0 = torch.linalg.svdvals(llama.get_submodule(name).weight.detach().double())
    svf = wrap_svf(llama, [name], rescale=True)
    svf.set_z({name: torch.linspace(0.2, 1.5, svf.lengths()[name])})
    s1 = torch.linalg.svdvals(llama.get_submodule(name).weight.detach().double())
    assert float(s1.sum()) == pytest.approx(float(s0.sum()), rel=1e-5)
    assert not torch.allclose(s1, s0, atol=1e-3)


def test_gradient_reaches_z_only(llama: torch.nn.Module, input_ids: torch.Tensor) -> None:
    svf = wrap_svf(llama)
    svf.set_z(_random_z(svf.lengths()))
    out = svf(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    for pname, p in llama.named_parameters():
        assert not p.requires_grad, pname
        assert p.grad is None, pname
    zs = list(svf.parameters())
    assert len(zs) == 6
    for v in zs:
        assert v.grad is not None and float(v.grad.abs().sum()) > 0
    assert svf.num_trainable() == 6 * 32  # every MLP matrix has min(32, 64) singular values


def test_gradient_at_z_one_matches_finite_difference(gpt2: torch.nn.Module) -> None:
    # GPT-2, not Llama: Llama's RMSNorm rounds through float32 even in a float64 model
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    name = "transformer.h.0.mlp.c_fc"
    svf = wrap_svf(gpt2, [name])
    svf.to(torch.float64)

    def loss() -> torch.Tensor:  # float64 throughout (HF's own loss casts to float32)
        logits = svf(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)
        )

    loss().backward()
    grad = svf.z[name].grad
    assert grad is not None
    eps = 1e-4
    for i in (0, 7, 31):
        zp, zm = torch.ones(32, dtype=torch.float64), torch.ones(32, dtype=torch.float64)
        zp[i] += eps
        zm[i] -= eps
        with torch.no_grad():
            with svf.using_z({name: zp}):
                lp = float(loss())
            with svf.using_z({name: zm}):
                lm = float(loss())
        assert float(grad[i]) == pytest.approx((lp - lm) / (2 * eps), rel=1e-6, abs=1e-12)


def test_select_matrices_by_family(llama: torch.nn.Module) -> None:
    assert select_matrices(llama) == [
        f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")
    ]
    attn = select_matrices(llama, mlp=False, attention=True)
    assert attn == [
        f"model.layers.{i}.self_attn.{p}"
        for i in (0, 1)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    assert len(select_matrices(llama, attention=True)) == 14
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=30,
        )
    )
    assert select_matrices(bert) == [
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.output.dense",
    ]
    assert select_matrices(bert, mlp=False, attention=True) == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.attention.output.dense",
    ]  # the pooler is in no block, so never chosen


def test_set_z_and_using_z(llama: torch.nn.Module, input_ids: torch.Tensor) -> None:
    svf = wrap_svf(llama)
    base = _logits(svf, input_ids)
    z = _random_z(svf.lengths())
    with svf.using_z(z):
        changed = _logits(svf, input_ids)
    assert not torch.allclose(changed, base, atol=1e-3)
    assert torch.equal(_logits(svf, input_ids), base)  # restored to z = 1
    svf.set_z(z)
    assert torch.equal(_logits(svf, input_ids), changed)
    with svf.using_z(None):
        assert torch.equal(_logits(svf, input_ids), base)
    assert torch.equal(_logits(svf, input_ids), changed)
    with pytest.raises(AdaptError, match=r"model\.norm"):
        svf.set_z({"model.norm": torch.ones(32)})
    with pytest.raises(AdaptError, match=r"model.layers.0.mlp.up_proj.*shape \(5,\)"):
        svf.set_z({"model.layers.0.mlp.up_proj": torch.ones(5)}, strict=False)
    with pytest.raises(AdaptError, match="lacks matrix"):
        svf.set_z({"model.layers.0.mlp.up_proj": torch.ones(32)})


def test_unwrap_restores_plain_model(llama: torch.nn.Module, input_ids: torch.Tensor) -> None:
    keys = list(llama.state_dict())
    weight = llama.get_submodule("model.layers.0.mlp.up_proj").weight
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    ref = _logits(llama, input_ids)
    svf = wrap_svf(llama)
    svf.set_z(_random_z(svf.lengths()))
    plain = svf.unwrap()
    assert plain is llama
    assert list(plain.state_dict()) == keys
    module = plain.get_submodule("model.layers.0.mlp.up_proj")
    assert type(module.weight) is torch.nn.Parameter and module.weight is weight
    assert not hasattr(module, "parametrizations")
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    assert torch.equal(_logits(plain, input_ids), ref)


def test_bad_names_refused(llama: torch.nn.Module) -> None:
    with pytest.raises(AdaptError, match=r"model\.layers\.9\.mlp"):
        wrap_svf(llama, ["model.layers.9.mlp.up_proj"])
    with pytest.raises(AdaptError, match=r"'model\.norm' is a LlamaRMSNorm"):
        wrap_svf(llama, ["model.norm"])
    wrap_svf(llama, ["model.layers.0.mlp.up_proj"])
    with pytest.raises(AdaptError, match="already wrapped"):
        wrap_svf(llama, ["model.layers.0.mlp.up_proj"])


def test_cached_gives_same_outputs(llama: torch.nn.Module, input_ids: torch.Tensor) -> None:
    svf = wrap_svf(llama)
    svf.set_z(_random_z(svf.lengths()))
    plain = _logits(svf, input_ids)
    with svf.cached():
        assert torch.equal(_logits(svf, input_ids), plain)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_fold_saves_loadable_model_with_same_logits(
    which: str, request: pytest.FixtureRequest, input_ids: torch.Tensor, tmp_path: object
) -> None:
    from pathlib import Path

    out = Path(str(tmp_path)) / "folded"
    model = request.getfixturevalue(which)
    svf = wrap_svf(model, attention=True)
    z = _random_z(svf.lengths(), seed=7)
    with svf.using_z(z):
        wanted = _logits(svf, input_ids)
    svf.save_folded(out, z)  # the current z (all ones) is not what is folded
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("parametrizations" in k for k in loaded.state_dict())
    assert torch.equal(_logits(loaded, input_ids), wanted)
    # still wrapped, z untouched, after saving
    assert all(float(v.min()) == 1.0 == float(v.max()) for v in svf.get_z().values())
    assert "parametrizations" in "".join(model.state_dict())
    with pytest.raises(OutputExistsError, match="folded"):
        svf.save_folded(out, z)
    folded = svf.folded_weights(z)
    assert set(folded) == {f"{n}.weight" for n in svf.names}
    assert not list(out.parent.glob(".folded*"))
