"""The build's fingerprint and its pinned kernels (issue #20).

- two builds with one seed in one process are identical, pinned or not;
- the fingerprint is a hash of the tensors: a second implementation agrees, and
  it changes when one weight moves by one unit in the last place;
- a pinned build gives the same weights whatever kernels its parent process
  runs on, and an unpinned build on other kernels does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_determinism import MICRO

from shoal.cli.testbed_cmd import fingerprint_line
from shoal.testbed import build_testbed, report_testbed
from shoal.testbed.build import KERNEL_ENV, kernels_pinned
from shoal.testbed.fingerprint import short_fingerprint, weights_sha256

pytestmark = pytest.mark.filterwarnings("ignore")


def _meta(root: Path) -> dict:
    return json.loads((root / "testbed.json").read_text())


def _tensors(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {m: load_file(root / m / "model.safetensors") for m in _meta(root)["models"]}


def _same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for model in ta:
        assert ta[model].keys() == tb[model].keys()
        for key in ta[model]:
            assert ta[model][key].equal(tb[model][key]), f"{model}: {key} differs"


def _hash_again(root: Path) -> str:
    """A second implementation of the fingerprint, from torch tensors."""
    digest = hashlib.sha256()
    for model in sorted(_meta(root)["models"]):
        digest.update(f"model {model}\n".encode())
        tensors = load_file(root / model / "model.safetensors")
        for key in sorted(tensors):
            arr = tensors[key].contiguous().numpy()
            digest.update(f"{key} {arr.dtype.str} {tuple(arr.shape)}\n".encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("pin", [False, True])
def test_two_builds_with_one_seed_in_one_process_are_identical(tmp_path: Path, pin: bool) -> None:
    a = build_testbed(tmp_path / "a", MICRO, 3, threads=2, pin_kernels=pin)
    b = build_testbed(tmp_path / "b", MICRO, 3, threads=2, pin_kernels=pin)
    _same(a, b)
    assert _meta(a)["fingerprint"] == _meta(b)["fingerprint"]
    # pinned: trained in a child with KERNEL_ENV; unpinned: here, on this process's kernels
    assert _meta(a)["kernels"]["pinned"] is (pin or kernels_pinned())
    other = build_testbed(tmp_path / "c", MICRO, 4, threads=2, pin_kernels=pin, score=False)
    assert _meta(other)["fingerprint"]["weights"] != _meta(a)["fingerprint"]["weights"]


def test_fingerprint_is_the_tensors_hash_and_moves_with_one_weight(tmp_path: Path) -> None:
    root = build_testbed(tmp_path / "tb", MICRO, 0, threads=1, score=False)
    stored = _meta(root)["fingerprint"]
    assert (
        stored["weights_sha256"] == _hash_again(root) == weights_sha256(root, _meta(root)["models"])
    )
    assert stored["weights"] == short_fingerprint(stored["weights_sha256"])
    assert len(stored["weights"]) == 12

    path = root / "expert-gcd" / "model.safetensors"
    tensors = load_file(path)
    key = sorted(k for k in tensors if tensors[k].ndim == 2)[0]
    old = tensors[key][0, 0].item()
    tensors[key][0, 0] = float(np.nextafter(np.float32(old), np.float32(np.inf)))
    assert tensors[key][0, 0].item() != old
    save_file(tensors, str(path), metadata={"format": "pt"})
    moved = weights_sha256(root, _meta(root)["models"])
    assert moved != stored["weights_sha256"] and moved == _hash_again(root)
    assert short_fingerprint(moved) != stored["weights"]

    tensors[key][0, 0] = old
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert weights_sha256(root, _meta(root)["models"]) == stored["weights_sha256"]


_CHILD = """
import json, sys
from shoal.testbed import build_testbed
sys.path.insert(0, {tests!r})
from test_determinism import MICRO
out = build_testbed({out!r}, MICRO, 1, threads=1, score=False, pin_kernels={pin})
print(json.dumps(json.load(open(out / "testbed.json"))))
"""


def _build_under(out: Path, parent_kernels: str, pin: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_ENV}
    env["ATEN_CPU_CAPABILITY"] = parent_kernels
    code = _CHILD.format(tests=str(Path(__file__).parent), out=str(out), pin=pin)
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="pinning to AVX2 needs an x86 host with AVX2",
)
def test_pinned_build_does_not_depend_on_the_parents_kernels(tmp_path: Path) -> None:
    plain = _build_under(tmp_path / "plain", "default", pin=True)
    wide = _build_under(tmp_path / "wide", "avx512", pin=True)
    assert (
        plain["kernels"]
        == wide["kernels"]
        == {
            "aten_cpu_capability": "AVX2",
            "mkl_cbwr": "AVX2",
            "pinned": True,
        }
    )
    assert plain["fingerprint"]["weights"] == wide["fingerprint"]["weights"]
    _same(tmp_path / "plain", tmp_path / "wide")
    # without the pin, plain (non-vector) ATen kernels round otherwise: other weights
    unpinned = _build_under(tmp_path / "unpinned", "default", pin=False)
    assert unpinned["kernels"]["aten_cpu_capability"] == "DEFAULT"
    assert unpinned["fingerprint"]["weights"] != plain["fingerprint"]["weights"]


def test_build_scores_own_skills_and_prints_the_fingerprint(tiny_testbed: Path) -> None:
    meta = _meta(tiny_testbed)
    own = meta["fingerprint"]["own_skill_test"]
    report = report_testbed(tiny_testbed, write=False)
    for skill, value in own.items():
        # scored here again, possibly on other kernels than the build's pinned ones:
        # greedy decoding may flip a near-tie, so allow one example
        assert value == pytest.approx(
            report.scores[f"expert-{skill}"][skill], abs=100 / report.n[skill] + 1e-9
        )
    line = fingerprint_line(tiny_testbed)
    assert line.startswith(f"fingerprint {meta['fingerprint']['weights']} ")
    for skill, value in own.items():
        assert f"{skill} {value:.1f}" in line
