"""``gatedmoe predict MODEL rows.csv``: a trained TabularMoE's predictions for new rows."""

from __future__ import annotations

import argparse
import csv
import math
import textwrap
from pathlib import Path

from gatedmoe.cli._common import HELP_FORMAT, UsageError, check_file, examples, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict new CSV rows with a model that 'gatedmoe train --data table.csv' wrote",
        formatter_class=HELP_FORMAT,
        epilog=examples(
            "gatedmoe train --data table.csv --target label --out runs/table",
            "gatedmoe predict runs/table new_rows.csv --out predictions.csv",
        ),
        description=textwrap.fill("Apply a trained TabularMoE to the rows of a CSV file: the feature columns are found by "
        "name and preprocessed as the training rows were (category codes, fill values, standardization). "
        "Writes one row per input row: the prediction, and for classification each class's probability. "
        "If the file has the target column, prints the accuracy (classification) or RMSE (regression)."),
    )
    p.add_argument("model", help="the training run's --out folder, or its model/ folder")
    p.add_argument("data", help="CSV file with a header row (the target column may be absent)")
    p.add_argument("--out", default="predictions.csv", help="CSV file to write (default predictions.csv)")
    p.add_argument("--batch-size", type=positive_int, default=4096, help="rows per forward pass (default 4096)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gatedmoe.models.tabular_io import load_tabular_model, predict_tabular

    data = check_file(args.data, "data")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name")
    if out.resolve() == data.resolve():
        raise UsageError(f"--out {out} is the input file; give another name")
    model, prep, _ = load_tabular_model(args.model)
    X, target = prep.transform_csv(data)
    result = predict_tabular(model, prep, X, batch_size=args.batch_size)
    header = ["prediction"]
    if prep.task == "classification":
        header += [f"p({c})" for c in prep.classes]
    try:
        with out.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i, pred in enumerate(result["prediction"]):
                row = [pred] if prep.task == "classification" else [repr(float(pred))]
                if prep.task == "classification":
                    row += [f"{p:.6g}" for p in result["probabilities"][i]]
                w.writerow(row)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written: {e.strerror or e}") from None
    print(f"{len(X)} rows, {prep.task} of {prep.target!r} by the model in {args.model}")
    if target is not None:
        print(_score(prep, target, result["prediction"]))
    print(f"wrote {out}")
    return 0


def _score(prep, target: list[str], predictions: list) -> str:
    """Accuracy or RMSE against the file's target column (rows with a missing target left out)."""
    if prep.task == "classification":
        pairs = [(t, p) for t, p in zip(prep.class_labels(target), predictions, strict=True) if t is not None]
        if not pairs:
            return f"the target column {prep.target!r} is empty: no score"
        right = sum(t == p for t, p in pairs)
        return f"accuracy {right / len(pairs):.4f} on the {len(pairs)} rows with a target"
    try:
        values = [(t - p) ** 2 for t, p in zip(prep.target_values(target), predictions, strict=True) if t is not None]
    except ValueError:
        return f"the target column {prep.target!r} is not numeric: no score"
    if not values:
        return f"the target column {prep.target!r} is empty: no score"
    return f"RMSE {math.sqrt(sum(values) / len(values)):.4g} on the {len(values)} rows with a target"
