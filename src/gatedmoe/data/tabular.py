"""Tabular datasets: scikit-learn's bundled ones (no download) and user CSV files."""

from __future__ import annotations

import csv
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["TabularDataset", "TabularPreprocessing", "load_tabular", "read_csv_rows", "target_standardization",
           "SKLEARN_DATASETS"]

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
    categories : dict of str to list of str
        For each categorical CSV column, its labels in code order (code i is label i).
    fill : dict of str to float
        For each numeric CSV column, the value of its empty cells (the column's mean).
    """

    X: np.ndarray
    y: np.ndarray
    task: str
    classes: list[str]
    feature_names: list[str]
    target: str
    name: str
    categories: dict[str, list[str]] = field(default_factory=dict)
    fill: dict[str, float] = field(default_factory=dict)

    @property
    def n_outputs(self) -> int:
        """Classes for classification, 1 for regression."""
        return len(self.classes) if self.task == "classification" else 1

    def split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Shuffled ``(X_train, y_train, X_val, y_val)``; features standardized with the
        training split's mean and standard deviation (`preprocessing` records them)."""
        tr, va = self._split_rows(val_fraction, seed)
        mean, std = _standardization(self.X[tr])
        X = ((self.X - mean) / std).astype(np.float32)
        return X[tr], self.y[tr], X[va], self.y[va]

    def preprocessing(self, val_fraction: float = 0.2, seed: int = 0) -> TabularPreprocessing:
        """What `split` with these arguments does to a row, and what `train_tabular` does to
        the target of its training rows, as a `TabularPreprocessing` that applies both to
        new CSV rows (categorical codes, fill values, the training split's standardization)."""
        tr, _ = self._split_rows(val_fraction, seed)
        mean, std = _standardization(self.X[tr])
        y_mean, y_std = target_standardization(self.y[tr]) if self.task == "regression" else (0.0, 1.0)
        return TabularPreprocessing(
            feature_names=list(self.feature_names), categories={k: list(v) for k, v in self.categories.items()},
            fill=dict(self.fill), mean=[float(v) for v in mean], std=[float(v) for v in std], task=self.task,
            target=self.target, classes=list(self.classes), target_mean=y_mean, target_std=y_std,
        )

    def _split_rows(self, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n = len(self.y)
        n_val = max(1, int(round(n * val_fraction)))
        if n - n_val < 2:
            raise ValueError(f"dataset {self.name!r} has too few rows ({n}) to split")
        perm = np.random.default_rng(seed).permutation(n)
        return perm[n_val:], perm[:n_val]


@dataclass(frozen=True)
class TabularPreprocessing:
    """How a CSV row becomes a model's input and a model's output a prediction, as fitted on
    a training split (`TabularDataset.preprocessing`): what a tabular checkpoint keeps, so
    that new rows get exactly what the training rows got.

    Attributes
    ----------
    feature_names : list of str
        The feature columns, in the model's input order.
    categories : dict of str to list of str
        Categorical columns: the labels in code order.
    fill : dict of str to float
        Numeric columns: the value of an empty cell (the training file's column mean).
    mean, std : list of float
        Standardization of each feature (the training split's).
    task : "classification" or "regression"
    target : str
        The target column's name.
    classes : list of str
        Class labels in the order of the model's outputs (classification).
    target_mean, target_std : float
        Regression: the model predicts ``(y - target_mean) / target_std`` (`train_tabular`
        standardizes the target so, with `target_standardization`). 0 and 1 for classification.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "t.csv").write_text("size,color,y\\n1,red,a\\n2,blue,b\\n,red,a\\n4,blue,b\\n5,red,a\\n")
    >>> prep = load_tabular(folder / "t.csv").preprocessing(seed=0)
    >>> prep.categories, prep.fill, prep.classes
    ({'color': ['blue', 'red']}, {'size': 3.0}, ['a', 'b'])
    >>> _ = (folder / "new.csv").write_text("color,size\\nred,\\n")
    >>> X, target = prep.transform_csv(folder / "new.csv")
    >>> X.shape, target
    ((1, 2), None)
    """

    feature_names: list[str]
    categories: dict[str, list[str]]
    fill: dict[str, float]
    mean: list[float]
    std: list[float]
    task: str
    target: str
    classes: list[str]
    target_mean: float = 0.0
    target_std: float = 1.0

    def __post_init__(self) -> None:
        def strings(v) -> bool:
            return isinstance(v, list) and all(isinstance(s, str) for s in v)

        def numbers(v) -> bool:
            return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               and math.isfinite(x) for x in v)

        if not strings(self.feature_names) or len(set(self.feature_names)) != len(self.feature_names):
            raise TypeError(f"feature_names must be a list of distinct str, got {self.feature_names!r}")
        if not strings(self.classes) or len(set(self.classes)) != len(self.classes):
            raise TypeError(f"classes must be a list of distinct str, got {self.classes!r}")
        if not isinstance(self.target, str):
            raise TypeError(f"target must be a str, got {self.target!r}")
        if not (isinstance(self.categories, dict) and all(strings(v) for v in self.categories.values())):
            raise TypeError(f"categories must map column names to lists of str, got {self.categories!r}")
        if not (isinstance(self.fill, dict) and numbers(list(self.fill.values()))):
            raise TypeError(f"fill must map column names to finite numbers, got {self.fill!r}")
        if not (numbers(self.mean) and numbers(self.std) and all(v > 0 for v in self.std)):
            raise ValueError("mean and std must be lists of finite numbers, std > 0")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.target_mean, self.target_std)):
            raise TypeError(f"target_mean and target_std must be numbers, got {self.target_mean!r}, {self.target_std!r}")
        n = len(self.feature_names)
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {self.task!r}")
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(f"mean and std need one value per feature ({n}), got {len(self.mean)} and {len(self.std)}")
        stray = sorted((set(self.categories) | set(self.fill)) - set(self.feature_names))
        if stray:
            raise ValueError(f"categories / fill name columns that are not features: {', '.join(stray)}")
        if self.task == "classification" and len(self.classes) < 2:
            raise ValueError(f"a classification target needs at least two classes, got {self.classes!r}")
        if self.task == "regression" and self.classes:
            raise ValueError(f"a regression target has no classes, got {self.classes!r}")
        if not (math.isfinite(self.target_std) and self.target_std > 0 and math.isfinite(self.target_mean)):
            raise ValueError(f"target_std must be finite and > 0 and target_mean finite, got "
                             f"{self.target_mean!r}, {self.target_std!r}")

    @property
    def n_outputs(self) -> int:
        """Classes for classification, 1 for regression."""
        return len(self.classes) if self.task == "classification" else 1

    def class_labels(self, cells: list[str]) -> list[str | None]:
        """Target cells as the training run labelled them (a numeric target's "1.0" is class
        "1"); None for a missing cell. Classification only.

        Examples
        --------
        >>> prep = TabularPreprocessing(["x"], {}, {"x": 0.0}, [0.0], [1.0], "classification", "y", ["0", "1"])
        >>> prep.class_labels(["1.0", " 0", "NA"])
        ['1', '0', None]
        """
        if self.task != "classification":
            raise ValueError("class_labels is for a classification target")
        numeric = all(_is_int_text(c) for c in self.classes)
        return [None if _is_missing(c) else _class_label(c, numeric) for c in cells]

    def target_values(self, cells: list[str]) -> list[float | None]:
        """Target cells as numbers; None for a missing cell. Regression only; ValueError for
        a cell that is not a number.

        Examples
        --------
        >>> prep = TabularPreprocessing(["x"], {}, {"x": 0.0}, [0.0], [1.0], "regression", "y", [])
        >>> prep.target_values(["2.5", ""])
        [2.5, None]
        """
        if self.task != "regression":
            raise ValueError("target_values is for a regression target")
        return [None if _is_missing(c) else float(c) for c in cells]

    def to_dict(self) -> dict:
        """JSON-able; read back by `from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TabularPreprocessing:
        """Inverse of `to_dict`, validated."""
        return cls(**d)

    def transform_csv(self, path: str | Path) -> tuple[np.ndarray, list[str] | None]:
        """``(X, target)``: the features of every data row of the CSV file at ``path`` as the
        model takes them (``[n, F]`` float32: codes, fills, standardization), and the target
        column's cells if the file has that column (else None). Columns are found by name,
        in any order; other columns are ignored. ValueError naming the file, line and column
        for a missing feature column, a label the training data did not have, or a cell
        that is not a number in a numeric column."""
        path = Path(path)
        header, numbered = read_csv_rows(path)
        missing = [f for f in self.feature_names if f not in header]
        if missing:
            raise ValueError(f"{path} lacks the feature column(s) {', '.join(map(repr, missing))} the model was "
                             f"trained on; it has: {', '.join(header)}")
        at = {h: j for j, h in enumerate(header)}
        X = np.empty((len(numbered), len(self.feature_names)))
        for c, name in enumerate(self.feature_names):
            cells = [row[at[name]] for _, row in numbered]
            fast = _fast_column(cells, self.categories.get(name), self.fill.get(name))
            X[:, c] = fast if fast is not None else self._column_cell_by_cell(cells, numbered, name, path)
        # As `split`: float32 features, float32 arithmetic (mean and std are float32 values).
        X = ((X.astype(np.float32) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32))
        target = [row[at[self.target]].strip() for _, row in numbered] if self.target in at else None
        return X, target

    def _column_cell_by_cell(self, cells: list[str], numbered: list, name: str, path: Path) -> np.ndarray:
        """One feature column, cell by cell: the reference for `_fast_column`, and the path
        that names the file, line and column of a cell it cannot take."""
        labels = self.categories.get(name)
        index = None if labels is None else {lab: i for i, lab in enumerate(labels)}
        out = np.empty(len(cells))
        for i, (cell, (line, _)) in enumerate(zip(cells, numbered, strict=True)):
            cell = cell.strip()
            if index is not None:
                if cell not in index:
                    known = ", ".join(map(repr, labels[:10])) + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")
                    raise ValueError(f"{path}, line {line}, column {name!r}: label {cell!r} was not in the training "
                                     f"data (known: {known})")
                out[i] = index[cell]
                continue
            value = math.nan if _is_missing(cell) else _number(cell, path, line, name)
            if math.isnan(value):  # as the training loader: a missing value, the column's fill
                if name not in self.fill:
                    raise ValueError(f"{path}, line {line}, column {name!r}: empty cell, and no fill value "
                                     "was recorded for this column")
                value = self.fill[name]
            out[i] = value
        return out


def _fast_column(cells: list[str], labels: list[str] | None, fill: float | None) -> np.ndarray | None:
    """A feature column as `TabularPreprocessing._column_cell_by_cell` gives it, without its
    per-cell branches (200k rows x 19 columns on the 2-core machine: 0.6 s against 1.6 s; reading
    the file, 1.7 s, is then most of `transform_csv`), or None where some cell
    needs it (an unknown label, a word, an infinity, a missing value with no fill): it then
    names the cell."""
    n = len(cells)
    try:
        if labels is not None:
            index = {lab: i for i, lab in enumerate(labels)}
            return np.fromiter((index[c.strip()] for c in cells), np.float64, n)
        try:
            col = np.fromiter(map(float, cells), np.float64, n)  # float() strips as the loop does
        except ValueError:  # missing-value words ("", "NA", ...): NaN, then the fill
            col = np.fromiter((math.nan if _is_missing(c) else float(c) for c in cells), np.float64, n)
    except (KeyError, ValueError):
        return None
    if np.isinf(col).any():
        return None
    nan = np.isnan(col)
    if nan.any():
        if fill is None:
            return None
        col[nan] = fill
    return col


def _number(cell: str, path: Path, line: int, column: str) -> float:
    """A numeric feature's cell (NaN allowed: the caller fills it); ValueError naming the
    file, line and column for a word or an infinity."""
    try:
        value = float(cell)
    except ValueError:
        raise ValueError(f"{path}, line {line}, column {column!r}: {cell!r} is not a number (the column was "
                         "numeric in the training data)") from None
    if math.isinf(value):
        raise ValueError(f"{path}, line {line}, column {column!r}: {cell!r} is not a finite number")
    return value


def target_standardization(y_train: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (1 where constant) of a regression target's training
    values: `train_tabular` fits ``(y - mean) / std``, `TabularPreprocessing` maps back.

    Examples
    --------
    >>> target_standardization(np.array([1.0, 3.0])), target_standardization(np.array([2.0, 2.0]))
    ((2.0, 1.0), (2.0, 1.0))
    """
    return float(np.mean(y_train)), float(np.std(y_train)) or 1.0


