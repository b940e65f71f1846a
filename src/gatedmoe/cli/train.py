"""`gatedmoe train`: train the char-level MoE transformer LM (default: tiny Shakespeare,
shipped with the package; `--data` a UTF-8 text file), with a progress bar, validation loss
and routing statistics. `--data table.csv` trains a TabularMoE on a table instead (its model
goes to `--out`/model/, for `gatedmoe predict`).
`--resume DIR` continues a run from its checkpoint (model, optimizer, schedule, random
states) up to `--steps` in total; `--eval-only DIR` evaluates a checkpoint."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from gatedmoe.cli._common import (
    HELP_FORMAT,
    UsageError,
    check_device,
    check_file,
    check_heads,
    check_k,
    examples,
    nonneg_int,
    positive_float,
    positive_int,
    prepare_out,
    read_text,
)

# Flags that set the model; on --resume the model comes from the checkpoint, so a flag given
# with another value is refused. (flag, argparse dest, default, where the checkpoint's config
# keeps it).
MODEL_FLAGS = [
    ("--gate", "gate", "topk_softmax", "moe.gate"),
    ("--experts", "experts", 8, "moe.n_experts"),
    ("--k", "k", 2, "moe.k"),
    ("--layers", "layers", 4, "n_layers"),
    ("--d-model", "d_model", None, "d_model"),
    ("--d-hidden", "d_hidden", 128, "moe.d_hidden"),
    ("--seq-len", "seq_len", 128, "seq_len"),
    ("--capacity-factor", "capacity_factor", None, "moe.capacity_factor"),
    ("--shared-experts", "shared_experts", 0, "moe.n_shared_experts"),
    ("--gated-attention", "gated_attention", False, "gated_attention"),
]

# Flags of the text model and its training only (flag, argparse dest): a CSV --data trains a
# TabularMoE, which has none of these, so a CSV run refuses them rather than ignoring them.
TEXT_ONLY_FLAGS = [
    ("--layers", "layers"),
    ("--seq-len", "seq_len"),
    ("--micro-batches", "micro_batches"),
    ("--lr-schedule", "lr_schedule"),
    ("--schedule-steps", "schedule_steps"),
    ("--gated-attention", "gated_attention"),
    ("--precision", "precision"),
    ("--sample", "sample"),
]


def register(sub: argparse._SubParsersAction) -> None:
    from gatedmoe.gates import names

    p = sub.add_parser("train", help="train a small MoE language model (or, on a CSV, a TabularMoE)",
                       description=__doc__, formatter_class=HELP_FORMAT, epilog=examples(
                           "gatedmoe train --steps 50 --out runs/tiny        # a short run on tiny Shakespeare",
                           "gatedmoe train --resume runs/tiny --steps 100 --out runs/tiny   # 50 steps more",
                           "gatedmoe train --eval-only runs/tiny --out runs/tiny-eval",
                           "gatedmoe train --data table.csv --target label --out runs/table  # then gatedmoe predict",
                       ))
    p.add_argument("--steps", type=positive_int, default=400,
                   help="optimizer steps in total (default 400, a few minutes on 2 CPU cores); with --resume, the total "
                        "to reach")
    # Model flags default to None so that --resume can tell a flag given from a default.
    p.add_argument("--gate", default=None, help=f"gate name (default topk_softmax): {', '.join(names())}")
    p.add_argument("--experts", type=positive_int, default=None, help="experts per MoE layer (default 8)")
    p.add_argument("--k", type=positive_int, default=None, help="experts per token (default 2)")
    p.add_argument("--layers", type=positive_int, default=None, help="transformer blocks (default 4)")
    p.add_argument("--d-model", type=positive_int, default=None, help="model width (default 128; a table's MoE 64)")
    p.add_argument("--d-hidden", type=positive_int, default=None, help="hidden width of each expert (default 128)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="context length (default 128)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="sequences per step (default 32; rows per step for a CSV, default 64)")
    p.add_argument("--micro-batches", type=positive_int, default=None,
                   help="gradient accumulation: forwards of --batch-size sequences per optimizer step (default 1; "
                        "with --resume, the checkpoint's)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default 3e-3; with --resume, the checkpoint's)")
    p.add_argument("--lr-schedule", choices=["inverse_sqrt", "cosine"], default=None,
                   help="inverse_sqrt (default): 20 warm-up steps, then lr*sqrt(20/step); it depends on the step "
                        "only, so --steps 10 then --resume to 14 gives the model of --steps 14. cosine: decay to 10%% "
                        "over --schedule-steps (default --steps), for a budget known in advance. --resume keeps "
                        "the checkpoint's schedule")
    p.add_argument("--schedule-steps", type=positive_int, default=None,
                   help="horizon of the cosine schedule (default --steps of the first run)")
    p.add_argument("--capacity-factor", type=positive_float, default=None,
                   help="each expert keeps at most capacity-factor x its even share of the assignments and drops "
                        "the rest (Switch Transformers; default: none dropped)")
    p.add_argument("--shared-experts", type=nonneg_int, default=None,
                   help="experts every token also goes through (DeepSeekMoE; default 0)")
    p.add_argument("--seed", type=nonneg_int, default=None, help="random seed (default 0; with --resume, the checkpoint's "
                   "random states continue)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--precision", choices=["float32", "bf16"], default=None,
                   help="float32 (default) or bf16 mixed precision (torch.autocast; float32 weights and optimizer); "
                        "with --resume, the checkpoint's")
    p.add_argument("--eval-every", type=positive_int, default=100, help="steps between validation losses (default 100)")
    p.add_argument("--out", type=Path, default=Path("runs/train"),
                   help="output folder (default runs/train): metrics.json, load.png, and the model: checkpoint/ "
                        "for text, model/ for a CSV")
    p.add_argument("--sample", type=nonneg_int, default=None,
                   help="characters to sample from the trained model (default 200; 0: none)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--data", type=Path, default=None,
                   help="UTF-8 text file to train on (default: tiny Shakespeare), or a .csv table (TabularMoE)")
    p.add_argument("--target", default=None, help="target column of a --data CSV (default: the last column)")
    p.add_argument("--gated-attention", action="store_true", default=None,
                   help="sigmoid output gate after attention (Qiu et al. 2025)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", type=Path, default=None, metavar="DIR",
                       help="continue training from the checkpoint in DIR (a previous --out, or its checkpoint/) "
                            "up to --steps in total; the model, learning rate and schedule come from the checkpoint "
                            "(model flags that disagree are refused)")
    group.add_argument("--eval-only", type=Path, default=None, metavar="DIR",
                       help="evaluate the checkpoint in DIR on the validation split and print routing statistics")
    p.set_defaults(func=run)


def _load_text(args: argparse.Namespace) -> str:
    from gatedmoe.data import load_tinyshakespeare

    if args.data is None:
        return load_tinyshakespeare()
    return read_text(args.data, "--data")


def _value(args: argparse.Namespace, dest: str, default):
    v = getattr(args, dest)
    return default if v is None else v


def _moe_config(args: argparse.Namespace, base):
    """The one `MoEConfig` of the run: ``base`` (the model's default) with the flags' MoE settings."""
    changes = dict(gate=_value(args, "gate", "topk_softmax"), n_experts=_value(args, "experts", 8),
                   k=_value(args, "k", 2), d_hidden=_value(args, "d_hidden", 128),
                   capacity_factor=args.capacity_factor, n_shared_experts=_value(args, "shared_experts", 0))
    if args.d_model is not None:
        changes["d_model"] = args.d_model
    return base.replace(**changes)


def _check_model_flags(args: argparse.Namespace, text: bool) -> None:
    """Model flags of a new run that contradict each other, refused naming the flags before
    any work. ``text``: the language model, whose width the attention heads must divide."""
    import inspect

    from gatedmoe import gates
    from gatedmoe.models import LMConfig

    if gates.get(_value(args, "gate", "topk_softmax")).uses_k:
        check_k(_value(args, "k", 2), _value(args, "experts", 8), "" if args.experts is not None else "the default")
    if text and args.d_model is not None:
        check_heads(args.d_model, inspect.signature(LMConfig).parameters["n_heads"].default)


def _check_resume_flags(args: argparse.Namespace, path: Path) -> dict:
    """Refuse model flags that disagree with the checkpoint in ``path`` (one message listing
    all); return its train_state.json."""
    from gatedmoe.models import LMConfig
    from gatedmoe.models.checkpoint_io import read_json

    cfg = LMConfig.from_dict(read_json(path / "model.json")["config"])
    info = read_json(path / "train_state.json") if (path / "train_state.json").exists() else {}
    diffs = []
    for flag, dest, _, where in MODEL_FLAGS:
        given = getattr(args, dest)
        have = cfg
        for part in where.split("."):
            have = getattr(have, part)
        if given is not None and given != have:
            diffs.append(f"{flag} {given} (checkpoint: {have})")
    for flag, dest, key in (("--seed", "seed", "seed"), ("--lr", "lr", "lr"), ("--lr-schedule", "lr_schedule", "schedule"),
                            ("--schedule-steps", "schedule_steps", "schedule_steps"),
                            ("--precision", "precision", "precision")):
        given = getattr(args, dest)
        if given is not None and key in info and given != info[key]:
            diffs.append(f"{flag} {given} (checkpoint: {info[key]})")
    if diffs:
        raise UsageError(f"--resume {args.resume}: the checkpoint fixes the model, learning rate and schedule, but "
                         f"{'; '.join(diffs)}; leave these flags out to continue it, or start a new run without --resume")
    done = info.get("step")
    if done is not None and args.steps <= done:
        raise UsageError(f"--resume {args.resume}: nothing to train, the checkpoint is at step {done} and --steps "
                         f"{args.steps} is the total to reach; give --steps > {done} (or --eval-only to evaluate it)")
    return info


def _sample(model, tok, args: argparse.Namespace) -> None:
    import torch

    n = _value(args, "sample", 200)
    if not n:
        return
    start = tok.encode(tok.chars[0] if "\n" not in tok.stoi else "\n").view(1, 1).to(args.device)
    out = model.eval().generate(start, n, temperature=0.8,
                                generator=torch.Generator().manual_seed(_value(args, "seed", 0)))
    print("\nsample:\n" + tok.decode(out[0].tolist()))


def run(args: argparse.Namespace) -> int:
    from gatedmoe import gates

    check_device(args.device)
    if args.gate is not None:
        gates.get(args.gate)
    csv_data = args.data is not None and args.data.suffix.lower() == ".csv"
    if args.resume is None and args.eval_only is None:
        # A checkpoint's model is checked against the flags given by _check_resume_flags.
        _check_model_flags(args, text=not csv_data)
    if csv_data:
        return _run_tabular(args)
    if args.target is not None:
        raise UsageError(f"--target names the target column of a CSV --data; {args.data or 'tiny Shakespeare'} "
                         "is text (a language model has no target column)")
    if args.lr_schedule != "cosine" and args.schedule_steps is not None and args.resume is None:
        raise UsageError("--schedule-steps sets the horizon of --lr-schedule cosine; add --lr-schedule cosine")
    text = _load_text(args)
    if args.eval_only is not None:
        return _run_eval(args, text)
    from gatedmoe.models import CharTokenizer, LMConfig, find_checkpoint, train_lm

    if args.resume is not None:
        path = find_checkpoint(args.resume)
        info = _check_resume_flags(args, path)
        prepare_out(args.out)
        if info.get("schedule") == "cosine" and args.steps > info["schedule_steps"]:
            print(f"note: the checkpoint's cosine schedule ends at step {info['schedule_steps']}; steps "
                  f"{info['schedule_steps'] + 1}-{args.steps} run at its final learning rate (10%)")
        m = train_lm(text, steps=args.steps, batch_size=args.batch_size or 32, lr=args.lr, device=args.device,
                     micro_batches=args.micro_batches or info.get("micro_batches", 1),
                     eval_every=args.eval_every, out_dir=args.out, progress=not args.no_progress,
                     resume_from=path, precision=args.precision)
    else:
        prepare_out(args.out)
        m = train_lm(
            text, steps=args.steps, batch_size=args.batch_size or 32, lr=args.lr, device=args.device,
            micro_batches=args.micro_batches or 1, seed=_value(args, "seed", 0), eval_every=args.eval_every, out_dir=args.out, progress=not args.no_progress,
            schedule=args.lr_schedule or "inverse_sqrt", schedule_steps=args.schedule_steps,
            moe=_moe_config(args, LMConfig.default_moe), n_layers=_value(args, "layers", 4),
            seq_len=_value(args, "seq_len", 128), gated_attention=bool(args.gated_attention),
            precision=args.precision,
        )
    if m["resumed_from_step"] is not None:
        print(f"resumed from step {m['resumed_from_step']}")
    print(f"\nvalidation loss {m['final_val_loss']:.4f} after {m['steps']} steps "
          f"({m['tokens_per_s']:.0f} tokens/s, {m['params']:,} parameters, {m['active_params']:,} active)")
    print("\nrouting on the validation split:")
    print(m["routing_stats"].format())
    _sample(m["model"], CharTokenizer.from_text(text), args)
    print(f"\nwrote {args.out}/metrics.json, {args.out}/load.png, {args.out}/checkpoint/")
    summary = {"final_val_loss": m["final_val_loss"], "tokens_per_s": m["tokens_per_s"]}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary))
    return 0


def _run_eval(args: argparse.Namespace, text: str) -> int:
    from gatedmoe.analysis import RoutingStats
    from gatedmoe.models import TextBatches, evaluate_lm, find_checkpoint, load_checkpoint
    from gatedmoe.models.checkpoint_io import read_json

    path = find_checkpoint(args.eval_only)
    out = prepare_out(args.out)
    model, tok, meta = load_checkpoint(path, args.device)
    try:
        data = TextBatches(tok.encode(text), model.cfg.seq_len)
    except ValueError as e:
        raise UsageError(f"--eval-only {args.eval_only}: {e}") from None
    stats = RoutingStats()
    # The precision it was trained in, unless asked otherwise.
    state = path / "train_state.json"
    precision = args.precision or (read_json(state).get("precision") if state.exists() else None)
    val = evaluate_lm(model, data, args.batch_size or 32, 8, stats=stats, precision=precision or "float32")
    print(f"checkpoint {path} (step {meta.get('steps')}, gate {model.cfg.moe.gate})")
    print(f"validation loss {val:.4f}")
    print("\nrouting on the validation split:")
    print(stats.format())
    _sample(model, tok, args)
    (out / "eval.json").write_text(json.dumps({"checkpoint": str(path), "val_loss": val, "routing": stats.summary()}, indent=1))
    print(f"\nwrote {out}/eval.json")
    return 0


def _run_tabular(args: argparse.Namespace) -> int:
    from gatedmoe.data import load_tabular
    from gatedmoe.models import TabularMoE, save_tabular_model, train_tabular

    if args.resume is not None or args.eval_only is not None:
        raise UsageError("--resume and --eval-only are for text models; a CSV --data trains a TabularMoE from scratch")
    given = [flag for flag, dest in TEXT_ONLY_FLAGS if getattr(args, dest) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: for text models only; a CSV --data trains a TabularMoE (in float32, "
                         "no layers, context or sampling), so leave them out")
    if check_device(args.device).type != "cpu":
        raise UsageError(f"--device {args.device}: a CSV --data trains a TabularMoE on cpu; leave --device out")
    check_file(args.data, "--data")
    out = prepare_out(args.out)
    data = load_tabular(args.data, target=args.target)
    model = TabularMoE(data.X.shape[1], data.n_outputs, moe=_moe_config(args, TabularMoE.default_moe))
    print(f"{data.name}: {data.task}, {len(data.y)} rows, {data.X.shape[1]} features, target {data.target!r}"
          + (f"; categorical: {', '.join(data.categories)}" if data.categories else ""))
    seed = _value(args, "seed", 0)
    prep = data.preprocessing(seed=seed)  # what data.split(seed=seed) and train_tabular do to the rows
    m = train_tabular(model, data.split(seed=seed), data.task, steps=args.steps, batch_size=args.batch_size or 64,
                      lr=_value(args, "lr", 3e-3), seed=seed, eval_every=args.eval_every,
                      progress=not args.no_progress)
    scores = ", ".join(f"{k[4:]} {m[k]:.4f}" for k in ("val_accuracy", "val_rmse", "val_r2") if k in m)
    print(f"\nvalidation loss {m['final_val_loss']:.4f}, {scores} after {args.steps} steps "
          f"({m['params']:,} parameters, {m['active_params']:,} active)")
    print("\nrouting on the validation split:")
    print(m["routing_stats"].format())
    m["routing_stats"].plot(out / "load.png", title=f"Expert load, gate={model.moe.config.gate}")
    metrics = {k: v for k, v in m.items() if k != "routing_stats"}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    # JSON has no NaN (R^2 of a constant target): null, so that every JSON reader takes the file.
    summary = {k: metrics[k] if math.isfinite(metrics[k]) else None
               for k in ("steps", "seed", "final_val_loss", "val_accuracy", "val_rmse", "val_r2") if k in metrics}
    save_tabular_model(out / "model", model, prep, extra={"data": str(args.data), "metrics": summary})
    print(f"\nwrote {out}/metrics.json, {out}/load.png and the model, {out}/model/ "
          f"(predict new rows: gatedmoe predict {out} rows.csv)")
    return 0
