"""The arena's figures (PNG) and its self-contained HTML report (figures embedded as
base64, no external file or script)."""

from __future__ import annotations

import base64
import html
import re
import statistics
from pathlib import Path
from typing import Any

import torch

from gatedmoe.analysis import plot_bars, plot_coactivation, plot_curves, plot_token_experts
from gatedmoe.arena.leaderboard import COLUMNS, leaderboard
from gatedmoe.arena.runner import ArenaResult

__all__ = ["make_plots", "write_html", "omitted_figures", "ranking_note", "options_rows"]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", label).strip("_") or "run"


def _curves(result: ArenaResult) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]]]:
    """Validation curve per contestant, mean over seeds step by step, and the band of ± one
    sample standard deviation (only where a step has several seeds)."""
    by_label: dict[str, dict[int, list[float]]] = {}
    for run in result.runs:
        pts = by_label.setdefault(run["label"], {})
        for step, v in run["val_curve"]:
            pts.setdefault(int(step), []).append(v)
    means, bands = {}, {}
    for label, pts in by_label.items():
        means[label] = [[s, statistics.fmean(v)] for s, v in sorted(pts.items())]
        band = [[s, statistics.fmean(v) - statistics.stdev(v), statistics.fmean(v) + statistics.stdev(v)]
                for s, v in sorted(pts.items()) if len(v) > 1]
        if band:
            bands[label] = band
    return means, bands


def _seeds_phrase(result: ArenaResult) -> str:
    n = result.config.get("seeds", 1)
    return "one seed" if n == 1 else f"mean over {n} seeds, band ± 1 standard deviation"


def _routing_kind(st) -> str:
    """How one contestant's first MoE layer routes: "dense" (every token to every expert:
    assignment load uniform and co-activation all ones by construction), "single" (one
    expert per token: co-activation zero off the diagonal by construction) or "sparse"."""
    name = st.layer_names[0]
    co = st.coactivation(name, normalize=True)
    off = co[~torch.eye(co.shape[0], dtype=torch.bool)]
    if off.numel() == 0 or bool((off == 0).all()):
        return "single"
    if bool((co == 1).all()):
        return "dense"
    return "sparse"


def make_plots(result: ArenaResult, out: str | Path) -> list[tuple[str, Path]]:
    """Write the task's figures under ``out`` (file names start with the task); return
    ``(caption, path)`` pairs: validation loss curves (bands over seeds), routing entropy
    per gate, a load heatmap (layers x experts) per gate on one colour scale, expert
    co-activation, and for text which characters go to which expert.

    A figure or panel that is constant by construction is left out, and `omitted_figures`
    says why in a line: co-activation of a gate that sends each token to one expert
    (identity) or to all (all ones), entropy with fewer than two MoE contestants. A dense
    gate's load heatmap draws its share of the combine weight, since its assignment load is
    uniform by construction."""
    out = Path(out)
    t = result.task
    figs: list[tuple[str, Path]] = []
    means, bands = _curves(result)
    figs.append((f"Validation loss during training ({_seeds_phrase(result)})",
                 plot_curves(means, out / f"{t}_loss_curves.png", title=f"{t}: {result.dataset}", bands=bands)))
    rows = leaderboard(result)
    ent = {r["label"]: (r["entropy_norm"], r["entropy_norm_std"] or 0.0) for r in rows
           if r.get("entropy_norm") is not None}
    if ent and len(result.stats) >= 2:
        which = "mean ± std over seeds" if result.config.get("seeds", 1) > 1 else "one seed"
        figs.append((f"Routing entropy of the gate distribution, entropy / log E (1 = uniform over experts; {which}); "
                     "gates without a gate distribution are n/a",
                     plot_bars({r["label"]: ent.get(r["label"], (float("nan"), 0.0)) for r in rows
                                if r["label"] in result.stats},
                               out / f"{t}_entropy.png", ylabel="entropy / log E", title="routing entropy (validation)")))
    seed0 = "" if result.config.get("seeds", 1) == 1 else f", seed 0 of {result.config['seeds']}"
    if result.stats:
        kinds = {label: _routing_kind(st) for label, st in result.stats.items()}
        grids = {label: st.relative_grid("weight_share" if kinds[label] == "dense" else "load")
                 for label, st in result.stats.items()}
        finite = [float(v) for g in grids.values() for v in g.flatten().tolist() if v == v]
        vmin, vmax = min(finite + [1.0]), max(finite + [1.0])
        for label, st in result.stats.items():
            if kinds[label] == "dense":
                caption = (f"Share of the gate's weight per expert and layer, {label} (1 = uniform; a dense gate sends "
                           f"every token to every expert, so its assignment load is uniform by construction){seed0}")
                quantity = "weight_share"
            else:
                caption = f"Expert load per layer, {label} (1 = uniform){seed0}"
                quantity = "load"
            figs.append((caption + f"; one colour scale for all gates ({vmin:.2f} to {vmax:.2f})",
                         st.plot(out / f"{t}_load_{_slug(label)}.png", title=f"{quantity.replace('_', ' ')}, {label}",
                                 vmin=vmin, vmax=vmax, quantity=quantity)))
        informative = {label: st for label, st in result.stats.items() if kinds[label] == "sparse"}
        if informative:
            figs.append(("Expert co-activation P(j | i), first MoE layer: tokens routed to i that also go to j "
                         f"(diagonal, 1 by definition, in grey){seed0}",
                         plot_coactivation(informative, out / f"{t}_coactivation.png")))
        if result.vocab:
            figs.append(("Which characters go to which expert (first MoE layer, the 30 most frequent characters; the "
                         f"same rows in the same order for every gate){seed0}",
                         plot_token_experts(result.stats, out / f"{t}_char_experts.png", result.vocab)))
    return figs


