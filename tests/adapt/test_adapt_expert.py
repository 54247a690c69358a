"""Expert files: round trip, the base check and the transfer rule, refusals, mixing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import shoal
from shoal.adapt.expert import Expert, load_expert, mix_z, read_expert, save_expert
from shoal.adapt.svf import AdaptError, SVFModel, wrap_svf
from shoal.errors import CheckpointError, OutputExistsError, ShoalError


def _z(svf: SVFModel, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: 0.5 + torch.rand(r, generator=g) for n, r in svf.lengths().items()}


def _meta(svf: SVFModel, **extra: str) -> dict[str, str]:
    return {"base_fingerprint": svf.fingerprint, "skill": "math", **extra}


@pytest.fixture
def svf(make_llama: Callable[[int], torch.nn.Module]) -> SVFModel:
    return wrap_svf(make_llama(0))


def test_round_trip_and_apply(svf: SVFModel, tmp_path: Path, input_ids: torch.Tensor) -> None:
    z = _z(svf)
    path = save_expert(tmp_path / "math.safetensors", z, _meta(svf, note="seed 0"))
    expert = read_expert(path)
    assert list(expert.z) == svf.names
    assert all(torch.equal(expert.z[n], z[n]) for n in z)
    assert expert.base_fingerprint == svf.fingerprint and expert.skill == "math"
    assert expert.shoal_version == shoal.__version__ and expert.extra == {"note": "seed 0"}
    assert expert.lengths() == svf.lengths()
    # small: the z numbers plus a header
    assert path.stat().st_size < 4 * svf.num_trainable() + 2048
    with torch.no_grad():
        svf.set_z(z)
        wanted = svf(input_ids=input_ids).logits
        svf.reset_z()
        load_expert(path, svf, apply=False)
        assert all(float(v.min()) == 1.0 == float(v.max()) for v in svf.get_z().values())
        load_expert(path, svf)
        assert torch.equal(svf(input_ids=input_ids).logits, wanted)


def test_other_base_refused_unless_transfer(
    svf: SVFModel, tmp_path: Path, make_llama: Callable[[int], torch.nn.Module]
) -> None:
    path = save_expert(tmp_path / "e.safetensors", _z(svf), _meta(svf))
    other = wrap_svf(make_llama(1))
    assert other.fingerprint != svf.fingerprint
    with pytest.raises(AdaptError) as err:
        load_expert(path, other)
    msg = str(err.value)
    assert str(path) in msg and svf.fingerprint in msg and other.fingerprint in msg
    assert all(float(v.min()) == 1.0 == float(v.max()) for v in other.get_z().values())
    expert = load_expert(path, other, allow_transfer=True)
    assert all(torch.equal(other.get_z()[n], expert.z[n]) for n in other.names)


def test_transfer_needs_same_names_and_lengths(svf: SVFModel, tmp_path: Path) -> None:
    import transformers

    path = save_expert(tmp_path / "e.safetensors", _z(svf), _meta(svf))
    torch.manual_seed(0)
    wider = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=64,
        )
    )
    with pytest.raises(AdaptError, match=r"'model\.layers\.0\.mlp\.gate_proj' has length 32.* 48"):
        load_expert(path, wrap_svf(wider), allow_transfer=True)
    torch.manual_seed(0)
    deeper = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=64,
        )
    )
    with pytest.raises(AdaptError, match=r"lacks matrix 'model\.layers\.2\.mlp\.gate_proj'"):
        load_expert(path, wrap_svf(deeper), allow_transfer=True)


def test_unknown_and_missing_matrix(svf: SVFModel, tmp_path: Path) -> None:
    z = _z(svf)
    z["model.layers.7.mlp.up_proj"] = torch.ones(32)
    path = save_expert(tmp_path / "extra.safetensors", z, _meta(svf))
    with pytest.raises(AdaptError, match=r"'model\.layers\.7\.mlp\.up_proj'.*does not adapt"):
        load_expert(path, svf)
    z = _z(svf)
    del z["model.layers.1.mlp.down_proj"]
    path = save_expert(tmp_path / "fewer.safetensors", z, _meta(svf))
    with pytest.raises(AdaptError, match=r"lacks matrix 'model\.layers\.1\.mlp\.down_proj'"):
        load_expert(path, svf)


def test_non_finite_z(svf: SVFModel, tmp_path: Path) -> None:
    z = _z(svf)
    z["model.layers.0.mlp.down_proj"][3] = float("nan")
    target = tmp_path / "nan.safetensors"
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj' holds 1 NaN"):
        save_expert(target, z, _meta(svf))
    assert not list(tmp_path.iterdir())  # nothing written
    # a file written by other means
    path = save_expert(target, _z(svf), _meta(svf))
    good = read_expert(path)
    tensors = {f"z.{n}": v.clone() for n, v in good.z.items()}
    tensors["z.model.layers.1.mlp.up_proj"][0] = float("inf")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj' holds 0 NaN and 1"
    ):
        load_expert(path, svf)


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "not_expert", "bad_matrices"],
)
def test_corrupt_file_one_line(svf: SVFModel, tmp_path: Path, damage: str) -> None:
    path = save_expert(tmp_path / "e.safetensors", _z(svf), _meta(svf))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file at all" * 3)
    elif damage == "not_expert":
        save_file({"x": torch.ones(2)}, str(path))
    else:
        save_file(
            {"z.a": torch.ones(2)},
            str(path),
            metadata={
                "format": "shoal-svf-expert",
                "format_version": "1",
                "matrices": "[",
                "base": "x",
                "skill": "s",
            },
        )
    with pytest.raises(ShoalError) as err:
        load_expert(path, svf)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert all(float(v.min()) == 1.0 == float(v.max()) for v in svf.get_z().values())


def test_save_refusals(svf: SVFModel, tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    with pytest.raises(AdaptError, match="skill"):
        save_expert(path, _z(svf), {"base_fingerprint": svf.fingerprint})
    with pytest.raises(AdaptError, match="reserved"):
        save_expert(path, _z(svf), _meta(svf, matrices="x"))
    with pytest.raises(AdaptError, match=r"shape \(2, 16\)"):
        save_expert(path, {"m": torch.ones(2, 16)}, _meta(svf))
    assert not list(tmp_path.iterdir())
    save_expert(path, _z(svf), _meta(svf))
    with pytest.raises(OutputExistsError):
        save_expert(path, _z(svf, 1), _meta(svf))
    save_expert(path, _z(svf, 1), _meta(svf), overwrite=True)
    assert torch.equal(read_expert(path).z[svf.names[0]], _z(svf, 1)[svf.names[0]])
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


def test_mix_z_hand_example() -> None:
    z1 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    z2 = {"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([1.0])}
    e2 = Expert(z2, base_fingerprint="f", skill="code")
    mixed = mix_z([z1, e2], [0.5, 0.25])
    assert mixed["a"].tolist() == [0.5, 2.0] and mixed["b"].tolist() == [1.75]
    # per matrix: rows are experts, columns the matrices a, b
    per = mix_z([z1, z2], [[1.0, 0.0], [0.0, 1.0]], per="matrix")
    assert per["a"].tolist() == [1.0, 2.0] and per["b"].tolist() == [1.0]
    flat = mix_z([z1, z2], [0.5, 1.0, 0.25, 0.0], per="matrix")
    assert flat["a"].tolist() == [0.5, 2.0] and flat["b"].tolist() == [3.0]
    with pytest.raises(AdaptError, match=r"shape \(2,\)"):
        mix_z([z1, z2], [1.0, 0.0, 0.0])
    with pytest.raises(AdaptError, match="expert 1 has matrix 'c'"):
        mix_z([z1, {"a": z2["a"], "b": z2["b"], "c": z2["b"]}], [1.0, 1.0])
    with pytest.raises(AdaptError, match="expert 1 lacks matrix 'b'"):
        mix_z([z1, {"a": z2["a"]}], [1.0, 1.0])
    with pytest.raises(AdaptError, match=r"'a' has shape \(3,\) in expert 1"):
        mix_z([z1, {"a": torch.ones(3), "b": z2["b"]}], [1.0, 1.0])
    with pytest.raises(AdaptError, match="no experts"):
        mix_z([], [])


def test_expert_files_are_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """The header is written sorted (safetensors' own writer orders metadata per process),
    and the file gets the mode ``open`` gives (safetensors writes 0600)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, torch; from shoal.adapt.expert import save_expert; "
        "z = {'m.a': torch.arange(3.0), 'm.b': torch.ones(2)}; "
        "save_expert(sys.argv[1], z, {'base_fingerprint': 'f' * 64, 'skill': 's', "
        "'k1': 'v1', 'k2': 'v2', 'k3': 'v3'})"
    )
    paths = [tmp_path / f"e{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True)
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] == data[2]
    expert = read_expert(paths[0])
    assert expert.skill == "s" and torch.equal(expert.z["m.a"], torch.arange(3.0))
    mask = os.umask(0)
    os.umask(mask)
    assert paths[0].stat().st_mode & 0o777 == 0o666 & ~mask
