"""Expert-parallel test cases, shared by the pytest process (single-process reference) and
the spawned gloo workers (sharded side), plus the spawn helper.

Each case fixes a seed, an `MoE` configuration and every rank's tokens and upstream
gradient, so both sides rebuild the same weights and data independently.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gatedmoe import MoE, aux_loss

D, E, H = 16, 8, 24
# Experts that never receive a token in the "zero_experts" case: with W=2 rank 1 owns
# experts 4..7 and gets no rows at all; with W=4 ranks 2 and 3 get none.
DEAD_EXPERTS = [1, 4, 5, 6, 7]


@dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple[int, ...]  # tokens on rank 0, 1, 2, 3 (first W used)
    moe_kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    dead_experts: tuple[int, ...] = ()
    seed: int = 0

    @property
    def uses_token_ids(self) -> bool:
        return self.moe_kwargs.get("gate") == "hash"

    @property
    def capacity(self) -> bool:
        return self.moe_kwargs.get("capacity_factor") is not None


CASES = {
    c.name: c
    for c in [
        Case("topk2", (7, 1, 12, 5), {"k": 2}, seed=1),
        Case("zero_experts", (6, 9, 3, 8), {"k": 2}, dead_experts=tuple(DEAD_EXPERTS), seed=2),
        Case("capacity", (13, 4, 9, 11), {"k": 2, "capacity_factor": 1.0}, seed=3),
        Case(
            "sigmoid_shared_k1",
            (5, 8, 2, 6),
            {"k": 1, "gate": "sigmoid", "n_shared_experts": 1, "gate_kwargs": {"bias_update_rate": 0.01}},
            seed=4,
        ),
        # Routes by token id: the layer must hand token_ids to the gate under expert parallelism.
        Case("hash", (6, 3, 9, 4), {"gate": "hash", "gate_kwargs": {"vocab_size": 50}}, seed=6),
        Case(
            "k3_gelu_bias_float64",
            (4, 6, 1, 7),
            {"k": 3, "activation": "gelu", "bias": True},
            dtype=torch.float64,
            seed=5,
        ),
    ]
}


def build_moe(case: Case) -> MoE:
    """The single-process `MoE` of ``case`` (same weights on every process)."""
    torch.manual_seed(case.seed)
    moe = MoE(D, E, H, **case.moe_kwargs).to(case.dtype)
    if case.dead_experts:
        with torch.no_grad():
            # Tokens have a positive mean (see `make_inputs`), so these logits are very
            # negative and the experts are never among the top k.
            moe.gate.weight[list(case.dead_experts)] = -5.0
    return moe


def make_inputs(case: Case, world_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tokens ``[T_r, D]`` and upstream gradients of every rank."""
    g = torch.Generator().manual_seed(1000 + case.seed)
    xs, grads = [], []
    for T in case.tokens[:world_size]:
        x = torch.randn(T, D, generator=g, dtype=torch.float64)
        if case.dead_experts:
            x = x + 2.0
        xs.append(x.to(case.dtype))
        grads.append(torch.randn(T, D, generator=g, dtype=torch.float64).to(case.dtype))
    return xs, grads


def make_token_ids(case: Case, world_size: int) -> list[torch.Tensor | None]:
    """Vocabulary ids ``[T_r]`` of every rank's tokens (None for gates that ignore them)."""
    g = torch.Generator().manual_seed(2000 + case.seed)
    return [torch.randint(0, 50, (T,), generator=g) if case.uses_token_ids else None for T in case.tokens[:world_size]]


