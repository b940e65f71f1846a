"""The expert sort of given top-k choices on CUDA: the Triton counting sort `sort_topk` (what
`Routing.from_topk` runs on CUDA where it wins) against its plain-PyTorch reference (stable argsort, gathers,
histogram) in the same run:

    python3 benchmarks/topk_sort.py --out results_topk_sort.json

Per (T, E, K): random ids (each token's K distinct experts, drawn with `torch.rand(...).topk`)
and float32 weights; both results compared first (token, expert, weight, counts bit for bit).
Two timings per variant, both median of ``--reps`` after ``--warmup``:

* ``call``: each call between CUDA events with a synchronize after it (host launch time counts:
  what a decode step pays);
* ``stream``: ``--burst`` calls back to back between two events, divided by the burst (what a
  training step pays when the host runs ahead);
* ``graph``: the call captured in a CUDA graph, ``--burst`` replays between two events, divided
  by the burst (the GPU's time alone, what a captured decode step pays).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from gatedmoe.bench.harness import capture_graph, machine_info, time_samples
from gatedmoe.gates.topk_sort import sort_topk, sort_topk_applies, sort_topk_reference

_SHAPES = {  # name: (E, K)
    "deepseek-v3": (256, 8),
    "qwen3-30b-a3b": (128, 8),
    "mixtral": (8, 2),
}


def _burst_ms(fn, burst: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(burst):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / burst)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", nargs="*", default=list(_SHAPES), choices=list(_SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 8, 64, 256, 4096, 16384])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--burst", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (the counting sort is the CUDA path)")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    print(f"{'shape':>14} {'T':>6} | {'plain call':>10} {'sort call':>10} {'x':>6} | "
          f"{'plain stream':>12} {'sort stream':>11} {'x':>6} | {'plain graph':>11} {'sort graph':>10} {'x':>6}  (ms)")
    for name in args.shapes:
        E, K = _SHAPES[name]
        for T in args.tokens:
            experts = torch.rand(T, E, device=dev, generator=gen).topk(K, dim=1).indices
            weights = torch.rand(T, K, device=dev, generator=gen)
            got, want = sort_topk(weights, experts, E), sort_topk_reference(weights, experts, E)
            for g, w, what in zip(got, want, ("token", "expert", "weight", "counts"), strict=True):
                if not torch.equal(g, w.to(g.dtype)):
                    raise SystemExit(f"{name} T={T}: sort_topk's {what} differs from the reference")
            # Which of the two `Routing.from_topk` now takes at this size (`sort_topk_applies`).
            row = {"shape": name, "T": T, "E": E, "K": K, "from_topk_sorts": sort_topk_applies(weights, experts, E)}
            for label, sort in (("plain", sort_topk_reference), ("sort", sort_topk)):
                def fn(sort=sort, weights=weights, experts=experts, E=E):
                    return sort(weights, experts, E)

                samples = time_samples(fn, dev, args.warmup, args.reps)
                row[f"{label}_call_ms"] = statistics.median(samples)
                row[f"{label}_call_spread_ms"] = [samples[0], samples[-1]]
                row[f"{label}_stream_ms"] = _burst_ms(fn, args.burst, max(3, args.reps // 5))
                row[f"{label}_graph_ms"] = _burst_ms(capture_graph(fn, dev), args.burst, max(3, args.reps // 5))
            rows.append(row)
            print(f"{name:>14} {T:>6} | {row['plain_call_ms']:>10.4f} {row['sort_call_ms']:>10.4f} "
                  f"{row['plain_call_ms'] / row['sort_call_ms']:>5.2f}x | {row['plain_stream_ms']:>12.4f} "
                  f"{row['sort_stream_ms']:>11.4f} {row['plain_stream_ms'] / row['sort_stream_ms']:>5.2f}x | "
                  f"{row['plain_graph_ms']:>11.4f} {row['sort_graph_ms']:>10.4f} "
                  f"{row['plain_graph_ms'] / row['sort_graph_ms']:>5.2f}x  from_topk: "
                  f"{'sort' if row['from_topk_sorts'] else 'plain'}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(dev), "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
