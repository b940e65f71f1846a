"""Training quality with FP8 expert GEMMs (issue 20, item 4): `train_lm` on Tiny Shakespeare
twice with the same seed, the Triton backend without and with ``TritonOptions(fp8=FP8Recipe())``,
both validation curves in one plot and the final losses side by side:

    python3 benchmarks/fp8_train.py --out $OUT/fp8_train --steps 2000 --d-model 512 --d-hidden 1024 \\
        --experts 8 --k 2 --layers 4 --seq-len 256 --batch-size 64

``--runs fp8`` trains one of the two; a run not trained now is read from
``<out>/<run>/metrics.json`` if an earlier call left it there (so the two fit in two device
calls of ten minutes each), and the summary and plot are written once both exist.

``--precision bf16`` (default) trains both under bf16 autocast (`train_lm`'s ``precision``):
the baseline's expert GEMMs in bf16, the FP8 run's quantised from bf16; ``--precision float32``
compares against float32 expert GEMMs instead. Master weights and AdamW stay float32 either
way. Widths must be multiples of the block (128). Writes ``<out>/{baseline,fp8}/metrics.json``, ``<out>/val_loss.png`` and
``<out>/summary.json`` (final validation losses and their relative difference; the issue asks
for it within 1%).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gatedmoe.data import load_tinyshakespeare
from gatedmoe.dispatch import FP8Recipe, TritonOptions
from gatedmoe.models import LMConfig, train_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=128, help="FP8Recipe block (the CUDA kernels take 128)")
    ap.add_argument("--scaling", default="rowwise", choices=["rowwise", "blockwise"], help="FP8Recipe.scaling")
    ap.add_argument("--grad-format", default="e4m3", choices=["e4m3", "e5m2"], help="FP8Recipe.grad_format")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "float32"], help="train_lm's precision (both runs)")
    ap.add_argument("--runs", default="baseline,fp8", help="which of baseline,fp8 to train now")
    args = ap.parse_args()
    train_now = args.runs.split(",")
    if not train_now or any(r not in ("baseline", "fp8") for r in train_now):
        ap.error(f"--runs: a comma list of baseline, fp8; got {args.runs!r}")
    text = load_tinyshakespeare()
    runs = {"baseline": TritonOptions(), "fp8": TritonOptions(fp8=FP8Recipe(scaling=args.scaling, grad_format=args.grad_format, block=args.block))}
    curves, final = {}, {}
    for name, options in runs.items():
        if name not in train_now:
            earlier = args.out / name / "metrics.json"
            if earlier.exists():
                m = json.loads(earlier.read_text())
                if m["schedule"].get("precision", "float32") != args.precision:
                    raise SystemExit(f"{earlier} was trained in {m['schedule'].get('precision', 'float32')}, "
                                     f"not --precision {args.precision}: train it again")
                curves[name], final[name] = m["val_loss"], m["final_val_loss"]
                print(f"{name}: read from {earlier}: validation loss {m['final_val_loss']:.4f}", flush=True)
            continue
        moe = LMConfig.default_moe.replace(d_model=args.d_model, d_hidden=args.d_hidden, n_experts=args.experts,
                                           k=args.k, backend="triton", backend_options=options)
        m = train_lm(text, steps=args.steps, batch_size=args.batch_size, device=args.device, seed=args.seed,
                     eval_every=args.eval_every, out_dir=args.out / name, progress=False, moe=moe,
                     n_layers=args.layers, seq_len=args.seq_len, precision=args.precision)
        curves[name], final[name] = m["val_loss"], m["final_val_loss"]
        print(f"{name}: validation loss {m['final_val_loss']:.4f}, {m['tokens_per_s']:.0f} tokens/s", flush=True)
    if len(final) < 2:
        print(f"summary waits for {', '.join(sorted(set(runs) - set(final)))}: train it with --runs")
        return
    rel = (final["fp8"] - final["baseline"]) / final["baseline"]
    summary = {"final_val_loss": final, "relative_difference": rel, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"FP8 vs baseline: {100 * rel:+.2f}% validation loss")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("FP8 expert GEMMs vs the Triton baseline, same seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "val_loss.png", dpi=120)


if __name__ == "__main__":
    main()