def reference(case: Case, world_size: int) -> dict[str, Any]:
    """Single-process results: outputs and input gradients per rank, summed parameter
    gradients, per-rank auxiliary losses and counts, gate buffers after the forward.

    Loss: ``sum_r (y_r * grad_r).sum() + aux_r``. Dropless: ``y`` from one forward on the
    concatenation of all ranks' tokens, ``aux_r`` from a copy of the layer applied to rank
    r's tokens alone. Capacity: one forward per rank (capacity is per rank).
    """
    moe = build_moe(case)
    xs, grads = make_inputs(case, world_size)
    ids = make_token_ids(case, world_size)
    xs = [x.clone().requires_grad_() for x in xs]
    aux, counts = [], []
    if case.capacity:
        ys = []
        for x, gr, t in zip(xs, grads, ids, strict=True):
            y = moe(x, token_ids=t)
            a = aux_loss(moe)
            ((y * gr).sum() + a).backward()
            ys.append(y.detach())
            aux.append({k: v.detach() for k, v in moe.aux_losses.items()})
            counts.append(moe.last_routing.counts)
        param_grads = {n: p.grad for n, p in moe.named_parameters()}
    else:
        aux_moe = copy.deepcopy(moe).eval()
        aux_total = 0.0
        for x, t in zip(xs, ids, strict=True):
            routing = aux_moe.route(x, t)
            aux.append({k: v.detach() for k, v in aux_moe.aux_losses.items()})
            counts.append(routing.counts)
            aux_total = aux_total + aux_loss(aux_moe)
        y = moe(torch.cat(xs), token_ids=None if ids[0] is None else torch.cat(ids))
        ((y * torch.cat(grads)).sum() + aux_total).backward()
        ys = list(y.detach().split([x.shape[0] for x in xs]))
        aux_params = dict(aux_moe.named_parameters())
        param_grads = {}
        for n, p in moe.named_parameters():
            extra = aux_params[n].grad
            param_grads[n] = p.grad if extra is None else p.grad + extra
    return {
        "y": ys,
        "x_grad": [x.grad for x in xs],
        "param_grads": param_grads,
        "aux": aux,
        "counts": torch.stack(counts),
        "buffers": {n: b for n, b in moe.named_buffers()},
    }


def run_case_on_rank(case: Case, world_size: int, rank: int, input_grad: bool = True) -> dict[str, Any]:
    """The sharded side on this rank: same loss as `reference`, local results.

    ``input_grad=False`` leaves this rank's input without ``requires_grad``.
    """
    from gatedmoe.parallel import shard_experts

    ep = shard_experts(build_moe(case))
    xs, grads = make_inputs(case, world_size)
    x = xs[rank].clone().requires_grad_(input_grad)
    y = ep(x, token_ids=make_token_ids(case, world_size)[rank])
    ((y * grads[rank]).sum() + aux_loss(ep)).backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "param_grads": {n: p.grad for n, p in ep.named_parameters()},
        "aux": {k: v.detach() for k, v in ep.aux_losses.items()},
        "counts": ep.last_counts,
        "buffers": {n: b for n, b in ep.named_buffers()},
        "rank_load": ep.rank_load(),
        "expert_range": (ep.expert_range.start, ep.expert_range.stop),
    }


# ----------------------------------------------------------------------------- comm
def comm_send_splits(world_size: int, rank: int) -> list[int]:
    """Rows rank ``rank`` sends to each rank: uneven, zero for some pairs."""
    return [(rank + 2 * j) % 3 for j in range(world_size)]


def comm_check(world_size: int, rank: int) -> dict[str, Any]:
    """`all_to_all` of rows labelled ``[src, dst, i]``; upstream gradient ``y + 1``."""
    from gatedmoe.parallel import ExchangeStats, all_to_all

    send = comm_send_splits(world_size, rank)
    recv = [comm_send_splits(world_size, src)[rank] for src in range(world_size)]
    rows = [[rank, j, i] for j in range(world_size) for i in range(send[j])]
    x = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3).requires_grad_()
    stats = ExchangeStats(timed=True)
    y = all_to_all(x, recv, send, stats=stats)
    (y * (y.detach() + 1)).sum().backward()
    return {
        "x": x.detach(),
        "y": y.detach(),
        "x_grad": x.grad,
        "calls": stats.calls,
        "bytes_sent": stats.bytes_sent,
        "timed": stats.seconds > 0,
    }


def error_checks(world_size: int, rank: int) -> dict[str, str]:
    """Messages of the errors raised (before any collective) for bad arguments."""
    from gatedmoe.parallel import all_to_all, shard_experts

    out = {}
    try:
        shard_experts(MoE(D, 5, H))
    except ValueError as e:
        out["n_experts"] = str(e)
    try:
        all_to_all(torch.zeros(3, 2), [1] * world_size, [1] * world_size)
    except ValueError as e:
        out["splits"] = str(e)
    try:
        shard_experts(MoE(D, E, H), expert_grad_scale=0.0)
    except ValueError as e:
        out["expert_grad_scale"] = str(e)
    return out


def direct_constructor_check() -> dict[str, dict[str, torch.Tensor]]:
    """State of ``ExpertParallelMoE(...)`` and of ``shard_experts(MoE(...))``, same seed."""
    from gatedmoe.parallel import ExpertParallelMoE, shard_experts

    torch.manual_seed(7)
    direct = ExpertParallelMoE(D, E, H, k=3, n_shared_experts=1)
    torch.manual_seed(7)
    sharded = shard_experts(MoE(D, E, H, k=3, n_shared_experts=1))
    return {"direct": direct.state_dict(), "sharded": sharded.state_dict()}