def omitted_figures(result: ArenaResult) -> list[str]:
    """One line per figure or panel `make_plots` leaves out because it would be constant by
    construction (or say nothing the table does not)."""
    lines = []
    if not result.stats:
        return lines
    kinds = {label: _routing_kind(st) for label, st in result.stats.items()}
    single = [k for k, v in kinds.items() if v == "single"]
    dense = [k for k, v in kinds.items() if v == "dense"]
    if single:
        lines.append(f"No co-activation panel for {', '.join(single)}: one expert per token, so P(j | i) is 0 off the "
                     "diagonal by construction.")
    if dense:
        lines.append(f"No co-activation panel for {', '.join(dense)}: every token goes to every expert, so P(j | i) is "
                     "1 everywhere by construction.")
    if len(result.stats) < 2:
        lines.append("No entropy figure: one MoE contestant; its routing entropy is in the table.")
    return lines


def ranking_note(result: ArenaResult) -> str:
    """The leaderboard's order stated with its uncertainty. One seed: a plain note that the
    order is not a ranking. Several: contestants by mean validation loss; adjacent ones whose
    means differ by less than twice the standard error of the difference are joined by
    "≈" (not separated by this run), the others by "<"."""
    rows = [r for r in leaderboard(result) if r.get("val_loss") is not None]
    if len(rows) < 2:
        return ""
    n = result.config.get("seeds", 1)
    if n == 1:
        return (f"One seed per contestant: the order by validation loss ({', '.join(r['label'] for r in rows)}) is not "
                "a ranking, because how much the loss moves from seed to seed was not measured. Rerun with --seeds 3 "
                "(with --steps at half the default: 1.5 times the training steps of the default run) for means ± standard "
                "deviations and a ranking that says which differences are larger than that spread.")
    parts = [f"{rows[0]['label']} {rows[0]['val_loss']:.4f} ± {rows[0]['val_loss_std']:.4f}"]
    for a, b in zip(rows, rows[1:], strict=False):
        se = (a["val_loss_std"] ** 2 / a["seeds"] + b["val_loss_std"] ** 2 / b["seeds"]) ** 0.5
        sep = "<" if b["val_loss"] - a["val_loss"] > 2 * se else "≈"
        parts.append(f"{sep} {b['label']} {b['val_loss']:.4f} ± {b['val_loss_std']:.4f}")
    rough = " With fewer than 5 seeds this rule is a rough guide." if n < 5 else ""
    return (f"Ranking by validation loss over {n} seeds (mean ± std; \"<\" where the gap exceeds twice the standard "
            f"error of the difference, \"≈\" where it does not): " + " ".join(parts) + "." + rough)


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
img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}code{background:#f5f5f5;padding:1px 4px}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:2px 16px;font-size:14px;margin:.5em 0}
dl.kv dt{font-weight:600}dl.kv dd{margin:0}.kvhead{font-weight:700;border-bottom:1px solid #ccc}p.ranking{background:#f7f7e8;padding:6px 10px;border-left:3px solid #c9b800}
ul.omitted{font-size:13px;color:#555}summary{cursor:pointer;margin:.6em 0}"""


def options_rows(d: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``d`` flattened to ``(name, value)`` rows for a table: nested dicts as ``a.b``, None as
    "—" (not set: the default applies), lists joined with commas."""
    rows: list[tuple[str, str]] = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += options_rows(v, f"{name}.") if v else [(name, "—")]
        elif v is None:
            rows.append((name, "—"))
        elif isinstance(v, (list, tuple)):
            rows.append((name, ", ".join(str(x) for x in v) or "—"))
        elif isinstance(v, float):
            rows.append((name, f"{v:g}"))
        else:
            rows.append((name, str(v)))
    return rows


def _kv_table(rows: list[tuple[str, str]], head: tuple[str, str] = ("setting", "value")) -> str:
    """Name/value rows as a two-column definition list (the page's tables are the
    leaderboards)."""
    title = f"<div class=\"kvhead\">{html.escape(head[0])}</div><div class=\"kvhead\">{html.escape(head[1])}</div>" \
        if any(head) else ""
    body = "".join(f"<dt>{html.escape(k)}</dt><dd><code>{html.escape(v)}</code></dd>" for k, v in rows)
    return f"<dl class=\"kv\">{title}{body}</dl>"


def write_html(results: list[ArenaResult], figures: dict[str, list[tuple[str, Path]]], path: str | Path, *,
               meta: dict[str, Any] | None = None, notes: list[str] | None = None) -> Path:
    """Write one self-contained HTML page: ``meta`` (command, machine, run time; a dict
    value, such as the options, becomes its own table) and ``notes`` at the top, then per
    task its ranking statement, leaderboard, settings table and figures (``figures[task]``,
    PNGs embedded as base64 data URIs), with a line for each figure left out."""
    parts = ["<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
             "<title>gatedmoe gate arena</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             "<h1>gatedmoe gate arena</h1>"]
    if meta:
        flat = [(str(k), str(v)) for k, v in meta.items() if not isinstance(v, dict)]
        parts.append("<details open><summary>Run</summary>" + _kv_table(flat, ("", "")) + "</details>")
        for k, v in meta.items():
            if isinstance(v, dict):
                parts.append(f"<details><summary>{html.escape(str(k))}</summary>"
                             + _kv_table(options_rows(v), ("option", "value")) + "</details>")
    for res in results:
        parts.append(f"<h2>{html.escape(res.task)}: {html.escape(res.dataset)}</h2>")
        note = ranking_note(res)
        if note:
            parts.append(f"<p class=\"ranking\">{html.escape(note)}</p>")
        parts.append(_table_html(leaderboard(res)))
        cfg = {k: v for k, v in res.config.items() if k != "gates"}
        gate_args = {g: (v or "preset as the base") for g, v in res.config.get("gates", {}).items()}
        parts.append(f"<details><summary>Settings (wall time {res.seconds:.1f} s)</summary>"
                     + _kv_table(options_rows(cfg)) + "<p>Per gate, what its preset changes:</p>"
                     + _kv_table(options_rows(gate_args), ("gate", "changes")) + "</details>")
        for caption, png in figures.get(res.task, []):
            data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        omitted = omitted_figures(res)
        if omitted:
            parts.append("<ul class=\"omitted\">" + "".join(f"<li>{html.escape(x)}</li>" for x in omitted) + "</ul>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts += ["</body>", "</html>"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
