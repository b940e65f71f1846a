"""`gatedmoe train`: train the char-level MoE transformer LM (default: tiny Shakespeare,
shipped with the package), with a progress bar, validation loss and routing statistics."""

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
    p.add_argument("--d-model", type=int, default=128)
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from gatedmoe.data import load_tinyshakespeare
    from gatedmoe.models import train_lm

    text = load_tinyshakespeare()
    m = train_lm(
        text, steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
        eval_every=args.eval_every, out_dir=args.out, progress=not args.no_progress,
        gate=args.gate, n_experts=args.experts, k=args.k, n_layers=args.layers, d_model=args.d_model,
        d_hidden=args.d_hidden, seq_len=args.seq_len, capacity_factor=args.capacity_factor,
        n_shared_experts=args.shared_experts,
    )
    print(f"\nvalidation loss {m['final_val_loss']:.4f} after {args.steps} steps "
          f"({m['tokens_per_s']:.0f} tokens/s, {m['params']:,} parameters, {m['active_params']:,} active)")
    print("\nrouting on the validation split:")
    print(m["routing_stats"].format())
    if args.sample:
        from gatedmoe.models import CharTokenizer

        tok = CharTokenizer.from_text(text)
        model = m["model"].eval()
        start = tok.encode("\n").view(1, 1).to(args.device)
        out = model.generate(start, args.sample, temperature=0.8, generator=torch.Generator().manual_seed(args.seed))
        print("\nsample:\n" + tok.decode(out[0].tolist()))
    print(f"\nwrote {args.out}/metrics.json, {args.out}/load.png, {args.out}/checkpoint/")
    summary = {"final_val_loss": m["final_val_loss"], "tokens_per_s": m["tokens_per_s"]}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary))
    return 0