# ----------------------------------------------------------------------------- DDP
DDP_CASE = Case("ddp", (6, 10, 3, 7), {"k": 2, "load_balance_weight": 0.0, "router_z_weight": 0.0}, seed=6)


def build_ddp_model() -> torch.nn.Sequential:
    """A dense layer (replicated) followed by an MoE, same weights on every process."""
    torch.manual_seed(DDP_CASE.seed)
    return torch.nn.Sequential(torch.nn.Linear(D, D), MoE(D, E, H, **DDP_CASE.moe_kwargs))


def ddp_reference(world_size: int) -> dict[str, Any]:
    """Single process: gradients of ``sum_r (y_r * grad_r).sum()`` divided by W (what
    DDP's averaging and ``expert_grad_scale=1/W`` produce)."""
    model = build_ddp_model()
    xs, grads = make_inputs(DDP_CASE, world_size)
    x = torch.cat(xs).requires_grad_()
    y = model(x)
    (y * torch.cat(grads)).sum().backward()
    return {
        "y": list(y.detach().split([t.shape[0] for t in xs])),
        "x_grad": list(x.grad.split([t.shape[0] for t in xs])),
        "param_grads": {n: p.grad / world_size for n, p in model.named_parameters()},
    }


def ddp_job(world_size: int, rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    from gatedmoe.parallel import exclude_experts_from_ddp, shard_experts

    model = build_ddp_model()
    ep_group = dist.new_group(backend="gloo")
    model[1] = shard_experts(model[1], ep_group, expert_grad_scale=1 / world_size, broadcast_replicated=False)
    if rank:
        # Replicated weights that differ must be fixed by DDP's broadcast at wrap time;
        # expert weights that DDP wrongly broadcast would fail the gradient comparison.
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].gate.weight.add_(1.0)
    ddp = DistributedDataParallel(exclude_experts_from_ddp(model))
    xs, grads = make_inputs(DDP_CASE, world_size)
    x = xs[rank].clone().requires_grad_()
    y = ddp(x)
    (y * grads[rank]).sum().backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "param_grads": {n: p.grad for n, p in model.named_parameters()},
    }


