"""Balance scopes under gradient accumulation: the gate arena's LM on tiny Shakespeare with
the same gate (top-2 softmax, 8 experts, 2 MoE layers) and each way of balancing it.

    python benchmarks/balance_scopes.py [--steps 200] [--seeds 4] [--micro-batches 4]
        [--batch-size 4] [--jobs 2] [--out benchmarks/results_balance_scopes_cpu.json]
    python benchmarks/balance_scopes.py --replot   # table and PNG again from the JSON

Contestants (`gatedmoe.arena.run_text_arena` variants; everything else equal, per seed the
same initial weights and data order): no balancing; the balance loss (weight 0.01) at
micro-batch, sequence and global-batch scope; auxiliary-loss-free bias balancing (no loss,
update rate 1e-2, the arena's sigmoid preset) stepped after every forward or once per
optimizer step. Each optimizer step accumulates ``--micro-batches`` forwards of
``--batch-size`` sequences of 128 characters.

Reports, over seeds, the median and range (min, max) of: validation loss, and its paired
difference to the micro-batch loss (same seed: same initial weights and data); load
imbalance as max load / mean load (1 = balanced), over all validation batches together
("global", the optimizer step's view) and per validation batch of one micro-batch's size
("micro"), mean over layers; and specialisation, the mutual information between a token's
character and its experts (bits). Writes the JSON (config, rows, every run) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from cpu_machine import cpu_model  # benchmarks/, beside this script

from gatedmoe.arena import run_text_arena
from gatedmoe.data import load_tinyshakespeare

VARIANTS = {
    "none": {"load_balance_weight": 0.0},
    "loss micro_batch": {"load_balance_scope": "micro_batch"},
    "loss sequence": {"load_balance_scope": "sequence"},
    "loss global_batch": {"load_balance_scope": "global_batch"},
    "bias per forward": {"load_balance_weight": 0.0, "bias_update_rate": 1e-2, "bias_update_every": "forward"},
    "bias per step": {"load_balance_weight": 0.0, "bias_update_rate": 1e-2, "bias_update_every": "step"},
}
REFERENCE = "loss micro_batch"
# (run key, name in the table, transform): max violation + 1 is max load / mean load.
METRICS = [
    ("val_loss", "val loss", lambda v: v),
    ("max_violation", "max/mean load, global", lambda v: v + 1.0),
    ("micro_max_violation", "max/mean load, per micro-batch", lambda v: v + 1.0),
    ("char_expert_mi", "char-expert MI (bits)", lambda v: v),
]


def machine() -> str:
    return f"{os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, torch {torch.__version__}"


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rows_of(runs: list[dict]) -> list[dict]:
    """Per contestant: median and range over seeds of each metric, and of the paired
    validation-loss difference to `REFERENCE` (same seed)."""
    ref = {r["seed"]: r["val_loss"] for r in runs if r["label"] == REFERENCE}
    rows = []
    for label in VARIANTS:
        mine = sorted((r for r in runs if r["label"] == label), key=lambda r: r["seed"])
        row = {"label": label, "seeds": len(mine)}
        for key, _, f in METRICS:
            row[key] = summarize([f(r[key]) for r in mine])
        row["val_loss_minus_ref"] = summarize([r["val_loss"] - ref[r["seed"]] for r in mine])
        row["better_than_ref"] = sum(r["val_loss"] < ref[r["seed"]] for r in mine)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def cell(s: dict, fmt: str) -> str:
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])} to {fmt.format(s['max'])})"

    head = ["balancing", "val loss", f"- {REFERENCE} (paired)", "lower in", "max/mean global", "max/mean micro",
            "char-expert MI"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["label"], cell(r["val_loss"], "{:.4f}"), cell(r["val_loss_minus_ref"], "{:+.4f}"),
            f"{r['better_than_ref']}/{r['seeds']}", cell(r["max_violation"], "{:.2f}"),
            cell(r["micro_max_violation"], "{:.2f}"), cell(r["char_expert_mi"], "{:.3f}"),
        ]) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = {r["seed"]: r["val_loss"] for r in runs if r["label"] == REFERENCE}
    panels = [("val loss - loss micro_batch (same seed)", lambda r: r["val_loss"] - ref[r["seed"]]),
              ("max/mean load, global (1 = balanced)", lambda r: r["max_violation"] + 1.0),
              ("max/mean load, per micro-batch", lambda r: r["micro_max_violation"] + 1.0),
              ("char-expert mutual information (bits)", lambda r: r["char_expert_mi"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    labels = list(VARIANTS)
    for ax, (name, f) in zip(axes, panels, strict=True):
        for i, label in enumerate(labels):
            vals = [f(r) for r in runs if r["label"] == label]
            ax.scatter([i] * len(vals), vals, s=14, alpha=0.6, color="C0")
            ax.hlines(statistics.median(vals), i - 0.3, i + 0.3, color="C3", lw=2)
        ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=35, ha="right")
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(0.0, color="grey", lw=0.8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(micro_batches: int, batch_size: int, steps: int, seeds: int) -> str:
    return (f"Balancing under gradient accumulation ({micro_batches} micro-batches of {batch_size} x 128 chars, "
            f"{steps} steps, {seeds} seeds; top-2 of 8 experts)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=4, help="forwards accumulated per optimizer step")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--eval-batches", type=int, default=32, help="validation batches of --batch-size sequences")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one torch thread each)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results_balance_scopes_cpu.json"))
    p.add_argument("--replot", action="store_true", help="no training: the table and PNG again from --out's JSON")
    args = p.parse_args()
    if args.replot:
        doc = json.loads(args.out.read_text())
        cfg = doc["config"]
        print(table(rows_of(doc["runs"])))
        plot(doc["runs"], args.out.with_suffix(".png"), _title(cfg["micro_batches"], cfg["batch_size"], cfg["steps"],
                                                              cfg["seeds"]))
        return

    text = load_tinyshakespeare()
    print(machine(), flush=True)
    t0 = time.perf_counter()
    res = run_text_arena(text, ["topk_softmax"], steps=args.steps, seeds=args.seeds, batch_size=args.batch_size,
                         micro_batches=args.micro_batches, eval_batches=args.eval_batches, variants=VARIANTS,
                         jobs=args.jobs, threads=1, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    rows = rows_of(res.runs)
    md = table(rows)
    print(md)
    print(f"{len(res.runs)} runs in {seconds:.0f} s")
    command = "python benchmarks/balance_scopes.py " + " ".join(sys.argv[1:])
    doc = {"machine": machine(), "command": command.strip(), "seconds": seconds, "config": res.config,
           "reference": REFERENCE, "rows": rows, "table": md,
           "runs": [{k: v for k, v in r.items() if k != "routing"} for r in res.runs]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    png = args.out.with_suffix(".png")
    plot(res.runs, png, _title(args.micro_batches, args.batch_size, args.steps, args.seeds))
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
