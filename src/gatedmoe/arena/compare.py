"""`compare`: run the arena's tasks, then write results.json, results.csv, the figures and
report.html into one folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gatedmoe.arena.leaderboard import format_leaderboard, leaderboard, write_results
from gatedmoe.arena.report import make_plots, write_html
from gatedmoe.arena.runner import ArenaResult

__all__ = ["NOTES", "write_outputs"]

NOTES = [
    "Every contestant of a task has the same model, budget, data order and seeds; only the gate differs, and with "
    "variants the MoE settings each variant changes (tabular: the MLP has the MoE's parameter count).",
    "load CV and max violation are over executed assignments (max violation = max load / mean load - 1); "
    "dense gates (softmax, soft gumbel_softmax) send every token to every expert, so their load is uniform by "
    "construction and their entropy says how peaked the weights are.",
    "expert_choice selects tokens over the whole batch, so in a causal LM a token's routing depends on later "
    "tokens (and validation routing on the validation batch): its loss is not strictly comparable.",
    "hash routes by the input character id with a fixed random table; it has no router and no gate distribution "
    "(entropy n/a).",
    "switch drops assignments over capacity (capacity factor 1.25); dropped % counts them.",
    "active = parameters a token uses, with the measured mean experts per token in each MoE layer.",
    "tokens/s (rows/s for tables) is measured per training run; runs trained at once (--jobs) or other jobs on "
    "the machine share the cores, so it compares gates only roughly.",
]


def write_outputs(results: list[ArenaResult], out: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write everything for ``results`` under ``out``; return the paths and the printed
    leaderboards (``{"json", "csv", "html", "figures", "tables"}``)."""
    out = Path(out)
    t0 = time.perf_counter()
    json_path, csv_path = write_results(results, out, extra={"meta": meta or {}, "notes": NOTES})
    figures = {res.task: make_plots(res, out) for res in results}
    html_path = write_html(results, figures, out / "report.html", meta=meta, notes=NOTES)
    tables = {res.task: format_leaderboard(leaderboard(res)) for res in results}
    return {"json": json_path, "csv": csv_path, "html": html_path, "tables": tables,
            "figures": [p for figs in figures.values() for _, p in figs], "seconds": time.perf_counter() - t0}