def fsdp2_job(world_size: int, rank: int) -> dict[str, Any]:
    """As `ddp_job` with FSDP2 (``fully_shard``) sharding the replicated parameters."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gatedmoe.parallel import expert_parameters, shard_experts

    model = build_ddp_model()
    ep_group = dist.new_group(backend="gloo")
    model[1] = shard_experts(model[1], ep_group, expert_grad_scale=1 / world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model, mesh=mesh, ignored_params=set(expert_parameters(model).values()))
    xs, grads = make_inputs(DDP_CASE, world_size)
    x = xs[rank].clone().requires_grad_()
    with warnings.catch_warnings():
        # FSDP2 warns that the output is a view (MoE returns ``reshape``); we do not
        # modify it in place.
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        y = model(x)
    (y * grads[rank]).sum().backward()
    param_grads = {}
    for n, p in model.named_parameters():
        # Replicated parameters are DTensors sharded over the mesh: gather them whole.
        param_grads[n] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    return {"y": y.detach(), "x_grad": x.grad, "param_grads": param_grads}


# ----------------------------------------------------------------------------- EP x FSDP2
FSDP2D_CASE = Case(
    "fsdp2d", (6, 10, 3, 7), {"k": 2, "n_shared_experts": 1, "load_balance_weight": 0.0, "router_z_weight": 0.0}, seed=8
)
FSDP2D_LR = 0.5


def build_fsdp2d_model(seed: int = FSDP2D_CASE.seed) -> torch.nn.Sequential:
    """A dense layer and an MoE whose experts carry LoRA adapters (random, B non-zero),
    everything trainable: the adapters are sharded, reduced and saved with the experts."""
    torch.manual_seed(seed)
    moe = MoE(D, E, H, **FSDP2D_CASE.moe_kwargs)
    lora = moe.experts.add_lora(3, freeze_base=False)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return torch.nn.Sequential(torch.nn.Linear(D, D), moe)


def fsdp2d_reference(world_size: int) -> dict[str, Any]:
    """One process on every rank's tokens: outputs, input gradients, the gradients of the
    mean of the ranks' losses ``(y_r * grad_r).sum()``, the parameters after one SGD step
    and the outputs after it."""
    model = build_fsdp2d_model()
    xs, grads = make_inputs(FSDP2D_CASE, world_size)
    x = torch.cat(xs).requires_grad_()
    y = model(x)
    ((y * torch.cat(grads)).sum() / world_size).backward()
    sizes = [t.shape[0] for t in xs]
    out = {
        "y": list(y.detach().split(sizes)),
        "x_grad": [g * world_size for g in x.grad.split(sizes)],
        "param_grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }
    torch.optim.SGD(model.parameters(), lr=FSDP2D_LR).step()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["y_after"] = list(model(torch.cat(xs)).detach().split(sizes))
    return out


def fsdp2d_job(world_size: int, rank: int, out_dir: str) -> dict[str, Any]:
    """Experts sharded over the "ep" axis of a (2, W/2) mesh, FSDP2 over "dp"
    (`fully_shard_expert_parallel`); one step of SGD. Gradients and parameters are
    gathered whole over dp (``full_tensor``): the experts' are this rank's ep block.
    Then the stepped model is saved (`save_expert_parallel`) and loaded into a plain
    expert-parallel model on ranks 0-1 and into another 2-D model on all ranks, both
    built from other weights; their outputs on this rank's tokens are returned."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh

    from gatedmoe.parallel import shard_experts
    from gatedmoe.parallel.checkpoint import load_expert_parallel, save_expert_parallel
    from gatedmoe.parallel.fsdp import fully_shard_expert_parallel

    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("ep", "dp"))
    pair = dist.new_group([0, 1], backend="gloo")
    try:
        fully_shard_expert_parallel(torch.nn.Linear(D, D), mesh)
    except ValueError as e:
        refused = str(e)
    model = build_fsdp2d_model()
    model[1] = shard_experts(model[1], mesh["ep"].get_group())
    # The MoE layer as its own unit around its experts' (as a transformer block would be).
    fully_shard_expert_parallel(model, mesh, blocks=[model[1]])
    # At rest: the expert weights sharded over dp too, the rest as HSDP over the mesh.
    at_rest = {
        "expert_local_shape": tuple(model[1].experts.w_in.to_local().shape),
        "gate_placements": [str(p) for p in model[1].gate.weight.placements],
    }
    xs, grads = make_inputs(FSDP2D_CASE, world_size)
    x = xs[rank].clone().requires_grad_()

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    with warnings.catch_warnings():
        # FSDP2 warns that the output is a view (MoE returns ``reshape``); we do not
        # modify it in place.
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        y = model(x)
        (y * grads[rank]).sum().backward()
        out = {"y": y.detach(), "x_grad": x.grad}
        out["param_grads"] = {n: full(p.grad) for n, p in model.named_parameters()}
        torch.optim.SGD(model.parameters(), lr=FSDP2D_LR).step()
        out["params"] = {n: full(p.detach()) for n, p in model.named_parameters()}
        out["y_after"] = model(xs[rank]).detach()
        path = os.path.join(out_dir, "ckpt_2d")
        save_expert_parallel(model, path)
        if rank < 2:
            plain = build_fsdp2d_model(seed=97)
            plain[1] = shard_experts(plain[1], pair)
            load_expert_parallel(plain, path, process_group=pair)
            out["loaded_plain_w2"] = plain(xs[rank]).detach()
        dist.barrier()
        again = build_fsdp2d_model(seed=96)
        again[1] = shard_experts(again[1], mesh["ep"].get_group())
        fully_shard_expert_parallel(again, mesh)
        load_expert_parallel(again, path)
        out["loaded_2d"] = again(xs[rank]).detach()
    out["ep_rank"], out["refused"] = model[1].rank, refused
    out.update(at_rest)
    return out


# ----------------------------------------------------------------------------- balancing
BALANCE_TOKENS, BALANCE_STEPS = 6, 3  # tokens per rank per micro-batch; micro-batches run


def build_balance_moe() -> MoE:
    """Global-batch balance loss and step-wise bias balancing on one layer."""
    torch.manual_seed(11)
    return MoE(
        D, E, H, k=2, gate="sigmoid", bias_update_rate=0.1, bias_update_every="step",
        load_balance_scope="global_batch", load_balance_weight=1.0, router_z_weight=0.0,
    )


