"""Small datasets shipped with the package (readable without any download): tiny
Shakespeare, and scikit-learn's bundled tables through `load_tabular`."""

from __future__ import annotations

import gzip
from importlib import resources

from gatedmoe.data.tabular import (
    SKLEARN_DATASETS,
    TabularDataset,
    TabularPreprocessing,
    load_tabular,
)

__all__ = ["load_tinyshakespeare", "load_tabular", "TabularDataset", "TabularPreprocessing", "SKLEARN_DATASETS"]


def load_tinyshakespeare() -> str:
    """The tiny Shakespeare corpus (public domain, ~1.1 MB of text)."""
    with resources.files(__name__).joinpath("tinyshakespeare.txt.gz").open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")
