"""The package surface: every public name resolves, and importing it loads no torch."""

from __future__ import annotations

import subprocess
import sys

import shoal.adapt


def test_all_names_resolve() -> None:
    for name in shoal.adapt.__all__:
        assert getattr(shoal.adapt, name) is not None, name


def test_import_is_lazy() -> None:
    code = "import sys, shoal.adapt; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
