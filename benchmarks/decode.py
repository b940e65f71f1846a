"""Decode-sized MoE layers at the memory-bandwidth limit (issue 21): one GPU run, two modes.

``layer`` (default): the experts of one MoE layer given a top-k routing, T = 1, 8, 64, 256
tokens, bf16, random routing (top-k of random logits), on Mixtral (d=4096 h=14336 E=8 k=2),
Qwen3-30B-A3B (d=2048 h=768 E=128 k=8), GPT-OSS-20B (d=2880 h=2880 E=32 k=4) and DeepSeek-V3
(d=7168 h=2048 E=256 k=8). Each implementation takes ``(x [T, d], top_k_index [T, k],
top_k_weights [T, k])`` and returns ``y [T, d]`` (sorting by expert included):

* ``auto``          gatedmoe's triton backend as it chooses by size (`config.use_decode`): what
  a patched model's decode step runs
* ``decode``        gatedmoe's triton backend, decode path (``TritonOptions(decode=True)``)
* ``decode-kernels`` the same given the `Routing` (its sort by expert done beforehand, as the
  layer's gate does): the decode kernels alone
* ``triton-large``  gatedmoe's triton backend, large-batch kernels (``TritonOptions(decode=False)``;
  inference: 64-row tiles up to 32 rows per expert, `config.FEW_ROWS_CONFIGS_BF16`)
* ``hf-grouped_mm`` / ``hf-batched_mm``  transformers' experts implementations
  (`transformers.integrations.moe`); where transformers is missing, stand-ins labelled
  ``grouped_mm*`` (``torch._grouped_mm`` after a sort) and ``batched_mm*`` (``torch.bmm`` over
  weights gathered per assignment, as transformers' batched_mm does)

each timed eagerly (CUDA events around each call, synchronised: what one decode step costs
without graphs, host time included) and replayed from a CUDA graph (``+graph``: the GPU time a
captured decode step costs, the graph's launch hidden behind a GPU spin as a busy GPU hides it
between layers; the JSON keeps the replay with its launch as ``median_ms_with_launch``), with a
cold L2 before every call (`time_cold`). Before timing, every implementation is checked against
`gatedmoe.dispatch.reference_dispatch` on the benchmark's own inputs. The floor is
(distinct experts hit) x 3 d h x 2 bytes over the HBM bandwidth, measured in the same run with
a large device copy; ``floor/t`` is the fraction of it reached (the issue's target: >= 0.8 at
T >= 8). Prints the machine and a table, writes JSON (``--out``) and a plot of latency vs T
(png, same folder).

``generate``: ``generate()`` of a Qwen3-MoE-like causal LM with random weights at Qwen3-30B-A3B
width (``--gen-layers`` layers), unpatched (transformers' default experts) vs patched with
`gatedmoe.interop.hf.patch_model`, at batch 1 and 16: tokens per second, eager with the
dynamic cache and with a static cache compiled (``--gen-compile``, CUDA graphs); median of 3
calls after a warm-up call, the two models' eager calls taking turns.

    python benchmarks/decode.py --out /tmp/out/decode.json                # layer mode, GPU
    python benchmarks/decode.py --mode generate --out /tmp/out/gen.json
    python benchmarks/decode.py --mode all --sweep --out /tmp/out/decode.json
    # the decode-or-large choice: five more models, the large kernels' forward row tiles
    python benchmarks/decode.py --sweep-large --shapes mixtral qwen3-30b-a3b gpt-oss-20b deepseek-v3 \
        qwen3-235b-a22b deepseek-moe-16b olmoe-1b-7b mixtral-8x22b qwen2-57b-a14b --out /tmp/out/choice.json
    python benchmarks/decode.py --tiny --mode all --out /tmp/decode_tiny.json   # CPU check, tiny sizes
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# (d, h, E, k) per model: one MoE layer's routed experts.
SHAPES = {
    "mixtral": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "gpt-oss-20b": (2880, 2880, 32, 4),
    "deepseek-v3": (7168, 2048, 256, 8),
}
# More models for the choice between the decode and the large-batch kernels (`--shapes`;
# `config.use_decode`'s cuts were measured on all nine).
EXTRA_SHAPES = {
    "qwen3-235b-a22b": (4096, 1536, 128, 8),
    "deepseek-moe-16b": (2048, 1408, 64, 6),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "mixtral-8x22b": (6144, 16384, 8, 2),
    "qwen2-57b-a14b": (3584, 2560, 64, 8),
}
TOKENS = (1, 8, 64, 256)
TINY_SHAPES = {"tiny-a": (32, 48, 8, 2), "tiny-b": (48, 40, 16, 4)}
TINY_TOKENS = (1, 3, 8)
# GPU clock cycles `time_cold` spins before a replay's start event (~100 us at 2 GHz): longer
# than the host needs to submit a graph.
LAUNCH_COVER_CYCLES = 200_000
# transformers' batched_mm copies each assignment's expert weights: skipped above this.
BATCHED_MM_MAX_BYTES = 24 << 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["layer", "generate", "all"], default="layer")
    p.add_argument("--out", default="decode.json", help="JSON results; the plot goes beside it")
    p.add_argument("--shapes", nargs="*", default=None,
                   help=f"default {list(SHAPES)}; also {list(EXTRA_SHAPES)}")
    p.add_argument("--tokens", nargs="*", type=int, default=None, help=f"default {TOKENS}")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replays")
    p.add_argument("--sweep-large", action="store_true",
                   help="also time the large-batch kernels' forward row tiles (128, 64, 32) per cell, routing given")
    p.add_argument("--sweep", action="store_true",
                   help="also time other decode kernel configs (every T of --tokens) and print the fastest")
    p.add_argument("--gen-layers", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=64, help="new tokens per generate() call")
    p.add_argument("--gen-batches", nargs="*", type=int, default=[1, 16])
    p.add_argument("--gen-reps", type=int, default=3, help="timed generate() calls per model (default 3)")
    p.add_argument("--gen-compile", choices=["none", "cudagraphs", "inductor"], default="cudagraphs",
                   help="static-cache generate() compiled with this torch.compile backend "
                        "(inductor: mode='reduce-overhead'); none: eager only")
    p.add_argument("--gen-profile", action="store_true",
                   help="also profile one eager generate() per model and batch: operator tables, a 4-token Chrome "
                        "trace and host time per module class, beside --out")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (Triton interpreter): checks the script runs")
    args = p.parse_args(argv)
    if args.gen_reps < 1:
        p.error(f"--gen-reps must be at least 1, got {args.gen_reps}")
    return args


def setup_tiny() -> None:
    """Triton's CPU interpreter for --tiny without a GPU: set before any kernel is defined,
    plus the tests' numpy >= 2.4 shim for the interpreter (a test helper, not a library
    name; only this CPU smoke mode uses it)."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dispatch"))
    from triton_interpret import apply

    apply()