def _standardization(X_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation of the training rows (1 where constant), in
    their dtype: `split` and `TabularPreprocessing.transform_csv` do the same float32 arithmetic."""
    std = X_train.std(0)
    return X_train.mean(0), np.where(std > 0, std, 1.0).astype(X_train.dtype)


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


# Cells that mean "no value" (after stripping; case ignored): pandas' default NA words.
_MISSING = ("", "na", "nan", "-nan", "n/a", "null", "none", "<na>", "#n/a")


def _is_missing(cell: str) -> bool:
    return cell.strip().lower() in _MISSING


def _as_float(values: list[str]) -> np.ndarray | None:
    """Column as float64 (missing cells NaN; infinities as they are), or None if some cell
    is not a number."""
    out = np.empty(len(values))
    for i, v in enumerate(values):
        if _is_missing(v):
            out[i] = np.nan
            continue
        try:
            out[i] = float(v)
        except ValueError:
            return None
    return out


def _warn_if_mostly_numbers(path: Path, column: str, cells: list[str], numbered: list) -> None:
    """A column of numbers with a few words is more likely numbers with missing-value markers
    than categories: say which cell made it categorical (a new row's number then cannot be
    predicted: it is not one of the labels)."""
    words = [i for i, v in enumerate(cells) if not _is_missing(v) and _maybe_float(v) is None]
    if words and len(words) <= 0.1 * len(cells):
        i = words[0]
        warnings.warn(f"{path}: column {column!r} is taken as categorical because of {len(words)} cell(s) that are "
                      f"not numbers, the first {cells[i].strip()!r} on line {numbered[i][0]}; if they mean a missing "
                      "value, leave them empty (or NA) and the column is numeric", stacklevel=4)


def _maybe_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _is_int_text(label: str) -> bool:
    """An optionally signed run of ASCII digits: exactly what `int` reads (str.isdigit also
    takes "--5" once stripped, and digits such as "²" that `int` refuses)."""
    return re.fullmatch(r"[+-]?[0-9]+", label) is not None


def _class_label(cell: str, numeric: bool) -> str:
    """A target cell as a class label: stripped text, or for a numeric target the integer it
    holds ("1", "1.0" and " 1" are one class, "1")."""
    cell = cell.strip()
    if numeric and _is_int_text(cell):
        return str(int(cell))  # exact, however large
    if numeric:
        try:
            v = float(cell)
        except ValueError:
            return cell
        if math.isfinite(v) and v == round(v):
            return str(int(v))
    return cell


def read_csv_rows(path: str | Path, min_rows: int = 1) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (cells stripped) and the non-blank data rows of a UTF-8 CSV file, each
    with its line number as an editor shows it (the header is line 1). ValueError naming
    the file (and the line) when it cannot be read, a row's cell count differs from the
    header's, it names a column twice, or it has fewer than ``min_rows`` data rows.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = path.write_text("a, b\\n1,2\\n\\n3,4\\n")
    >>> read_csv_rows(path)
    (['a', 'b'], [(2, ['1', '2']), (4, ['3', '4'])])
    """
    path = Path(path)
    try:
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name.
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"{path} is not a readable CSV file: {e}") from None
    if not rows:
        raise ValueError(f"{path} is empty: it needs a header row and data rows")
    header = [h.strip() for h in rows[0]]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise ValueError(f"{path}: the header names column(s) {', '.join(map(repr, repeated))} more than once")
    numbered = [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]
    for line, r in numbered:
        if len(r) != len(header):
            raise ValueError(f"{path}, line {line}: {len(r)} cells, but the header has {len(header)}")
    if len(numbered) < min_rows:
        raise ValueError(f"{path} needs a header row and at least {min_rows} data row{'s' * (min_rows > 1)}, "
                         f"has {len(numbered)}")
    return header, numbered


