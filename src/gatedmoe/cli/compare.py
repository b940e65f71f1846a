"""`gatedmoe compare`: the gate arena. Trains the same small MoE model with several gates
(same budget, same seeds) on tiny Shakespeare (shipped) and on a table (scikit-learn's
bundled digits by default: TabularMoE with GG MoE's Gumbel-softmax gate against an MLP of
equal parameter count), then writes a leaderboard (results.json, results.csv), figures
(PNG) and a self-contained report.html.

The default run (both tasks, 5 gates on text, two runs at a time) takes about 2 minutes on
the project's 2-core machine (1 min 52 s and 2 min 03 s in two runs, 189 s of CPU time
each). One progress bar counts the training steps of all text runs.

One seed per gate (the default) gives an order, not a ranking: the report says so. With
--seeds N the report ranks the gates and marks the gaps smaller than the seed-to-seed
spread; --seeds 3 --steps 150 costs 1.5 times the default run's training steps."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from gatedmoe.cli._common import (
    HELP_FORMAT,
    UsageError,
    check_device,
    check_file,
    check_heads,
    examples,
    positive_float,
    positive_int,
    prepare_out,
    read_text,
)


def register(sub: argparse._SubParsersAction) -> None:
    from gatedmoe.arena import DEFAULT_STEPS, DEFAULT_TABULAR_GATES, DEFAULT_TEXT_GATES
    from gatedmoe.data import SKLEARN_DATASETS

    p = sub.add_parser("compare", help="train and compare gates (the gate arena): leaderboard, plots, HTML report",
                       description=__doc__, formatter_class=HELP_FORMAT, epilog=examples(
                           "gatedmoe compare                      # both tasks, the default gates, runs/compare/",
                           "gatedmoe compare --task text --gates topk_softmax,sigmoid --steps 100 --out runs/cmp",
                           "gatedmoe compare --task tabular --dataset table.csv --target label --seeds 3",
                       ))
    p.add_argument("--task", choices=["text", "tabular", "both"], default="both",
                   help="text (char-level LM), tabular, or both (default)")
    p.add_argument("--gates", default=None,
                   help=f"comma-separated gate names (default text: {','.join(DEFAULT_TEXT_GATES)}; "
                        f"tabular: {','.join(DEFAULT_TABULAR_GATES)}, plus the MLP). Given, they apply to every task; "
                        "gates that route by token id (hash) are skipped on tables")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"optimizer steps per run (default text {DEFAULT_STEPS['text']}, tabular {DEFAULT_STEPS['tabular']})")
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds per contestant; >1 reports mean ± std (default 1)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default runs/compare)")
    p.add_argument("--text", type=Path, default=None, help="UTF-8 text file for the text task (default: tiny Shakespeare)")
    p.add_argument("--dataset", default="digits",
                   help=f"table for the tabular task: {', '.join(SKLEARN_DATASETS)}, or PATH.csv (default digits)")
    p.add_argument("--target", default=None, help="target column of a CSV dataset (default: the last column)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="batch size (default text 16 x 128 chars, tabular 64 rows)")
    p.add_argument("--micro-batches", type=positive_int, default=1,
                   help="text task: gradient accumulation, forwards of --batch-size sequences per optimizer step; "
                        ">1 also reports the max load violation per micro-batch (default 1)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--eval-every", type=positive_int, default=50,
                   help="steps between validation points of the loss curves (default 50)")
    p.add_argument("--eval-batches", type=positive_int, default=16, help="validation batches per text evaluation (default 16)")
    p.add_argument("--layers", type=positive_int, default=None, help="text model: transformer blocks (default 2)")
    p.add_argument("--d-model", type=positive_int, default=None, help="text model width (default 128)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="text model context (default 128)")
    p.add_argument("--gated-attention", action="store_true",
                   help="text model: sigmoid output gate after attention (Qiu et al. 2025)")
    p.add_argument("--experts", type=positive_int, default=None, help="experts per MoE layer (default text 8, tabular 4)")
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="text runs trained at once, in worker processes (default 2, one per core)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads per run (default 1: these small models gain little from more, and lose "
                        "much when the cores are shared)")
    p.add_argument("--device", default="cpu", help="text task device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)
    _DEFAULTS.update({a.dest: a.default for a in p._actions if a.dest not in ("help",)})


# The parser's defaults, for the report's command line (only the options that differ).
_DEFAULTS: dict = {}


def _gate_list(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    from gatedmoe import gates

    names = [g.strip() for g in spec.split(",") if g.strip()]
    if not names:
        raise UsageError("--gates is empty")
    for g in names:
        try:
            gates.get(g)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return names


def _check_model_flags(args: argparse.Namespace) -> None:
    """Model flags the arena's models cannot take, refused naming the flags before any work
    (the library's messages name d_model, n_heads, k and n_experts)."""
    from gatedmoe.arena import TABULAR_MOE, TEXT_MODEL, TEXT_MOE

    tasks = {"text": TEXT_MOE, "tabular": TABULAR_MOE}
    for task, moe in tasks.items():
        if args.task in (task, "both") and args.experts is not None and args.experts < moe.k:
            raise UsageError(f"--experts {args.experts} is fewer than the {moe.k} experts per token of the {task} "
                             f"task's MoE layers; use --experts >= {moe.k}")
    if args.task in ("text", "both") and args.d_model is not None:
        check_heads(args.d_model, TEXT_MODEL["n_heads"])


def run(args: argparse.Namespace) -> int:
    import torch

    from gatedmoe.arena import (
        DEFAULT_TABULAR_GATES,
        DEFAULT_TEXT_GATES,
        TABULAR_MOE,
        TEXT_MOE,
        run_tabular_arena,
        run_text_arena,
        write_outputs,
    )
    from gatedmoe.data import SKLEARN_DATASETS, load_tabular, load_tinyshakespeare

    check_device(args.device)
    gate_names = _gate_list(args.gates)
    text = None
    if args.task in ("text", "both") and args.text is not None:
        text = read_text(args.text, "--text")
    csv_dataset = args.dataset.lower().endswith(".csv")
    if args.task in ("tabular", "both"):
        if csv_dataset:
            check_file(args.dataset, "--dataset")
        elif args.dataset not in SKLEARN_DATASETS:
            raise UsageError(f"--dataset {args.dataset!r} is neither a built-in table ({', '.join(SKLEARN_DATASETS)}) "
                             "nor a PATH.csv")
    if args.target is not None and (args.task == "text" or not csv_dataset):
        raise UsageError(f"--target names the target column of a CSV --dataset; "
                         f"{'--task text has no table' if args.task == 'text' else f'{args.dataset} has its own target'}")
    _check_model_flags(args)
    prepare_out(args.out)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    t0 = time.perf_counter()
    results = []
    if args.task in ("text", "both"):
        if text is None:
            text, name = load_tinyshakespeare(), "tiny Shakespeare"
        else:
            name = args.text.name
        model = {k: v for k, v in (("n_layers", args.layers), ("seq_len", args.seq_len)) if v is not None}
        moe = TEXT_MOE.replace(**{k: v for k, v in (("d_model", args.d_model), ("n_experts", args.experts))
                                  if v is not None})
        if args.gated_attention:
            model["gated_attention"] = True
        kw = {} if args.steps is None else {"steps": args.steps}
        if args.batch_size is not None:
            kw["batch_size"] = args.batch_size
        print(f"== text: {name}, gates {', '.join(gate_names or DEFAULT_TEXT_GATES)}", flush=True)
        res = run_text_arena(text, gate_names or DEFAULT_TEXT_GATES, seeds=args.seeds, lr=args.lr,
                             eval_every=args.eval_every, eval_batches=args.eval_batches, device=args.device,
                             model=model, moe=moe, dataset=name, progress=progress, jobs=args.jobs, threads=args.threads,
                             micro_batches=args.micro_batches, **kw)
        results.append(res)
    if args.task in ("tabular", "both"):
        data = load_tabular(args.dataset, target=args.target)
        kw = {} if args.steps is None else {"steps": args.steps}
        if args.batch_size is not None:
            kw["batch_size"] = args.batch_size
        moe = TABULAR_MOE if args.experts is None else TABULAR_MOE.replace(n_experts=args.experts)
        tab_gates = gate_names or list(DEFAULT_TABULAR_GATES)
        print(f"== tabular: {data.name} ({data.task}, {len(data.y)} rows, {data.X.shape[1]} features), "
              f"gates {', '.join(tab_gates)} + mlp", flush=True)
        try:
            res = run_tabular_arena(data, tab_gates, seeds=args.seeds, lr=args.lr, eval_every=args.eval_every,
                                    moe=moe, progress=progress, **kw)
        except ValueError as e:
            raise UsageError(f"tabular task: {e}") from None
        results.append(res)
    train_seconds = time.perf_counter() - t0
    from gatedmoe.bench import machine_info

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose")}
    defaults = {k: _DEFAULTS.get(k) for k in given}
    changed = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in given.items()
               if v != defaults[k] and v is not False]
    meta = {
        "command": " ".join(["gatedmoe compare", *changed]),
        "options (None: the task's default)": {f"--{k.replace('_', '-')}": (str(v) if isinstance(v, Path) else v)
                                                for k, v in given.items()},
        "machine": ", ".join(f"{k}={v}" for k, v in machine_info(torch.device(args.device)).items()),
        "host": platform.node(),
        "training wall time (s)": f"{train_seconds:.1f}",
    }
    out = write_outputs(results, args.out, meta=meta)
    from gatedmoe.arena.report import ranking_note

    for res in results:
        print(f"\n{res.task}: {res.dataset} ({res.seconds:.0f} s)")
        print(out["tables"][res.task])
        note = ranking_note(res)
        if note:
            print(note)
    total = time.perf_counter() - t0
    print(f"\nwrote {out['json']}, {out['csv']}, {out['html']} and {len(out['figures'])} figures "
          f"(total {total:.0f} s)")
    return 0
