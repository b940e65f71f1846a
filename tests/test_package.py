"""The top-level package: its names and subpackages load on first use (PEP 562)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter with this checkout's package; its stdout."""
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout


def test_subpackages_are_attributes_after_a_bare_import():
    """docs/gates.md's first lines, ``import gatedmoe; gatedmoe.gates.names()``, in a fresh
    interpreter; transformers is imported only when ``gatedmoe.interop.hf`` is reached."""
    pytest.importorskip("transformers")
    out = _fresh(
        "import sys, gatedmoe; print(len(gatedmoe.gates.names()) > 10); print('transformers' in sys.modules); "
        "print(callable(gatedmoe.interop.hf.patch_model)); print('gates' in dir(gatedmoe))"
    )
    assert out.split() == ["True", "False", "True", "True"], out


def test_unknown_attributes_raise_attribute_error():
    import gatedmoe
    import gatedmoe.interop

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gatedmoe.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gatedmoe.interop.nope  # noqa: B018


def test_python_dash_m_gatedmoe_is_the_command():
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-m", "gatedmoe", "--help"], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert "compare" in out and "simulate" in out, out
