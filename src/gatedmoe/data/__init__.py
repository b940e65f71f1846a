"""Small datasets shipped with the package (readable without any download)."""

from __future__ import annotations

import gzip
from importlib import resources

__all__ = ["load_tinyshakespeare"]


def load_tinyshakespeare() -> str:
    """The tiny Shakespeare corpus (public domain, ~1.1 MB of text)."""
    with resources.files(__name__).joinpath("tinyshakespeare.txt.gz").open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")