def _load_csv(path: Path, target: str | None) -> TabularDataset:
    header, numbered = read_csv_rows(path, min_rows=2)
    body = [r for _, r in numbered]
    if len(header) < 2:
        raise ValueError(f"{path} needs at least one feature column and a target column")
    target = header[-1] if target is None else target
    if target not in header:
        raise ValueError(f"target column {target!r} is not in {path}; columns: {', '.join(header)}")
    columns = {h: [r[j] for r in body] for j, h in enumerate(header)}
    features, cols, categories, fill = [], [], {}, {}
    for h in header:
        if h == target:
            continue
        col = _as_float(columns[h])
        if col is None:
            # Categorical column: integer codes in sorted order of the labels.
            _warn_if_mostly_numbers(path, h, columns[h], numbered)
            labels = sorted(set(v.strip() for v in columns[h]))
            index = {lab: i for i, lab in enumerate(labels)}
            col = np.array([index[v.strip()] for v in columns[h]], dtype=np.float64)
            categories[h] = labels
        elif np.isnan(col).all():
            raise ValueError(f"{path}: column {h!r} has no values")
        elif np.isinf(col).any():
            i = int(np.isinf(col).argmax())
            raise ValueError(f"{path}, line {numbered[i][0]}, column {h!r}: {columns[h][i].strip()!r} is not a finite number")
        else:
            fill[h] = float(np.nanmean(col))
            col = np.where(np.isnan(col), fill[h], col)
        features.append(h)
        cols.append(col)
    raw = columns[target]
    missing = [line for (line, _), v in zip(numbered, raw, strict=True) if _is_missing(v)]
    if missing:
        raise ValueError(f"{path}: target column {target!r} has empty cells (or NA) on line(s) "
                         f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}")
    num = _as_float(raw)
    if num is not None and not np.isfinite(num).all():
        line = numbered[int((~np.isfinite(num)).argmax())][0]
        raise ValueError(f"{path}, line {line}: target column {target!r} holds a value that is not a finite number")
    if num is not None and not (len(np.unique(num)) <= _MAX_CLASSES and np.all(num == np.round(num))):
        y, task, classes = num.astype(np.float32), "regression", []
    else:
        cells = [_class_label(v, numeric=num is not None) for v in raw]
        labels = sorted(set(cells), key=lambda v: (float(v), v) if num is not None else (0.0, v))
        index = {lab: i for i, lab in enumerate(labels)}
        y, task, classes = np.array([index[c] for c in cells], dtype=np.int64), "classification", labels
        if len(classes) < 2:
            raise ValueError(f"{path}: target column {target!r} has a single class")
    X = np.stack(cols, 1).astype(np.float32)
    return TabularDataset(X, y, task, classes, features, target, path.stem, categories, fill)
