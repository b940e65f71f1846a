"""`gatedmoe train`: train the char-level MoE transformer LM (default: tiny Shakespeare,
shipped with the package; `--data` a UTF-8 text file), with a progress bar, validation loss
and routing statistics. `--data table.csv` trains a TabularMoE on a table instead.
`--resume DIR` continues a run from its checkpoint (model, optimizer, schedule, random
states) up to `--steps` in total; `--eval-only DIR` evaluates a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from gatedmoe.gates import names

    p = sub.add_parser("train", help="train a small MoE language model", description=__doc__)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400, a few minutes on 2 CPU cores)")
    p.add_argument("--gate", default="topk_softmax", help=f"gate name: {', '.join(names())}")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    p.add_argument("--k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--d-model", type=int, default=None, help="model width (default 128; a table's MoE 64)")
    p.add_argument("--d-hidden", type=int, default=128, help="hidden width of each expert")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--shared-experts", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder (metrics.json, load.png, checkpoint/)")
    p.add_argument("--sample", type=int, default=200, help="characters to sample from the trained model (0: none)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--data", type=Path, default=None,
                   help="UTF-8 text file to train on (default: tiny Shakespeare), or a .csv table (TabularMoE)")
    p.add_argument("--target", default=None, help="target column of a --data CSV (default: the last column)")
    p.add_argument("--gated-attention", action="store_true", help="sigmoid output gate after attention (Qiu et al. 2025)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", type=Path, default=None, metavar="DIR",
                       help="continue training from the checkpoint in DIR (a previous --out, or its checkpoint/) "
                            "up to --steps in total; the model config comes from the checkpoint")
    group.add_argument("--eval-only", type=Path, default=None, metavar="DIR",
                       help="evaluate the checkpoint in DIR on the validation split and print routing statistics")
    p.set_defaults(func=run)


def _load_text(args: argparse.Namespace) -> str:
    from gatedmoe.data import load_tinyshakespeare

    if args.data is None:
        return load_tinyshakespeare()
    if not args.data.exists():
        raise SystemExit(f"--data {args.data} does not exist")
    try:
        return args.data.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"--data {args.data} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _moe_config(args: argparse.Namespace, base):
    """The one `MoEConfig` of the run: ``base`` (the model's default) with the flags' MoE settings."""
    changes = dict(gate=args.gate, n_experts=args.experts, k=args.k, d_hidden=args.d_hidden,
                   capacity_factor=args.capacity_factor, n_shared_experts=args.shared_experts)
    if args.d_model is not None:
        changes["d_model"] = args.d_model
    return base.replace(**changes)


def _sample(model, tok, args: argparse.Namespace) -> None:
    import torch

    if not args.sample:
        return
    start = tok.encode(tok.chars[0] if "\n" not in tok.stoi else "\n").view(1, 1).to(args.device)
    out = model.eval().generate(start, args.sample, temperature=0.8, generator=torch.Generator().manual_seed(args.seed))
    print("\nsample:\n" + tok.decode(out[0].tolist()))


def run(args: argparse.Namespace) -> int:
    if args.data is not None and args.data.suffix.lower() == ".csv":
        return _run_tabular(args)
    text = _load_text(args)
    if args.eval_only is not None:
        return _run_eval(args, text)
    from gatedmoe.models import CharTokenizer, LMConfig, train_lm

    try:
        if args.resume is not None:
            m = train_lm(text, steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device,
                         seed=args.seed, eval_every=args.eval_every, out_dir=args.out, progress=not args.no_progress,
                         resume_from=args.resume)
        else:
            m = train_lm(
                text, steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                eval_every=args.eval_every, out_dir=args.out, progress=not args.no_progress,
                moe=_moe_config(args, LMConfig.default_moe), n_layers=args.layers, seq_len=args.seq_len,
                gated_attention=args.gated_attention,
            )
    except ValueError as e:
        raise SystemExit(str(e)) from None
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

    try:
        path = find_checkpoint(args.eval_only)
        model, tok, meta = load_checkpoint(path, args.device)
        data = TextBatches(tok.encode(text), model.cfg.seq_len)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    stats = RoutingStats()
    val = evaluate_lm(model, data, args.batch_size, 8, stats=stats)
    print(f"checkpoint {path} (step {meta.get('steps')}, gate {model.cfg.moe.gate})")
    print(f"validation loss {val:.4f}")
    print("\nrouting on the validation split:")
    print(stats.format())
    _sample(model, tok, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"checkpoint": str(path), "val_loss": val, "routing": stats.summary()}, indent=1))
    print(f"\nwrote {out}/eval.json")
    return 0


def _run_tabular(args: argparse.Namespace) -> int:
    from gatedmoe.data import load_tabular
    from gatedmoe.models import TabularMoE, train_tabular

    if args.resume is not None or args.eval_only is not None:
        raise SystemExit("--resume and --eval-only are for text models; a CSV --data trains a TabularMoE from scratch")
    try:
        data = load_tabular(args.data, target=args.target)
        model = TabularMoE(data.X.shape[1], data.n_outputs, moe=_moe_config(args, TabularMoE.default_moe))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"{data.name}: {data.task}, {len(data.y)} rows, {data.X.shape[1]} features, target {data.target!r}")
    m = train_tabular(model, data.split(seed=args.seed), data.task, steps=args.steps, lr=args.lr, seed=args.seed,
                      eval_every=args.eval_every, progress=not args.no_progress)
    scores = ", ".join(f"{k[4:]} {m[k]:.4f}" for k in ("val_accuracy", "val_rmse", "val_r2") if k in m)
    print(f"\nvalidation loss {m['final_val_loss']:.4f}, {scores} after {args.steps} steps "
          f"({m['params']:,} parameters, {m['active_params']:,} active)")
    print("\nrouting on the validation split:")
    print(m["routing_stats"].format())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m["routing_stats"].plot(out / "load.png", title=f"Expert load, gate={args.gate}")
    metrics = {k: v for k, v in m.items() if k != "routing_stats"}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"\nwrote {out}/metrics.json, {out}/load.png")
    return 0
