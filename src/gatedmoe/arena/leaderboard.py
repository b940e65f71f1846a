"""The arena's leaderboard: runs grouped by contestant, mean and standard deviation over
seeds, as a table (text, Markdown), JSON and CSV."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from gatedmoe.arena.runner import ArenaResult

__all__ = ["COLUMNS", "leaderboard", "format_leaderboard", "write_results"]

# (run key, header, format); a column is shown when some run has the key.
COLUMNS: list[tuple[str, str, str]] = [
    ("val_loss", "val loss", "{:.4f}"),
    ("val_accuracy", "val acc", "{:.4f}"),
    ("val_rmse", "val RMSE", "{:.2f}"),
    ("val_r2", "val R2", "{:.3f}"),
    ("params", "params", "{:,.0f}"),
    ("active_params", "active", "{:,.0f}"),
    ("load_cv", "load CV", "{:.3f}"),
    ("max_violation", "max viol", "{:.3f}"),
    # Runs with gradient accumulation: the same per validation batch of one micro-batch's size.
    ("micro_max_violation", "max viol/micro", "{:.3f}"),
    ("dropped_pct", "dropped %", "{:.2f}"),
    ("entropy_norm", "entropy/logE", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def leaderboard(result: ArenaResult) -> list[dict[str, Any]]:
    """One row per contestant, best validation loss first: ``label``, ``gate``, ``seeds``,
    and for each column of `COLUMNS` present in the runs, ``key`` (mean over seeds) and
    ``key_std`` (sample standard deviation; 0 for one seed; None where not applicable)."""
    keys = [k for k, _, _ in COLUMNS if any(k in r for r in result.runs)]
    groups: dict[str, list[dict]] = {}
    for run in result.runs:
        groups.setdefault(run["label"], []).append(run)
    rows = []
    for label, runs in groups.items():
        row: dict[str, Any] = {"task": result.task, "dataset": result.dataset, "label": label,
                               "gate": runs[0]["gate"], "seeds": len(runs)}
        for k in keys:
            row[k], row[f"{k}_std"] = _mean_std([r.get(k) for r in runs])
        rows.append(row)
    rows.sort(key=lambda r: math.inf if r.get("val_loss") is None else r["val_loss"])
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "n/a"
    s = fmt.format(v)
    std = row.get(f"{key}_std")
    if row.get("seeds", 1) > 1 and std:
        s += " ± " + fmt.format(std).lstrip()
    return s


def format_leaderboard(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The rows as a plain-text table (or a Markdown table); ``± std`` with several seeds.
    Throughput is tokens/s for text, rows/s for tables."""
    if not rows:
        return "(no runs)"
    cols = [(k, h, f) for k, h, f in COLUMNS if k in rows[0]]
    if rows[0].get("task") == "tabular":
        cols = [(k, "rows/s" if k == "tokens_per_s" else h, f) for k, h, f in cols]
    header = ["model"] + [h for _, h, _ in cols]
    body = [[r["label"]] + [_cell(r, k, f) for k, _, f in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(cols) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]

    def fmt_row(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([fmt_row(header), *(fmt_row(b) for b in body)])


def write_results(results: list[ArenaResult], out: str | Path, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``results.json`` (config, leaderboard and every run of each task, plus
    ``extra``) and ``results.csv`` (the leaderboard rows of every task) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**(extra or {}), "tasks": []}
    all_rows = []
    for res in results:
        rows = leaderboard(res)
        all_rows += rows
        doc["tasks"].append({"task": res.task, "dataset": res.dataset, "config": res.config, "seconds": res.seconds,
                             "leaderboard": rows, "runs": res.runs})
    json_path = out / "results.json"
    json_path.write_text(json.dumps(doc, indent=1))
    fields: list[str] = []
    for row in all_rows:
        fields += [k for k in row if k not in fields]
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in all_rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return json_path, csv_path
