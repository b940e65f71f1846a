"""Interop with other libraries: `gatedmoe.interop.hf` converts the MoE blocks of Hugging
Face transformers models to gatedmoe and back (``pip install gatedmoe[hf]``)."""

from __future__ import annotations

import importlib
from types import ModuleType


def __getattr__(name: str) -> ModuleType:
    # ``gatedmoe.interop.hf.patch_model(...)`` after a bare ``import gatedmoe``; loaded on first
    # use, so importing gatedmoe never imports transformers.
    if name == "hf":
        return importlib.import_module("gatedmoe.interop.hf")
    raise AttributeError(f"module 'gatedmoe.interop' has no attribute {name!r}")