def balance_inputs(world_size: int) -> torch.Tensor:
    """Tokens ``[micro-batch, rank, T, D]``; every rank has the same number (so the mean of
    the ranks' losses is the one-process loss on all of them)."""
    g = torch.Generator().manual_seed(3000)
    return torch.randn(BALANCE_STEPS, world_size, BALANCE_TOKENS, D, generator=g)


def run_balance(moe: MoE, xs: list[torch.Tensor]) -> dict[str, Any]:
    """Micro-batches 0 and 1 form one optimizer step (gradient accumulation), then
    `balance_step`; micro-batch 2 starts the next step. Returns each micro-batch's balance
    loss, routed counts and router probabilities, and the bias after the step."""
    from gatedmoe import balance_step

    out: dict[str, Any] = {"loss": [], "counts": [], "probs": []}
    for j, x in enumerate(xs):
        y = moe(x)
        (y.square().mean() + aux_loss(moe)).backward()
        out["loss"].append(moe.aux_losses["load_balance"].detach())
        out["counts"].append(moe.last_routing.counts)
        out["probs"].append(moe.last_routing.probs.detach())
        if j == 1:
            balance_step(moe)
            out["bias"] = moe.gate.balancer.bias.clone()
    return out


def balance_job(world_size: int, rank: int) -> dict[str, Any]:
    from gatedmoe.parallel import shard_experts

    ep = shard_experts(build_balance_moe()).train()
    return run_balance(ep, list(balance_inputs(world_size)[:, rank]))


# ----------------------------------------------------------------------------- checkpoints
CKPT_KWARGS = {"k": 2, "n_shared_experts": 1}


def ckpt_moe(seed: int) -> MoE:
    torch.manual_seed(seed)
    return MoE(D, E, H, **CKPT_KWARGS)


def ckpt_input(rank: int) -> torch.Tensor:
    return torch.randn(5, D, generator=torch.Generator().manual_seed(4000 + rank))


def checkpoint_job(world_size: int, rank: int, out_dir: str) -> dict[str, Any]:
    """On 4 ranks: 4 -> 2 (the world saves, ranks 0-1 load into a 2-rank layer built from
    other weights) and 2 -> 4 (ranks 0-1 save, the world loads). Returns the outputs of the
    loaded layers on this rank's tokens."""
    from gatedmoe.parallel import shard_experts
    from gatedmoe.parallel.checkpoint import load_expert_parallel, save_expert_parallel

    pair = dist.new_group([0, 1], backend="gloo")
    out: dict[str, Any] = {}
    save_expert_parallel(shard_experts(ckpt_moe(20)), os.path.join(out_dir, "ckpt_w4"))
    if rank < 2:
        two = shard_experts(ckpt_moe(99), pair)
        load_expert_parallel(two, os.path.join(out_dir, "ckpt_w4"), process_group=pair)
        out["4to2"] = two(ckpt_input(rank)).detach()
        save_expert_parallel(shard_experts(ckpt_moe(21), pair), os.path.join(out_dir, "ckpt_w2"), process_group=pair)
    dist.barrier()
    four = shard_experts(ckpt_moe(98))
    load_expert_parallel(four, os.path.join(out_dir, "ckpt_w2"))
    out["2to4"] = four(ckpt_input(rank)).detach()
    return out


# ----------------------------------------------------------------------------- spawning
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        results: dict[str, Any] = {name: run_case_on_rank(CASES[name], world_size, rank) for name in names}
        results["comm"] = comm_check(world_size, rank)
        results["errors"] = error_checks(world_size, rank)
        if world_size == 2:
            results["ddp"] = ddp_job(world_size, rank)
            results["fsdp2"] = fsdp2_job(world_size, rank)
        results["direct"] = direct_constructor_check()
        results["balance"] = balance_job(world_size, rank)
        if world_size == 4:
            results["checkpoint"] = checkpoint_job(world_size, rank, out_dir)
            results["fsdp2d"] = fsdp2d_job(world_size, rank, out_dir)
        results["mixed_input_grad"] = run_case_on_rank(CASES["topk2"], world_size, rank, input_grad=rank == 0)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world_size: int, out_dir: str, names: list[str], timeout: float = 80.0) -> list[dict]:
    """Run the cases ``names`` (and the comm, error and DDP checks) on ``world_size`` gloo
    processes; return each rank's saved results.

    Fails (and kills the workers) after ``timeout`` seconds, so a collective that
    deadlocks fails the test instead of hanging CI.
    """
    ctx = mp.start_processes(
        _worker,
        args=(world_size, free_port(), out_dir, names),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world_size} workers did not finish in {timeout} s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
