"""Tabular datasets: scikit-learn's bundled ones (no download) and user CSV files."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TabularDataset", "load_tabular", "SKLEARN_DATASETS"]

# scikit-learn datasets shipped inside the package, and their task.
SKLEARN_DATASETS = {
    "digits": "classification",
    "breast_cancer": "classification",
    "wine": "classification",
    "diabetes": "regression",
}

# A numeric CSV target with at most this many distinct integer values is taken as classes.
_MAX_CLASSES = 20


@dataclass(frozen=True, eq=False)
class TabularDataset:
    """Features and target of one table.

    Attributes
    ----------
    X : ndarray float32 ``[n, F]``
        Features (categorical CSV columns as integer codes, missing values as column means).
    y : ndarray ``[n]``
        int64 class ids (classification) or float32 values (regression).
    task : "classification" or "regression"
    classes : list of str
        Class labels in id order (empty for regression).
    feature_names : list of str
    target : str
        Name of the target column.
    name : str
    """

    X: np.ndarray
    y: np.ndarray
    task: str
    classes: list[str]
    feature_names: list[str]
    target: str
    name: str

    @property
    def n_outputs(self) -> int:
        """Classes for classification, 1 for regression."""
        return len(self.classes) if self.task == "classification" else 1

    def split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Shuffled ``(X_train, y_train, X_val, y_val)``; features standardized with the
        training split's mean and standard deviation."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n = len(self.y)
        n_val = max(1, int(round(n * val_fraction)))
        if n - n_val < 2:
            raise ValueError(f"dataset {self.name!r} has too few rows ({n}) to split")
        perm = np.random.default_rng(seed).permutation(n)
        tr, va = perm[n_val:], perm[:n_val]
        mean = self.X[tr].mean(0)
        std = self.X[tr].std(0)
        std = np.where(std > 0, std, 1.0)
        X = ((self.X - mean) / std).astype(np.float32)
        return X[tr], self.y[tr], X[va], self.y[va]


def load_tabular(name_or_path: str | Path, target: str | None = None) -> TabularDataset:
    """Load a scikit-learn bundled dataset by name, or a CSV file with a header row.

    Parameters
    ----------
    name_or_path : str or Path
        One of ``digits``, ``breast_cancer``, ``wine``, ``diabetes``, or a path ending in
        ``.csv``.
    target : str, optional
        CSV column to predict (default: the last column). Not used for named datasets.
        A target that is not numeric, or has at most 20 distinct integer values, is a
        classification target; otherwise regression.

    Examples
    --------
    >>> ds = load_tabular("wine")
    >>> ds.X.shape, ds.task, ds.n_outputs
    ((178, 13), 'classification', 3)
    """
    name = str(name_or_path)
    if name in SKLEARN_DATASETS:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, f"load_{name}")()
        task = SKLEARN_DATASETS[name]
        y = bunch.target.astype(np.int64 if task == "classification" else np.float32)
        classes = [str(c) for c in getattr(bunch, "target_names", np.unique(y))] if task == "classification" else []
        if task == "classification" and len(classes) != len(np.unique(y)):
            classes = [str(c) for c in np.unique(y)]
        features = [str(f) for f in getattr(bunch, "feature_names", [f"x{i}" for i in range(bunch.data.shape[1])])]
        return TabularDataset(bunch.data.astype(np.float32), y, task, classes, features, "target", name)
    path = Path(name)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"dataset must be one of {', '.join(SKLEARN_DATASETS)} or a .csv path, got {name!r}")
    if not path.exists():
        raise ValueError(f"dataset file {path} does not exist")
    return _load_csv(path, target)


def _as_float(values: list[str]) -> np.ndarray | None:
    """Column as float64 (empty cells NaN), or None if some cell is not a number."""
    out = np.empty(len(values))
    for i, v in enumerate(values):
        v = v.strip()
        if v == "" or v.lower() in ("na", "nan"):
            out[i] = np.nan
            continue
        try:
            out[i] = float(v)
        except ValueError:
            return None
    return out


def _load_csv(path: Path, target: str | None) -> TabularDataset:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"{path} is not a readable CSV file: {e}") from None
    if len(rows) < 3:
        raise ValueError(f"{path} needs a header row and at least two data rows")
    header = [h.strip() for h in rows[0]]
    # Line numbers as an editor shows them (the header is line 1).
    numbered = [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]
    for line, r in numbered:
        if len(r) != len(header):
            raise ValueError(f"{path}, line {line}: {len(r)} cells, but the header has {len(header)}")
    body = [r for _, r in numbered]
    if len(header) < 2:
        raise ValueError(f"{path} needs at least one feature column and a target column")
    target = header[-1] if target is None else target
    if target not in header:
        raise ValueError(f"target column {target!r} is not in {path}; columns: {', '.join(header)}")
    columns = {h: [r[j] for r in body] for j, h in enumerate(header)}
    features, cols = [], []
    for h in header:
        if h == target:
            continue
        col = _as_float(columns[h])
        if col is None:
            # Categorical column: integer codes in sorted order of the labels.
            labels = sorted(set(v.strip() for v in columns[h]))
            index = {lab: i for i, lab in enumerate(labels)}
            col = np.array([index[v.strip()] for v in columns[h]], dtype=np.float64)
        elif np.isnan(col).all():
            raise ValueError(f"{path}: column {h!r} has no values")
        else:
            col = np.where(np.isnan(col), np.nanmean(col), col)
        features.append(h)
        cols.append(col)
    raw = columns[target]
    if any(v.strip() == "" for v in raw):
        raise ValueError(f"{path}: target column {target!r} has empty cells")
    num = _as_float(raw)
    if num is not None and not (len(np.unique(num)) <= _MAX_CLASSES and np.all(num == np.round(num))):
        y, task, classes = num.astype(np.float32), "regression", []
    else:
        labels = sorted(set(v.strip() for v in raw), key=lambda v: (float(v), v) if num is not None else (0.0, v))
        index = {lab: i for i, lab in enumerate(labels)}
        y, task, classes = np.array([index[v.strip()] for v in raw], dtype=np.int64), "classification", labels
        if len(classes) < 2:
            raise ValueError(f"{path}: target column {target!r} has a single class")
    X = np.stack(cols, 1).astype(np.float32)
    return TabularDataset(X, y, task, classes, features, target, path.stem)
