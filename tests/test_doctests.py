"""The examples in the docstrings of these modules run and print what they show (STYLE.md asks
for a runnable example on public API; these keep them from going stale)."""

import doctest
import importlib

import pytest

MODULES = [
    "gatedmoe.data.tabular",
    "gatedmoe.models.tabular_io",
    "gatedmoe.models.checkpoint_io",
    "gatedmoe.dispatch.options",
    "gatedmoe.layers.config",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