# ---------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cold(fn, device: torch.device, warmup: int, reps: int, hide_launch: bool = False) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn()``, each with a cold L2: a 256 MB buffer
    is written before every call, outside the timed interval (a decode step of one layer finds
    none of its weights in L2: the layer before read others). On CUDA each call is timed
    between two events and synchronised (host launch time counts); on CPU `time_samples`.

    ``hide_launch`` (CUDA-graph replays): the GPU spins for ~100 us before the start event, so
    the host has queued the replay when the interval starts and the interval is the GPU's time
    for the layer. In a captured decode step the layers follow each other on a busy GPU and the
    graph's launch is paid once per step, not per layer; with an idle GPU the interval would
    also hold the host's submission of the graph (1-5 us at most cells on an H200, more when
    the host is slow)."""
    from gatedmoe.bench import time_samples

    if device.type != "cuda":
        return time_samples(fn, device, warmup, reps)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.fill_(1)
        torch.cuda.synchronize(device)
        if hide_launch:
            torch.cuda._sleep(LAUNCH_COVER_CYCLES)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return sorted(times)


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {"median_ms": statistics.median(s), "p10_ms": q(0.1), "p90_ms": q(0.9), "n": len(s)}


def hbm_bandwidth(device: torch.device, time_samples, nbytes: int = 4 << 30) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), median of 20."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = statistics.median(time_samples(lambda: dst.copy_(src), device, 3, 20))
    return 2 * n * 2 / (ms * 1e-3)


def make_bank(E: int, d: int, h: int, device: torch.device, dtype: torch.dtype):
    """An `ExpertBank` allocated directly on the device (no CPU copy of 20 GB of weights)."""
    from gatedmoe.experts import ExpertBank

    with torch.device("meta"):
        bank = ExpertBank(E, d, h).to(dtype)
    bank = bank.to_empty(device=device)
    bank.reset_parameters()
    return bank.requires_grad_(False)


class HFExperts(torch.nn.Module):
    """The attributes transformers' experts functions read from an experts module
    (`transformers.integrations.moe.use_experts_implementation`), over the bank's weights:
    ``gate_up_proj [E, 2h, d]`` (gate rows first, as ExpertBank's ``w_in``), ``down_proj [E, d, h]``."""

    def __init__(self, bank) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = bank.w_in, bank.w_out
        self.num_experts = bank.n_experts
        self.has_gate, self.has_bias, self.is_transposed, self.is_concatenated = True, False, False, True
        self.has_post_expert_norm, self._is_expert_parallel = False, False
        self.act_fn = torch.nn.SiLU()

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def implementations(bank, T: int, k: int, device: torch.device, routing) -> dict:
    """name -> fn(x, top_k_index, top_k_weights) -> y, or a string saying why it is left out.
    ``routing``: the `Routing` of those indices and weights, for "decode-kernels" (the decode
    path without the sort by expert, which the layer's gate does once for all its uses)."""
    from gatedmoe import Routing
    from gatedmoe.dispatch import TritonOptions, get_backend

    triton = get_backend("triton", device)
    E, d, h = bank.n_experts, bank.d_model, bank.d_hidden

    def ours(options):
        def fn(x, idx, w):
            return triton(x, Routing.from_topk(w, idx, n_experts=E), bank, options=options)

        return fn

    decode = TritonOptions(decode=True)
    # "auto": the path the backend chooses by size (`config.use_decode`), with its configs.
    impls = {"auto": ours(TritonOptions()), "decode": ours(decode), "decode-kernels": lambda x, idx, w: triton(x, routing, bank, options=decode),
             "triton-large": ours(TritonOptions(decode=False))}
    experts = HFExperts(bank)
    gathered_bytes = T * k * 3 * d * h * bank.w_in.element_size()
    try:
        from transformers.integrations.moe import (
            batched_mm_experts_forward,
            grouped_mm_experts_forward,
        )

        impls["hf-grouped_mm"] = lambda x, idx, w: grouped_mm_experts_forward(experts, x, idx, w)
        batched = lambda x, idx, w: batched_mm_experts_forward(experts, x, idx, w)  # noqa: E731
        batched_name = "hf-batched_mm"
    except ImportError:
        impls["grouped_mm*"] = lambda x, idx, w: grouped_mm_standin(bank, x, idx, w)
        batched = lambda x, idx, w: batched_mm_standin(bank, x, idx, w)  # noqa: E731
        batched_name = "batched_mm*"
    if gathered_bytes > BATCHED_MM_MAX_BYTES:
        impls[batched_name] = f"skipped: gathers {gathered_bytes / 2**30:.0f} GiB of weights"
    else:
        impls[batched_name] = batched
    return impls


def grouped_mm_standin(bank, x, idx, w):
    """Stand-in for transformers' grouped_mm experts: sort, ``torch._grouped_mm`` twice, sum."""
    T, k = idx.shape
    e_sorted, perm = torch.sort(idx.reshape(-1))
    xs = x[perm // k]
    counts = torch.histc(e_sorted.int(), bins=bank.n_experts, min=0, max=bank.n_experts - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gu = torch._grouped_mm(xs, bank.w_in.transpose(-2, -1), offs=offs)
    g, u = gu.chunk(2, -1)
    out = torch._grouped_mm(torch.nn.functional.silu(g) * u, bank.w_out.transpose(-2, -1), offs=offs)
    out = out * w.reshape(-1)[perm, None]
    y = torch.zeros(T * k, x.shape[1], device=x.device, dtype=out.dtype).index_copy_(0, perm, out)
    return y.view(T, k, -1).sum(1).to(x.dtype)


def batched_mm_standin(bank, x, idx, w):
    """Stand-in for transformers' batched_mm experts: each assignment's weights gathered, bmm."""
    T, k = idx.shape
    e = idx.reshape(-1)
    xs = x.repeat_interleave(k, 0)
    gu = torch.bmm(bank.w_in[e], xs.unsqueeze(-1)).squeeze(-1)
    g, u = gu.chunk(2, -1)
    out = torch.bmm(bank.w_out[e], (torch.nn.functional.silu(g) * u).unsqueeze(-1)).squeeze(-1)
    return (out * w.reshape(-1, 1)).view(T, k, -1).float().sum(1).to(x.dtype)


def graphed(fn, device: torch.device):
    """``fn`` captured in a CUDA graph (replay function), or the error text if it cannot be."""
    from gatedmoe.bench.harness import capture_graph

    try:
        return capture_graph(fn, device)
    except Exception as err:  # capture refused (a host sync inside): reported, not timed
        torch.cuda.synchronize(device)
        return f"no graph: {type(err).__name__}: {str(err).splitlines()[0][:80]}"


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref64, out64 = ref.double(), out.double()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------ layer
def run_layer(args, device: torch.device, dtype: torch.dtype, shapes: dict, tokens) -> dict:
    from gatedmoe import Routing
    from gatedmoe.bench import machine_info, time_samples
    from gatedmoe.dispatch import reference_dispatch

    bw = hbm_bandwidth(device, time_samples, (4 << 30) if device.type == "cuda" else (8 << 20))
    print(f"HBM bandwidth (device copy, read+write): {bw / 1e12:.3f} TB/s", flush=True)
    rows, sweeps = [], []
    for name, (d, h, E, k) in shapes.items():
        t0 = time.perf_counter()
        bank = make_bank(E, d, h, device, dtype)
        expert_bytes = 3 * d * h * bank.w_in.element_size()
        for T in tokens:
            gen = torch.Generator(device=device).manual_seed(T)
            x = torch.randn(T, d, device=device, dtype=dtype, generator=gen)
            logits = torch.randn(T, E, device=device, generator=gen)
            w, idx = torch.topk(torch.softmax(logits, -1), k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            routing = Routing.from_topk(w, idx, n_experts=E)
            hit = int((routing.counts > 0).sum())
            floor_ms = hit * expert_bytes / bw * 1e3
            with torch.no_grad():
                ref = reference_dispatch(x, routing, bank)
                for impl, fn in implementations(bank, T, k, device, routing).items():
                    row = {"shape": name, "d": d, "h": h, "E": E, "k": k, "T": T, "impl": impl, "experts_hit": hit,
                           "rows_per_expert": T * k / hit, "floor_ms": floor_ms}
                    if isinstance(fn, str):
                        rows.append({**row, "note": fn})
                        continue
                    try:
                        out = fn(x, idx, w)
                    except Exception as exc:  # reported in the table; the run goes on
                        rows.append({**row, "note": f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"})
                        torch.cuda.empty_cache() if device.type == "cuda" else None
                        continue
                    row["rel_err"] = err = rel_err(ref, out)
                    if not err < 2e-2:  # gate: a wrong result is reported, never timed
                        rows.append({**row, "note": f"WRONG: relative error {err:.2e}"})
                        continue
                    call = lambda fn=fn, x=x, idx=idx, w=w: fn(x, idx, w)  # noqa: E731
                    rows.append({**row, **summarize(time_cold(call, device, args.warmup, args.reps))})
                    if device.type == "cuda" and not args.no_graph:
                        replay = graphed(call, device)
                        grow = {**row, "impl": impl + "+graph"}
                        if isinstance(replay, str):
                            rows.append({**grow, "note": replay})
                        else:
                            launched = statistics.median(time_cold(replay, device, args.warmup, args.reps))
                            rows.append({**grow, **summarize(time_cold(replay, device, args.warmup, args.reps, hide_launch=True)),
                                         "median_ms_with_launch": launched})
                        del replay
                if args.sweep:
                    sweeps += sweep_decode(bank, routing, x, ref, device, name, T)
                if args.sweep_large:
                    sweeps += sweep_large(bank, routing, x, ref, device, name, T)
            print_rows([r for r in rows if r["shape"] == name and r["T"] == T])
        del bank
        torch.cuda.empty_cache() if device.type == "cuda" else None
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)
    return {"machine": machine_info(device), "hbm_bytes_per_s": bw, "dtype": str(dtype), "rows": rows,
            "sweep": sweeps}


def sweep_decode(bank, routing, x, ref, device, name, T) -> list[dict]:
    """Time other decode kernel configs (passed as `TritonOptions(configs=...)`; the measured
    tables are not patched) at this shape, the routing given, as CUDA-graph replays: first the
    first product's column block, depth and stages with the second product's default config,
    then the second product's with the first's fastest. Prints the fastest of each."""
    from dataclasses import replace

    from gatedmoe.dispatch import TritonOptions, get_backend
    from gatedmoe.dispatch.triton.config import decode_configs

    triton = get_backend("triton", device)
    default = decode_configs(x.dtype, device, routing.token.numel(), bank.n_experts, bank.d_model, bank.d_hidden)
    grid = [(bn, bk, st) for bn in (16, 32, 64) for bk in (64, 128, 256) for st in (3, 4)]
    if device.type != "cuda":
        grid = [(16, 16, 1)]
    out, chosen = [], dict(default)
    for kernel in ("decode_glu", "decode_down"):
        timed = []
        for BN, BK, stages in grid:
            cfgs = {**chosen, kernel: replace(default[kernel], BN=BN, BK=BK, stages=stages)}
            opts = TritonOptions(decode=True, configs=cfgs)
            call = lambda opts=opts: triton(x, routing, bank, options=opts)  # noqa: E731
            try:
                if not rel_err(ref, call()) < 2e-2:
                    print(f"  sweep {name} T={T} {kernel} {(BN, BK, stages)}: WRONG", flush=True)
                    continue
            except Exception as exc:  # e.g. out of shared memory: skipped, reported
                print(f"  sweep {name} T={T} {kernel} {(BN, BK, stages)}: {type(exc).__name__}", flush=True)
                continue
            fn = graphed(call, device) if device.type == "cuda" else call
            if isinstance(fn, str):
                continue
            r = {"shape": name, "T": T, "kernel": kernel, "BM": default[kernel].BM, "BN": BN, "BK": BK,
                 "stages": stages, "default": (BN, BK, stages) == (default[kernel].BN, default[kernel].BK,
                                                                    default[kernel].stages),
                 **summarize(time_cold(fn, device, 3, 20, hide_launch=True))}
            timed.append(r)
        if timed:
            best = min(timed, key=lambda r: r["median_ms"])
            base = next((r for r in timed if r["default"]), None)
            chosen[kernel] = replace(default[kernel], BN=best["BN"], BK=best["BK"], stages=best["stages"])
            print(f"  sweep {name} T={T} {kernel}: fastest BN={best['BN']} BK={best['BK']} stages={best['stages']} "
                  f"{best['median_ms'] * 1e3:.1f} us (whole call); default "
                  f"{(default[kernel].BN, default[kernel].BK, default[kernel].stages)} "
                  f"{base['median_ms'] * 1e3 if base else float('nan'):.1f} us", flush=True)
        out += timed
    return out


def sweep_large(bank, routing, x, ref, device, name, T) -> list[dict]:
    """Time the large-batch kernels' two forward products with 128-row tiles (the training
    tables, `config.CONFIGS_BF16` with its rules), 64-row tiles (`config.FEW_ROWS_CONFIGS_BF16`,
    what inference takes up to 32 rows per expert), 64 rows with half the columns, and 32 rows,
    passed as `TritonOptions(configs=...)`, the routing given, as CUDA-graph replays."""
    from gatedmoe.dispatch import TritonOptions, get_backend
    from gatedmoe.dispatch.triton.config import FEW_ROWS_CONFIGS_BF16, KernelConfig, kernel_configs

    triton = get_backend("triton", device)
    train = kernel_configs(x.dtype, device, bank.d_hidden)
    variants = {
        "bm128": {k: train[k] for k in ("glu_fwd", "gemm_fwd")},
        "bm64": dict(FEW_ROWS_CONFIGS_BF16),
        "bm64_narrow": {"glu_fwd": KernelConfig(64, 64, 64, 4, 4), "gemm_fwd": KernelConfig(64, 128, 64, 4, 4)},
        "bm32": {"glu_fwd": KernelConfig(32, 64, 64, 4, 4), "gemm_fwd": KernelConfig(32, 128, 64, 4, 4)},
    }
    if device.type != "cuda":
        variants = {"interpreter": {}}
    out = []
    for variant, cfgs in variants.items():
        opts = TritonOptions(decode=False, configs=cfgs or None)
        call = lambda opts=opts: triton(x, routing, bank, options=opts)  # noqa: E731
        try:
            err = rel_err(ref, call())
        except Exception as exc:  # e.g. out of shared memory: skipped, reported
            print(f"  sweep-large {name} T={T} {variant}: {type(exc).__name__}", flush=True)
            continue
        if not err < 2e-2:
            print(f"  sweep-large {name} T={T} {variant}: WRONG ({err:.1e})", flush=True)
            continue
        fn = graphed(call, device) if device.type == "cuda" else call
        if isinstance(fn, str):
            continue
        r = {"shape": name, "T": T, "kernel": "large_forward", "variant": variant,
             "rows_per_expert": routing.token.numel() / max(1, int((routing.counts > 0).sum())),
             **summarize(time_cold(fn, device, 3, 20, hide_launch=True))}
        out.append(r)
        print(f"  sweep-large {name} T={T} {variant}: {r['median_ms'] * 1e3:.1f} us", flush=True)
    return out


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        head = f"{r['shape']:>14} T={r['T']:<4} {r['impl']:<20}"
        if "median_ms" in r:
            us = r["median_ms"] * 1e3
            print(f"{head} {us:9.1f} us  [{r['p10_ms'] * 1e3:8.1f}, {r['p90_ms'] * 1e3:8.1f}]  floor "
                  f"{r['floor_ms'] * 1e3:8.1f} us  floor/t {r['floor_ms'] / r['median_ms']:5.2f}  "
                  f"hit {r['experts_hit']:>3}  rows/e {r['rows_per_expert']:6.1f}  err {r['rel_err']:.1e}", flush=True)
        else:
            print(f"{head} {r.get('note', '')}", flush=True)


def table(rows: list[dict]) -> str:
    """Median microseconds per (shape, T) x implementation, and floor/t."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    keys = list(dict.fromkeys((r["shape"], r["T"]) for r in rows))
    cell = {(r["shape"], r["T"], r["impl"]): r for r in rows}
    lines = ["shape           T    floor_us  " + "  ".join(f"{i:>18}" for i in impls)]
    for shape, T in keys:
        floor = next(r["floor_ms"] for r in rows if (r["shape"], r["T"]) == (shape, T))
        parts = []
        for i in impls:
            r = cell.get((shape, T, i))
            if r is None or "median_ms" not in r:
                parts.append(f"{'-':>18}")
            else:
                parts.append(f"{r['median_ms'] * 1e3:9.1f} ({floor / r['median_ms']:4.2f}x)")
        lines.append(f"{shape:<14} {T:>4} {floor * 1e3:10.1f}  " + "  ".join(parts))
    lines.append("cells: median us (floor/t: the fraction of the bandwidth floor reached; 1.0 = at the floor)")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Latency against T per shape: one colour per implementation, solid as a CUDA-graph replay
    (the table's cells), dashed eager; the bandwidth floor in black."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    bases = list(dict.fromkeys(r["impl"].removesuffix("+graph") for r in rows))
    colour = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(bases)}
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        mine = [r for r in rows if r["shape"] == shape]
        Ts = sorted({r["T"] for r in mine})
        floor = {r["T"]: r["floor_ms"] for r in mine}
        ax.plot(Ts, [floor[T] * 1e3 for T in Ts], "k-", lw=2.5, alpha=0.6, label="bandwidth floor")
        for impl in dict.fromkeys(r["impl"] for r in mine):
            pts = sorted((r["T"], r["median_ms"] * 1e3) for r in mine if r["impl"] == impl and "median_ms" in r)
            if pts:
                graph = impl.endswith("+graph")
                ax.plot(*zip(*pts, strict=True), marker="o" if graph else ".", ls="-" if graph else "--",
                        color=colour[impl.removesuffix("+graph")], alpha=1.0 if graph else 0.5,
                        label=impl.removesuffix("+graph") if graph else None)
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="latency (us)", title=shape)
        ax.set_xticks(Ts, [str(T) for T in Ts])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, title="solid: CUDA graph\ndashed: eager", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# --------------------------------------------------------------------------- generate
def profile_generate(model, ids, kw: dict, device: torch.device, out: Path, tag: str) -> None:
    """One eager ``generate()`` under `torch.profiler` (CPU and, on CUDA, GPU activity): the
    operators by self CPU time and by self GPU time, written beside ``out``. Where the time of a
    host-bound decode step goes (the patched model's eager batch-16 gap). Then a timeline of a
    4-token ``generate()`` with Python frames (`with_stack`), as a gzipped Chrome trace beside
    ``out`` (chrome://tracing or Perfetto): the table sums operators, the timeline shows the
    gaps between them."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        model.generate(ids, **kw)
        sync(device)
    table_rows = prof.key_averages()
    text = [f"{tag}: {sum(e.count for e in table_rows)} operator calls",
            table_rows.table(sort_by="self_cpu_time_total", row_limit=30)]
    if device.type == "cuda":
        text.append(table_rows.table(sort_by="self_device_time_total", row_limit=20))
    path = out.with_name(f"{out.stem}_profile_{tag}.txt")
    path.write_text("\n".join(text))
    print(f"  profile: {path}", flush=True)
    short = {**kw, "max_new_tokens": 4, "min_new_tokens": 4}
    with profile(activities=activities, with_stack=True) as prof:
        model.generate(ids, **short)
        sync(device)
    raw = out.with_name(f"{out.stem}_trace_{tag}.json")
    prof.export_chrome_trace(str(raw))
    data = raw.read_bytes()
    raw.unlink()
    with gzip.open(f"{raw}.gz", "wb") as dst:
        dst.write(data)
    events = [e for e in json.loads(data)["traceEvents"] if e.get("ph") == "X"]
    # Host time inside each module class (nested: a layer's time includes its block's).
    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    for e in events:
        if e["name"].startswith("nn.Module:"):
            cls = e["name"].split(":", 1)[1].strip().rsplit("_", 1)[0]
            spent[cls] += e["dur"]
            calls[cls] += 1
    lines = [f"{tag}: host time per module class in a 4-token generate() (us, nested)"]
    lines += [f"  {cls:<40} {us:12.0f} {calls[cls]:6d} calls" for cls, us in sorted(spent.items(), key=lambda kv: -kv[1])]
    with open(path, "a") as f:
        f.write("\n\n" + "\n".join(lines) + "\n")
    print(f"  trace: {raw}.gz", flush=True)


def run_generate(args, device: torch.device, dtype: torch.dtype) -> dict:
    import copy

    import transformers

    from gatedmoe.interop.hf import patch_model

    if args.tiny:
        width = dict(hidden_size=32, moe_intermediate_size=48, intermediate_size=64, num_experts=8,
                     num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64)
    else:  # Qwen3-30B-A3B widths, fewer layers
        width = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936)
    cfg = transformers.Qwen3MoeConfig(num_hidden_layers=args.gen_layers, max_position_embeddings=1024,
                                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **width)
    torch.manual_seed(0)
    with torch.device(device):
        ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
    patched = copy.deepcopy(ref)
    patch_model(patched, check_inputs=False)
    print(f"generate: {args.gen_layers} layers, unpatched experts_implementation="
          f"{getattr(ref.config, '_experts_implementation', None)!r}, patched: gatedmoe (auto backend)", flush=True)
    prompt = 16
    results = []
    compiles = ["none"] + ([args.gen_compile] if args.gen_compile != "none" and device.type == "cuda" else [])
    for batch in args.gen_batches:
        ids = torch.randint(3, cfg.vocab_size, (batch, prompt), device=device,
                            generator=torch.Generator(device=device).manual_seed(batch))
        outs = {}
        for comp in compiles:
            models = (("unpatched", ref), ("patched", patched))
            kw = dict(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False, pad_token_id=0)
            if comp == "none":
                kw["disable_compile"] = True
            else:
                kw["cache_implementation"] = "static"
                kw["compile_config"] = transformers.CompileConfig(
                    backend=comp, mode="reduce-overhead" if comp == "inductor" else None)
            reps = 1 if args.tiny else args.gen_reps

            def timed(model, kw=kw, ids=ids):
                t0 = time.perf_counter()
                out = model.generate(ids, **kw)
                sync(device)
                return time.perf_counter() - t0, out

            warm, times = {}, {name: [] for name, _ in models}
            with torch.no_grad():
                if comp == "none":
                    # Eager: both warmed up, then the timed calls take turns, so a drift of the
                    # machine (clocks, the allocator's cache) falls on both alike.
                    for name, model in models:
                        warm[name] = timed(model)[0]
                    for _ in range(reps):
                        for name, model in models:
                            t, outs[(comp, name)] = timed(model)
                            times[name].append(t)
                else:
                    # Compiled: one model at a time (each compiled afresh after a dynamo reset,
                    # never over the recompile limit; a reset would drop the other's graphs).
                    for name, model in models:
                        torch._dynamo.reset()
                        warm[name] = timed(model)[0]
                        for _ in range(reps):
                            t, outs[(comp, name)] = timed(model)
                            times[name].append(t)
                if args.gen_profile and comp == "none":
                    for name, model in models:
                        profile_generate(model, ids, kw, device, Path(args.out), f"b{batch}_{name}")
            for name, _ in models:
                s = statistics.median(times[name])
                row = {"batch": batch, "compile": comp, "model": name, "new_tokens": args.gen_tokens, "seconds": s,
                       "seconds_each": times[name], "tokens_per_s": batch * args.gen_tokens / s,
                       "first_call_s": warm[name]}
                results.append(row)
                print(f"generate batch={batch:<3} {('static+' + comp) if comp != 'none' else 'eager':<18} "
                      f"{name:<10} {row['tokens_per_s']:9.1f} tok/s  ({s * 1e3:.0f} ms for {args.gen_tokens} tokens, "
                      f"each {', '.join(f'{t * 1e3:.0f}' for t in times[name])}; first call {warm[name]:.1f} s)",
                      flush=True)
            # Eager calls take turns, so the ratio within each round is paired: a drift of the
            # host between rounds cancels in it.
            paired = [u / p for u, p in zip(times["unpatched"], times["patched"], strict=True)]
            print(f"  patched / unpatched speed, median of the {len(paired)} rounds' ratios: "
                  f"{statistics.median(paired):.3f} [{min(paired):.3f}-{max(paired):.3f}]"
                  + (" (eager calls alternate)" if comp == "none" else " (compiled: one model after the other)"),
                  flush=True)
            results.append({"batch": batch, "compile": comp, "paired_speed_ratio": statistics.median(paired),
                            "paired_speed_ratios": paired})
            same = torch.equal(outs[(comp, "unpatched")], outs[(comp, "patched")])
            print(f"  greedy tokens patched == unpatched ({comp}): {same}", flush=True)
            results.append({"batch": batch, "compile": comp, "tokens_identical": same})
    return {"config": {**width, "layers": args.gen_layers, "prompt": prompt,
                       "experts_implementation": getattr(ref.config, "_experts_implementation", None)},
            "rows": results}


# ------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tiny:
        setup_tiny()
    from gatedmoe.bench import machine_info

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("no GPU: run with --tiny for the CPU check at tiny sizes")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(json.dumps(machine_info(device)), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {}
    if args.mode in ("layer", "all"):
        known = {**SHAPES, **EXTRA_SHAPES}
        unknown = [n for n in args.shapes or () if n not in known]
        if unknown:
            raise SystemExit(f"--shapes: unknown {unknown}; known: {list(known)}")
        shapes = TINY_SHAPES if args.tiny else {n: known[n] for n in (args.shapes or SHAPES)}
        tokens = args.tokens or (TINY_TOKENS if args.tiny else TOKENS)
        if args.tiny:
            args.warmup, args.reps = 1, 3
        result["layer"] = layer = run_layer(args, device, dtype, shapes, tokens)
        print(table(layer["rows"]))
        plot(layer["rows"], out.with_suffix(".png"))
    if args.mode in ("generate", "all"):
        if args.tiny:
            args.gen_layers, args.gen_tokens, args.gen_batches = 2, 4, [1, 2]
        result["generate"] = run_generate(args, device, dtype)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"json: {out}")


if __name__ == "__main__":
    main()
