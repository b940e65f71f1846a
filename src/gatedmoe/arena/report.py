"""The arena's figures (PNG) and its self-contained HTML report (figures embedded as
base64, no external file or script)."""

from __future__ import annotations

import base64
import html
import re
import statistics
from pathlib import Path
from typing import Any

from gatedmoe.analysis import plot_bars, plot_coactivation, plot_curves, plot_token_experts
from gatedmoe.arena.leaderboard import COLUMNS, leaderboard
from gatedmoe.arena.runner import ArenaResult

__all__ = ["make_plots", "write_html"]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", label).strip("_") or "run"


def _mean_curves(result: ArenaResult) -> dict[str, list[list[float]]]:
    """Validation curve per contestant, averaged over seeds step by step."""
    by_label: dict[str, dict[int, list[float]]] = {}
    for run in result.runs:
        pts = by_label.setdefault(run["label"], {})
        for step, v in run["val_curve"]:
            pts.setdefault(int(step), []).append(v)
    return {label: [[s, statistics.fmean(v)] for s, v in sorted(pts.items())] for label, pts in by_label.items()}


def make_plots(result: ArenaResult, out: str | Path) -> list[tuple[str, Path]]:
    """Write the task's figures under ``out`` (file names start with the task); return
    ``(caption, path)`` pairs: validation loss curves, routing entropy per gate, a load
    heatmap (layers x experts) per gate, expert co-activation, and for text which
    characters go to which expert."""
    out = Path(out)
    t = result.task
    figs: list[tuple[str, Path]] = []
    figs.append(("Validation loss during training (mean over seeds)",
                 plot_curves(_mean_curves(result), out / f"{t}_loss_curves.png",
                             title=f"{t}: {result.dataset}")))
    rows = leaderboard(result)
    ent = {r["label"]: (r["entropy_norm"], r["entropy_norm_std"] or 0.0) for r in rows
           if r.get("entropy_norm") is not None}
    if ent:
        figs.append(("Routing entropy of the gate distribution (1 = uniform over experts)",
                     plot_bars(ent, out / f"{t}_entropy.png", ylabel="entropy / log E",
                               title="routing entropy (validation)")))
    for label, st in result.stats.items():
        figs.append((f"Expert load per layer, {label} (1 = uniform)",
                     st.plot(out / f"{t}_load_{_slug(label)}.png", title=f"load, {label}")))
    if result.stats:
        figs.append(("Expert co-activation P(j | i), first MoE layer: tokens routed to i that also go to j",
                     plot_coactivation(result.stats, out / f"{t}_coactivation.png")))
        if result.vocab:
            figs.append(("Which characters go to which expert (first MoE layer, 30 most frequent characters)",
                         plot_token_experts(result.stats, out / f"{t}_char_experts.png", result.vocab)))
    return figs


def _table_html(rows: list[dict[str, Any]]) -> str:
    cols = [(k, h, f) for k, h, f in COLUMNS if rows and k in rows[0]]
    if rows and rows[0].get("task") == "tabular":
        cols = [(k, "rows/s" if k == "tokens_per_s" else h, f) for k, h, f in cols]
    head = "<tr><th>model</th>" + "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols) + "</tr>"
    body = []
    for r in rows:
        cells = []
        for k, _, f in cols:
            v = r.get(k)
            s = "n/a" if v is None else f.format(v)
            if v is not None and r["seeds"] > 1 and r.get(f"{k}_std"):
                s += " ± " + f.format(r[f"{k}_std"])
            cells.append(f"<td>{html.escape(s)}</td>")
        body.append(f"<tr><td>{html.escape(r['label'])}</td>{''.join(cells)}</tr>")
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f2f2f2}figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}code{background:#f5f5f5;padding:1px 4px}"""


def write_html(results: list[ArenaResult], figures: dict[str, list[tuple[str, Path]]], path: str | Path, *,
               meta: dict[str, Any] | None = None, notes: list[str] | None = None) -> Path:
    """Write one self-contained HTML page: per task its config, leaderboard and figures
    (``figures[task]``, PNGs embedded as base64 data URIs); ``meta`` (command, machine,
    runtime) and ``notes`` go at the top."""
    parts = ["<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
             "<title>gatedmoe gate arena</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             "<h1>gatedmoe gate arena</h1>"]
    if meta:
        items = "".join(f"<li><b>{html.escape(str(k))}</b>: <code>{html.escape(str(v))}</code></li>" for k, v in meta.items())
        parts.append(f"<ul>{items}</ul>")
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    for res in results:
        parts.append(f"<h2>{html.escape(res.task)}: {html.escape(res.dataset)}</h2>")
        cfg = {k: v for k, v in res.config.items() if k != "gates"}
        parts.append(f"<p>Config: <code>{html.escape(str(cfg))}</code><br>Gate arguments: "
                     f"<code>{html.escape(str(res.config.get('gates', {})))}</code><br>"
                     f"Wall time: {res.seconds:.1f} s</p>")
        parts.append(_table_html(leaderboard(res)))
        for caption, png in figures.get(res.task, []):
            data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += ["</body>", "</html>"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
