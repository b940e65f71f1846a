"""Where a dispatch backend's step time goes beyond its kernels (one GPU).

    OUT=dir python3 benchmarks/gap_profile.py [--shapes mixtral,small] [--backends grouped,triton]

For each shape and backend, forward+backward (and forward alone) on forced-balanced routing:

* ``sync``: median of per-step CUDA-event timings with a synchronize after each step (what
  `gatedmoe bench` reports: host launch latency before the first kernel is exposed);
* ``pipe``: 20 steps back to back between two events (host work overlaps the GPU's);
* ``graph``: replays of a CUDA graph of one step (no host work at all), where capture works;
* ``kernels``: the sum of the CUDA kernel times of one step (torch.profiler), and the host
  CPU time per step; the kernel lists are written to ``$OUT/gap_kernels.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gatedmoe.bench import SHAPES, _time, balanced_routing, dense_ceiling
from gatedmoe.dispatch import get_backend
from gatedmoe.experts import ExpertBank


def _sync_ms(step, reps: int = 20) -> float:
    """Median of per-step event timings with a synchronize after each: `gatedmoe bench`'s own timer."""
    return _time(step, torch.device("cuda"), warmup=0, reps=reps)


def _pipe_ms(step, reps: int = 20) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(reps):
        step()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def _graph_ms(step, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.replay()
    torch.cuda.synchronize()
    return _sync_ms(g.replay, reps)


def _kernels(step, steps: int = 5) -> tuple[float, float, list[tuple[str, int, float]]]:
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", getattr(ev, "self_cuda_time_total", 0.0))
        if dev_us > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((ev.key, ev.count // steps, dev_us / steps / 1e3))
    # Host time: the profiler's own top-level ranges are not reliable across versions; time it.
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    cpu_us = (time.perf_counter() - t0) / steps * 1e6  # includes any blocking in the step
    torch.cuda.synchronize()
    rows.sort(key=lambda r: -r[2])
    return sum(r[2] for r in rows), cpu_us / 1e3, rows


def _host_us(fn, reps: int = 300) -> float:
    """Host microseconds per call of ``fn`` on tiny inputs (the GPU keeps up, so this is launch cost)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    us = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return us


def _tiny_problem(dev: torch.device):
    """``T, D, H, N, routing, bank, x, gy, a, y32``: a problem small enough that host time dominates."""
    T, D, H, E, K = 256, 256, 256, 8, 2
    r = balanced_routing(T, E, K, dev, torch.Generator(device=dev).manual_seed(0))
    bank = ExpertBank(E, D, H).to(dev, torch.bfloat16)
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    N = r.n_assignments
    a = torch.randn(N, H, device=dev, dtype=torch.bfloat16)
    y32 = torch.zeros(T, D, device=dev)
    return T, D, H, N, r, bank, x, gy, a, y32


def host_costs(out: str) -> None:
    """Host cost of each piece of a call, on a tiny problem, and the CPU op table of one step."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from gatedmoe.dispatch.triton import ops

    dev = torch.device("cuda")
    T, D, H, N, r, bank, x, gy, a, y32 = _tiny_problem(dev)
    w_in, w_out = bank.w_in.detach(), bank.w_out.detach()
    cfg = ops.CONFIGS_BF16["gemm_fwd"]
    rows = []
    raw_fwd = getattr(ops.moe_glu_forward, "_init_fn", None)
    pieces = {
        "torch.zeros [T,D] fp32": lambda: torch.zeros(T, D, device=dev),
        "index_select rows": lambda: x.detach().index_select(0, r.token),
        "cumsum counts int32": lambda: torch.cumsum(r.counts, 0, dtype=torch.int32),
        "contiguous (no-op)": lambda: x.contiguous(),
        "to(dtype) (no-op)": lambda: bank.w_in.to(torch.bfloat16),
        "TensorDescriptor.from_tensor": lambda: TensorDescriptor.from_tensor(w_out.view(-1, H), [cfg.BN, cfg.BK]),
        "launch gemm_kernel (scatter)": lambda: ops.launch_gemm(a, w_out, (D * H, 1, H), y32, r.token, r.weight, r.counts,
                                                                N, H, D, gather=False, scale=True, scatter=True, cfg=cfg,
                                                                prec="tf32"),
        "custom op forward, no grad": lambda: ops.moe_glu_forward(x.detach(), r.token, r.weight, r.counts, w_in, w_out,
                                                                  False),
        "custom op forward, with grad": lambda: ops.moe_glu_forward(x, r.token, r.weight, r.counts, bank.w_in,
                                                                    bank.w_out),
    }
    if raw_fwd is not None:
        pieces["its python function, no op"] = lambda: raw_fwd(x.detach(), r.token, r.weight, r.counts, w_in, w_out, False)
    for backend in ("grouped", "triton"):
        fn = get_backend(backend, dev)

        def fwd(fn=fn):
            with torch.no_grad():
                fn(x, r, bank)

        def fwd_bwd(fn=fn):
            x.grad = None
            for p in bank.parameters():
                p.grad = None
            fn(x, r, bank).backward(gy)

        pieces[f"{backend} dispatch fwd (no grad)"] = fwd
        pieces[f"{backend} dispatch fwd+bwd"] = fwd_bwd
    for name, fn in pieces.items():
        us = _host_us(fn)
        rows.append((name, us))
        print(f"host {us:8.1f} us  {name}")
    fn = get_backend("triton", dev)
    s = SHAPES["small"]
    rs = balanced_routing(s.tokens, s.n_experts, s.k, dev, torch.Generator(device=dev).manual_seed(0))
    bs = ExpertBank(s.n_experts, s.d_model, s.d_hidden).to(dev, torch.bfloat16)
    xs = torch.randn(s.tokens, s.d_model, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gys = torch.randn(s.tokens, s.d_model, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        fn(xs, rs, bs).backward(gys)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            bs.zero_grad(set_to_none=True)
            fn(xs, rs, bs).backward(gys)
        torch.cuda.synchronize()
    with open(os.path.join(out, "gap_host.txt"), "w") as f:
        f.write("\n".join(f"{us:8.1f} us  {name}" for name, us in rows) + "\n\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))


def python_profile(out: str) -> None:
    """cProfile of the host side: one gemm_kernel launch and a whole triton fwd+bwd, tiny sizes."""
    import cProfile
    import io
    import pstats

    from gatedmoe.dispatch.triton import ops

    dev = torch.device("cuda")
    T, D, H, N, r, bank, x, gy, a, y32 = _tiny_problem(dev)
    w_out = bank.w_out.detach()
    cfg = ops.CONFIGS_BF16["gemm_fwd"]
    fn = get_backend("triton", dev)

    def launch() -> None:
        ops.launch_gemm(a, w_out, (D * H, 1, H), y32, r.token, r.weight, r.counts, N, H, D, gather=False, scale=True,
                        scatter=True, cfg=cfg, prec="tf32")

    def step() -> None:
        x.grad = None
        bank.zero_grad(set_to_none=True)
        fn(x, r, bank).backward(gy)

    text = io.StringIO()
    for name, f in (("launch_gemm", launch), ("triton fwd+bwd", step)):
        for _ in range(20):
            f()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            f()
        pr.disable()
        torch.cuda.synchronize()
        text.write(f"==== {name} (200 calls)\n")
        pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(25)
    with open(os.path.join(out, "gap_cprofile.txt"), "w") as fh:
        fh.write(text.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="mixtral,deepseek,small,finegrained")
    ap.add_argument("--backends", default="grouped,triton")
    ap.add_argument("--host", action="store_true", help="also time the host side of each piece of a call")
    ap.add_argument("--cprofile", action="store_true", help="only: cProfile the host side of a launch and a step")
    args = ap.parse_args()
    out = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)
    dev = torch.device("cuda")
    if args.cprofile:
        python_profile(out)
        return
    if args.host:
        host_costs(out)
    ceiling = dense_ceiling(dev, torch.bfloat16)
    print(f"ceiling {ceiling:.1f} TFLOP/s")
    results = []
    for name in args.shapes.split(","):
        s = SHAPES[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        r = balanced_routing(s.tokens, s.n_experts, s.k, dev, gen)
        bank = ExpertBank(s.n_experts, s.d_model, s.d_hidden).to(dev, torch.bfloat16)
        x = torch.randn(s.tokens, s.d_model, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
        gy = torch.randn(s.tokens, s.d_model, device=dev, dtype=torch.bfloat16, generator=gen)
        flops = 3 * r.n_assignments * bank.flops_per_token()
        for backend in args.backends.split(","):
            fn = get_backend(backend, dev)

            def fwd_bwd(fn=fn, x=x, r=r, bank=bank, gy=gy) -> None:
                # Gradients accumulate into existing buffers (set_to_none would make graph
                # capture allocate): the same work either way for these backends.
                x.grad = None
                for p in bank.parameters():
                    p.grad = None
                fn(x, r, bank).backward(gy)

            def fwd(fn=fn, x=x, r=r, bank=bank) -> None:
                with torch.no_grad():
                    fn(x, r, bank)

            for pass_name, step in (("fwd+bwd", fwd_bwd), ("fwd", fwd)):
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                sync = _sync_ms(step)
                pipe = _pipe_ms(step)
                try:
                    graph = _graph_ms(step)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"  graph capture failed: {type(exc).__name__}: {str(exc)[:120]}")
                    graph = float("nan")
                kern, host, rows = _kernels(step)
                mult = 1 if pass_name == "fwd+bwd" else 1 / 3
                pct = lambda ms, f=flops * mult: 100 * f / (ms * 1e-3) / 1e12 / ceiling  # noqa: E731
                res = dict(shape=name, backend=backend, pass_=pass_name, sync_ms=sync, pipe_ms=pipe, graph_ms=graph,
                           kernel_ms=kern, host_ms=host, sync_pct=pct(sync), pipe_pct=pct(pipe), graph_pct=pct(graph),
                           kernel_pct=pct(kern))
                results.append(res)
                print(f"{name:12s} {backend:8s} {pass_name:8s} sync {sync:7.3f} ({pct(sync):4.1f}%)  pipe {pipe:7.3f} "
                      f"({pct(pipe):4.1f}%)  graph {graph:7.3f} ({pct(graph):4.1f}%)  kernels {kern:7.3f} "
                      f"({pct(kern):4.1f}%)  host {host:7.3f}")
                with open(os.path.join(out, "gap_kernels.txt"), "a") as f:
                    f.write(f"== {name} {backend} {pass_name}: kernels {kern:.3f} ms, sync {sync:.3f} ms\n")
                    for key, count, ms in rows:
                        f.write(f"{ms:9.3f} ms  x{count:<3d} {key[:150]}\n")
    with open(os.path.join(out, "gap_profile.json"), "w") as f:
        json.dump(dict(ceiling=ceiling, results=results), f, indent=1)


if __name__ == "__main__":
    main()
