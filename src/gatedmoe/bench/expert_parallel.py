"""Expert-parallel benchmark: forward + backward of an `ExpertParallelMoE` on N ranks.

Launches N processes itself (``run_ep_bench(N, ...)``, gloo on CPU, NCCL on CUDA), or runs
on the ranks of ``torchrun`` (`run_ep_bench_torchrun`). Before timing, every rank checks that
its sharded outputs equal the single-process `MoE` on its tokens. Reports tokens/s per
rank, the share of step time spent in all-to-all, load imbalance across ranks
(``max / mean - 1`` of the assignments each rank's experts receive), and the experts'
achieved FLOP/s as a fraction of a dense GEMM of the same width measured in the same run.

    gatedmoe bench --ep 2
    torchrun --nproc_per_node 2 -m gatedmoe.cli bench --ep 2

Shape legend: T tokens per rank, D model dim, H expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from gatedmoe.bench.harness import dense_gemm_tflops, machine_info
from gatedmoe.layers.moe import MoE, aux_loss
from gatedmoe.parallel.expert_parallel import shard_experts

__all__ = ["run_ep_bench", "run_ep_bench_torchrun", "under_torchrun"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# Tolerance of the pre-timing check, per dtype (outputs of one rank vs one process).
_CHECK_ATOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _machine(device: torch.device) -> str:
    info = machine_info(device)
    where = info.get("gpu") or f"{info['cpu']}, {info.get('cores')} CPUs"
    return f"{where}, torch {info['torch']}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_on_group(
    *,
    tokens_per_rank: int,
    d_model: int,
    d_hidden: int,
    n_experts: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    steps: int,
    warmup: int = 2,
) -> dict[str, Any]:
    """Run on every rank of the initialised world; returns the same summary on each."""
    W, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    moe = MoE(d_model, n_experts, d_hidden, k=k, check_inputs=False).to(device=device, dtype=dtype)
    ep = shard_experts(moe)
    g = torch.Generator(device=device).manual_seed(1 + rank)
    x = torch.randn(tokens_per_rank, d_model, generator=g, device=device, dtype=dtype)

    # Correctness gate: this rank's outputs against the single-process layer.
    with torch.no_grad():
        err = (ep(x).double() - moe(x).double()).abs().max().reshape(1)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    max_abs_err = float(err)
    check_passed = max_abs_err <= _CHECK_ATOL.get(dtype, 1e-4)
    del moe

    x.requires_grad_(True)

    def step() -> None:
        y = ep(x)
        (y.float().pow(2).mean() + aux_loss(ep)).backward()

    for _ in range(warmup):
        step()
    ep.exchange_stats.reset()
    ep.exchange_stats.timed = True
    imbalance, assignments = 0.0, 0
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
        imbalance += ep.load_imbalance()
        assignments += int(ep.rank_load()[rank])
    _sync(device)
    elapsed = time.perf_counter() - start

    per_rank = torch.tensor([elapsed, ep.exchange_stats.seconds, float(assignments)], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(per_rank) for _ in range(W)]
    dist.all_gather(gathered, per_rank)
    stats = torch.stack(gathered).cpu()
    step_s = stats[:, 0] / steps
    a2a_share = stats[:, 1] / stats[:, 0]
    # Expert FLOPs: forward, and twice that in backward (input and weight gradients).
    flops_per_assignment = 3 * ep.experts.flops_per_token()
    expert_tflops = stats[:, 2] * flops_per_assignment / stats[:, 0] / 1e12
    h_in = ep.experts.w_in.shape[1]
    # Every rank measures at once, so the ceiling sees the same contention as the steps
    # (ranks share the CPU cores, or the host); report the mean over ranks.
    dist.barrier()
    ceiling_t = torch.tensor([dense_gemm_tflops(tokens_per_rank * k, h_in, d_model, device, dtype, warmup=1, reps=20)], dtype=torch.float64, device=device)
    dist.all_reduce(ceiling_t)
    ceiling = float(ceiling_t) / W
    return {
        "machine": _machine(device),
        "backend": dist.get_backend(),
        "n_ranks": W,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_rank": tokens_per_rank,
        "d_model": d_model,
        "d_hidden": d_hidden,
        "n_experts": n_experts,
        "k": k,
        "steps": steps,
        "check_passed": check_passed,
        "max_abs_err": max_abs_err,
        "step_ms": 1e3 * float(step_s.max()),
        "tokens_per_s_per_rank": tokens_per_rank / float(step_s.max()),
        "all_to_all_share": float(a2a_share.mean()),
        "all_to_all_share_max": float(a2a_share.max()),
        "load_imbalance": imbalance / steps,
        "rank_load_last": ep.rank_load().tolist(),
        "expert_tflops_per_rank": float(expert_tflops.mean()),
        "gemm_tflops_ceiling": ceiling,
        "fraction_of_ceiling": float(expert_tflops.mean()) / ceiling,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_path: str, kwargs: dict[str, Any]) -> None:
    device = torch.device(kwargs.pop("device"))
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        # Ranks share the machine's cores; one thread each keeps them from fighting.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    try:
        result = _bench_on_group(device=device, **kwargs)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_ep_bench(
    n_ranks: int | None = 2,
    *,
    tokens_per_rank: int = 2048,
    d_model: int = 256,
    d_hidden: int = 512,
    n_experts: int = 8,
    k: int = 2,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    steps: int = 10,
) -> dict[str, Any]:
    """Benchmark an `ExpertParallelMoE` over ``n_ranks`` processes; returns a summary dict.

    If torch.distributed is already initialised (e.g. under ``torchrun``), runs on the
    world group in this process (``n_ranks`` None or equal to its size) and every rank
    returns the summary. Otherwise spawns ``n_ranks`` processes on this machine: gloo for
    ``device="cpu"``, NCCL with ``cuda:rank`` for ``device="cuda"``.

    Keys: ``tokens_per_s_per_rank`` (slowest rank), ``step_ms`` (one forward + backward,
    slowest rank), ``all_to_all_share`` (mean over ranks of all-to-all time / step time;
    ``_max`` its maximum), ``load_imbalance`` (mean over steps of ``max / mean - 1`` of
    the assignments per rank), ``check_passed`` and ``max_abs_err`` (sharded vs
    single-process outputs), ``expert_tflops_per_rank``, ``gemm_tflops_ceiling``,
    ``fraction_of_ceiling``, and the configuration and machine.

    Examples
    --------
    >>> r = run_ep_bench(2, tokens_per_rank=256, d_model=64, d_hidden=128, steps=3)  # doctest: +SKIP
    >>> r["check_passed"], r["load_imbalance"] >= 0  # doctest: +SKIP
    (True, True)
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    device = torch.device(device)
    for name, v in (("tokens_per_rank", tokens_per_rank), ("d_model", d_model), ("d_hidden", d_hidden),
                    ("n_experts", n_experts), ("k", k), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    kwargs = dict(tokens_per_rank=tokens_per_rank, d_model=d_model, d_hidden=d_hidden,
                  n_experts=n_experts, k=k, dtype=dtype, steps=steps)
    if dist.is_available() and dist.is_initialized():
        if n_ranks is not None and n_ranks != dist.get_world_size():
            raise ValueError(f"n_ranks={n_ranks} but the initialised world has {dist.get_world_size()} ranks")
        return _bench_on_group(device=device, **kwargs)
    if isinstance(n_ranks, bool) or not isinstance(n_ranks, int) or n_ranks < 1:
        raise ValueError(f"n_ranks must be a positive int, got {n_ranks!r}")
    if n_experts % n_ranks:
        raise ValueError(f"n_experts={n_experts} must be divisible by n_ranks={n_ranks}")
    if device.type == "cuda" and torch.cuda.device_count() < n_ranks:
        raise ValueError(f"n_ranks={n_ranks} needs as many GPUs; found {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(n_ranks, _free_port(), out_path, {**kwargs, "device": str(device)}), nprocs=n_ranks)
        with open(out_path) as f:
            return json.load(f)


def under_torchrun() -> bool:
    """Whether this process is one rank of ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_ep_bench_torchrun(device: torch.device | str = "cpu", **kwargs: Any) -> dict[str, Any]:
    """`run_ep_bench` on the ranks of ``torchrun``: initialises the process group (NCCL on
    ``cuda:LOCAL_RANK``, gloo on CPU), runs, and destroys it; every rank returns the summary.
    ``kwargs`` are those of `run_ep_bench` after ``n_ranks``.

    Examples
    --------
    >>> # torchrun --nproc_per_node 2 -m gatedmoe.cli bench --ep 2
    >>> r = run_ep_bench_torchrun("cpu", tokens_per_rank=256)  # doctest: +SKIP
    """
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return run_ep_bench(None, device=device, **kwargs)
    finally:
        dist.destroy_process_group()
