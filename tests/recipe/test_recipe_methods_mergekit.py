"""The registry entries of the methods of issue #14 against mergekit 0.1.5's own specs.

mergekit's registry is read by the side venv's Python (``make mergekit-venv``), so the
parameter names, defaults, scopes and model counts are checked against the program
itself, not against a copy of it. Skipped without the side venv (as in CI).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from shoal.recipe import METHODS

ROOT = Path(__file__).resolve().parents[2]
MERGEKIT_PYTHON = ROOT / ".bench" / "mergekit-venv" / "bin" / "python"

NEW_METHODS = (
    "sce",
    "della",
    "della_linear",
    "nearswap",
    "karcher",
    "multislerp",
    "nuslerp",
    "arcee_fusion",
)

# shoal's one departure in the defaults: ``weight`` defaults to 1 on every method (as on
# ties / dare in shoal); mergekit 0.1.5 requires it on each model
DEFAULT_WEIGHT = 1.0

_DUMP = """
import json
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import MISSING
out = {}
for method in registry.registered_methods():
    spec = method.spec
    c = spec.contract
    out[spec.name] = {
        "params": {
            p.name: {"required": p.required, "default": None if p.required else p.default,
                     "shared": p.scope.value == "shared"}
            for p in spec.parameters
        },
        "base": c.base.value, "min_inputs": c.min_inputs, "max_inputs": c.max_inputs,
        "min_non_base": c.min_non_base, "max_non_base": c.max_non_base,
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mergekit_specs() -> dict[str, Any]:
    if not MERGEKIT_PYTHON.is_file():
        pytest.skip("no mergekit side venv (make mergekit-venv)")
    done = subprocess.run(
        [str(MERGEKIT_PYTHON), "-c", _DUMP], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", [m for m in NEW_METHODS if m in METHODS])
def test_parameters_and_defaults_are_mergekits(name: str, mergekit_specs: dict) -> None:
    theirs = mergekit_specs[name]["params"]
    ours = METHODS[name]
    assert set(ours.param_names) == set(theirs), name
    for pname, info in theirs.items():
        spec = ours.param(pname)
        assert spec is not None
        assert spec.per_model == (not info["shared"]), (name, pname)
        if info["required"]:
            expected = DEFAULT_WEIGHT if pname == "weight" else None
            assert spec.default == expected, (name, pname)
        elif pname == "rescale":
            assert spec.default == ("l1" if info["default"] else "none"), name
        else:
            assert spec.default == info["default"], (name, pname)


@pytest.mark.parametrize("name", [m for m in NEW_METHODS if m in METHODS])
def test_base_and_model_counts_are_mergekits(name: str, mergekit_specs: dict) -> None:
    theirs = mergekit_specs[name]
    ours = METHODS[name]
    assert ours.needs_base == (theirs["base"] == "required"), name
    assert ours.optional_base == (theirs["base"] == "optional"), name
    # the base counts among mergekit's inputs, not among shoal's models besides it
    lo = theirs["min_non_base"] or 0
    hi = theirs["max_non_base"]
    if theirs["base"] == "required":
        lo = max(lo, theirs["min_inputs"] - 1)
        hi = hi if theirs["max_inputs"] is None else theirs["max_inputs"] - 1
    elif theirs["base"] == "ignored":
        lo, hi = theirs["min_inputs"], theirs["max_inputs"]
    # shoal asks for one model besides the base where mergekit would merge the base alone
    assert ours.min_models == max(lo, 1), name
    assert ours.max_models == hi, name
