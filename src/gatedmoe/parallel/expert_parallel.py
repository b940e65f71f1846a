"""Expert parallelism: the experts of an `MoE` sharded over the ranks of a process group.

Each rank holds its own tokens, a replica of the gate (and of the shared experts), and
``E / W`` of the routed experts: rank r owns experts ``[r * E/W, (r + 1) * E/W)``.
One forward on rank r:

1. route the rank's own tokens with the replicated gate (auxiliary losses, capacity and
   `last_routing` are those of the single-process `MoE` applied to these tokens);
2. all-gather the per-expert counts (``[W, E]``, a few integers) so every rank knows how
   many rows it sends to and receives from each rank, and the load of every rank;
3. gather the routed rows in expert order; as experts are sharded contiguously, that is
   already grouped by destination rank: one all-to-all sends them;
4. run the local experts on the received rows with the same dispatch backend as `MoE`
   (``gatedmoe.dispatch.get_backend``), with unit weights;
5. the reverse all-to-all brings each output row back to the rank that sent it, where it
   is scaled by its combine weight and summed into its token, exactly as in
   `grouped_dispatch`.

The backward pass runs the exchanges in reverse, so each expert's weight gradient sums
the contributions of every rank's tokens.

Shape legend: T tokens on this rank, D model dim, E experts (global), L = E / W local
experts, W ranks, N assignments routed from this rank, M assignments received.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gatedmoe.dispatch import DispatchFn, get_backend
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.layers.moe import MoE
from gatedmoe.parallel.comm import ExchangeStats, all_gather_counts, all_to_all
from gatedmoe.routing import Routing

__all__ = [
    "ExpertParallelMoE",
    "exclude_experts_from_ddp",
    "expert_parallel_dispatch",
    "expert_parameters",
    "local_expert_range",
    "shard_experts",
]


def local_expert_range(n_experts: int, world_size: int, rank: int) -> range:
    """The global ids of the experts rank ``rank`` owns: a contiguous block of E / W."""
    if n_experts % world_size:
        raise ValueError(
            f"n_experts={n_experts} must be divisible by the process group size {world_size}"
        )
    L = n_experts // world_size
    return range(rank * L, (rank + 1) * L)


def _shard_bank(bank: ExpertBank, experts: range) -> ExpertBank:
    """A new `ExpertBank` holding copies of ``bank``'s experts ``experts``."""
    local = ExpertBank(len(experts), bank.d_model, bank.d_hidden, bank.act.name, bank.has_bias)
    if bank.lora is not None:
        local.add_lora(bank.lora.rank, bank.lora.alpha, freeze_base=False)
        local.lora.merged = bank.lora.merged
    local = local.to(device=bank.w_in.device, dtype=bank.w_in.dtype)
    with torch.no_grad():
        for name, p in local.named_parameters():
            p.copy_(bank.get_parameter(name)[experts.start : experts.stop])
            p.requires_grad_(bank.get_parameter(name).requires_grad)
    return local


def _empty_output(x_MD: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """``[0, D]`` expert output for a rank that received no rows (a dispatch function).

    Still connected to the received rows and to every expert parameter (their gradients
    come out zero), so the backward exchanges run on every rank whether or not it got
    work: a rank that skipped one would deadlock the others.
    """
    zero = x_MD.sum() + sum(p.reshape(-1)[:0].sum() for p in experts.parameters())
    return x_MD.new_zeros(0, experts.d_model) + zero.to(x_MD.dtype)


def expert_parallel_dispatch(
    x_TD: Tensor,
    routing: Routing,
    experts: ExpertBank,
    dispatch: DispatchFn,
    group: dist.ProcessGroup | None = None,
    stats: ExchangeStats | None = None,
) -> tuple[Tensor, Tensor]:
    """Execute ``routing`` (over all E experts) when this rank holds only its own experts.

    Parameters
    ----------
    x_TD : Tensor ``[T, D]``
        This rank's tokens.
    routing : Routing
        Over the E global experts, ``routing.n_tokens == T``.
    experts : ExpertBank
        This rank's L = E / W experts, global ids given by `local_expert_range`.
    dispatch : DispatchFn
        Backend that runs the local experts (e.g. ``get_backend("auto", x.device)``).
    group : ProcessGroup, optional
        The expert-parallel group (default: the world). Every rank of it must call this.
    stats : ExchangeStats, optional
        Accumulates all-to-all calls, bytes and time.

    Returns
    -------
    ``(y_TD, counts_WE)``: the output ``[T, D]`` in ``x_TD.dtype``, equal to
    ``dispatch(x_TD, routing, full_bank)``, and the routed counts of every rank,
    int64 ``[W, E]`` (row j: how many assignments rank j sent to each expert).
    """
    W, r = dist.get_world_size(group), dist.get_rank(group)
    E, L = routing.n_experts, experts.n_experts
    if E != W * L:
        raise ValueError(f"routing has {E} experts but {W} ranks x {L} local experts = {W * L}")
    counts_WE = all_gather_counts(routing.counts, group)
    # counts_WWL[src, dst, l]: assignments rank src routes to local expert l of rank dst.
    counts_WWL = counts_WE.view(W, W, L)
    send_splits = counts_WWL[r].sum(-1).tolist()
    recv_WL = counts_WWL[:, r]
    recv_splits = recv_WL.sum(-1).tolist()

    xs_ND = x_TD.index_select(0, routing.token)
    if torch.is_grad_enabled() and not xs_ND.requires_grad:
        # Whether the backward exchanges run must not depend on this rank's input: under
        # grad mode they always do, so a rank whose tokens need no gradient still serves
        # the gradients of the others (skipping them would deadlock the group).
        xs_ND = xs_ND.detach().requires_grad_()
    xr_MD = all_to_all(xs_ND, recv_splits, send_splits, group, stats)
    M = xr_MD.shape[0]
    # Received rows are source-major, expert-minor; a routing with unit weights lets the
    # backend gather them in local-expert order and scatter the outputs back in place.
    local_M = torch.repeat_interleave(
        torch.arange(L, device=x_TD.device).repeat(W), recv_WL.reshape(-1), output_size=M
    )
    local = Routing.from_assignments(
        torch.arange(M, device=x_TD.device), local_M, xr_MD.new_ones(M), n_experts=L, n_tokens=M
    )
    # Through the bank's own call (`ExpertBank.forward`), so FSDP2 on the bank gathers its
    # weights whether or not this rank got rows.
    yr_MD = experts(xr_MD, local, _empty_output if M == 0 else dispatch)
    ys_ND = all_to_all(yr_MD, send_splits, recv_splits, group, stats)
    ys_ND = ys_ND * routing.weight.to(x_TD.dtype).unsqueeze(-1)
    y_TD = torch.zeros_like(x_TD).index_add(0, routing.token, ys_ND)
    return y_TD, counts_WE


class ExpertParallelMoE(MoE):
    """An `MoE` whose routed experts are sharded over the ranks of a process group.

    Build it with `shard_experts` (or ``ExpertParallelMoE.from_moe``) from an `MoE`, or
    directly with the keyword arguments of `MoE` plus ``group``. Rank r of ``group`` keeps
    experts ``local_expert_range(E, W, r)`` in ``self.experts`` (an `ExpertBank` of E / W
    experts); the gate and shared experts are replicated on every rank.

    Semantics (``loss = sum over ranks of each rank's loss``):

    * dropless (default): outputs and all gradients equal those of the single-process
      `MoE` with the same weights applied to the concatenation of every rank's tokens.
      Gradients of replicated parameters (gate, shared experts) are per rank: sum them
      over the group (or average them with DDP/FSDP, see ``expert_grad_scale``).
    * capacity (``capacity_factor`` set): each rank drops its own assignments over
      ``ceil(capacity_factor * N_rank / E)`` per expert before the exchange, i.e. the
      result equals the single-process `MoE` applied to each rank's tokens separately. An
      expert can therefore receive up to W times that capacity in total.
    * ``aux_losses`` and ``last_routing`` are those of this rank's tokens, as the
      single-process layer would compute them on these tokens alone.
    * a gate with a selection-bias balancer (``gate="sigmoid"``, ``bias_update_rate > 0``)
      is updated with the counts summed over the group, so its bias stays replicated and
      equal to the single-process one: after each forward (``bias_update_every="forward"``)
      or in `balance_step` (``"step"``), from the counts of the step's micro-batches.
    * ``load_balance_scope="global_batch"``: the loss's expert frequencies are the counts
      summed over the group (`set_balance_group`, default this group), so every rank sees
      the global counts; its probabilities are this rank's. "micro_batch" and "sequence"
      are local by definition.

    After each forward: ``last_counts`` (int64 ``[W, E]``, assignments each rank routed
    to each expert after capacity), `rank_load` and `load_imbalance`; ``exchange_stats``
    accumulates all-to-all calls, bytes and (if ``exchange_stats.timed``) seconds.

    Parameters
    ----------
    group : ProcessGroup, optional
        Expert-parallel group (default: the world). ``n_experts`` must be divisible by its
        size. Initialise torch.distributed first (gloo for CPU tensors, NCCL for CUDA).
    expert_grad_scale : float
        Multiplies the gradients of the local experts (default 1: the sum over ranks).
        Under DDP/FSDP, which average replicated gradients over W ranks, pass ``1 / W``
        so every gradient is that of the mean of the ranks' losses.
    broadcast_replicated : bool
        Copy the replicated parameters and buffers (gate, shared experts) from the first
        rank of ``group`` at construction (default True), so ranks seeded differently
        still agree.
    **moe_kwargs
        As for `MoE` (``d_model``, ``n_experts``, ``d_hidden``, ``gate``, ``k``, ...).

    Examples
    --------
    Under ``torchrun --nproc_per_node 2`` (see ``examples/expert_parallel.py``):

    >>> dist.init_process_group("gloo")  # doctest: +SKIP
    >>> torch.manual_seed(0)  # doctest: +SKIP
    >>> moe = shard_experts(MoE(16, n_experts=4, d_hidden=32, k=2))  # doctest: +SKIP
    >>> moe.experts.n_experts  # doctest: +SKIP
    2
    >>> y = moe(torch.randn(5, 16))  # this rank's 5 tokens  # doctest: +SKIP
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        d_hidden: int,
        *,
        group: dist.ProcessGroup | None = None,
        expert_grad_scale: float = 1.0,
        broadcast_replicated: bool = True,
        **moe_kwargs,
    ) -> None:
        super().__init__(d_model, n_experts, d_hidden, **moe_kwargs)
        self._setup_parallel(group, expert_grad_scale, broadcast_replicated)

    @classmethod
    def from_moe(
        cls,
        moe: MoE,
        group: dist.ProcessGroup | None = None,
        *,
        expert_grad_scale: float = 1.0,
        broadcast_replicated: bool = True,
    ) -> ExpertParallelMoE:
        """The sharded form of ``moe`` (left unchanged): built from its config with copies
        of its gate and shared experts, and of this rank's block of its experts."""
        if not isinstance(moe, MoE) or isinstance(moe, ExpertParallelMoE):
            raise TypeError(f"moe must be a single-process gatedmoe.MoE, got {type(moe).__name__}")
        ep = cls.from_config(
            moe.config,
            gate=copy.deepcopy(moe.gate),
            experts=moe.experts,
            shared=copy.deepcopy(moe.shared),
            group=group,
            expert_grad_scale=expert_grad_scale,
            broadcast_replicated=broadcast_replicated,
        )
        ep.train(moe.training)
        return ep

    def _setup_parallel(
        self, group: dist.ProcessGroup | None, expert_grad_scale: float, broadcast_replicated: bool
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs torch.distributed initialised (init_process_group)")
        if not expert_grad_scale > 0:
            raise ValueError(f"expert_grad_scale must be > 0, got {expert_grad_scale}")
        self.group = group
        # The (ep, dp) DeviceMesh once `gatedmoe.parallel.fsdp.fully_shard_expert_parallel`
        # has sharded the experts over dp as well (checkpoints read it); None before.
        self.expert_mesh = None
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.expert_range = local_expert_range(self.n_experts, self.world_size, self.rank)
        self.experts = _shard_bank(self.experts, self.expert_range)
        self.expert_grad_scale = float(expert_grad_scale)
        if self.expert_grad_scale != 1.0:
            for p in self.experts.parameters():
                p.register_hook(self._scale_expert_grad)
        self.exchange_stats = ExchangeStats()
        self.last_counts: Tensor | None = None
        if broadcast_replicated:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            with torch.no_grad():
                for t in self.replicated_tensors():
                    dist.broadcast(t, src=src, group=group)
        # Balancing counts (global-batch loss, step-wise bias) are summed over the group.
        self.set_balance_group(group)
        balancer = getattr(self.gate, "balancer", None)
        if balancer is not None:
            self.gate.register_forward_pre_hook(self._save_balancer_bias)
            self.gate.register_forward_hook(self._rebalance_with_global_counts)

    def _scale_expert_grad(self, grad: Tensor) -> Tensor:
        return grad * self.expert_grad_scale

    # The gate's balancer updated its bias from this rank's counts; redo the update with
    # the counts of the whole group, as the single-process layer would see them.
    def _save_balancer_bias(self, gate: nn.Module, args: tuple) -> None:
        gate._ep_saved_bias = gate.balancer.bias.clone()

    def _rebalance_with_global_counts(self, gate: nn.Module, args: tuple, routing: Routing) -> None:
        saved = gate.__dict__.pop("_ep_saved_bias")
        # The gate's own condition for updating, the same on every rank (unlike whether
        # the local update happened to change the bias).
        if not (gate.training and torch.is_grad_enabled()) or gate.balancer.every == "step":
            # every="step" only accumulated this rank's counts; `balance_step` sums them.
            return
        counts_E = routing.counts.clone()
        dist.all_reduce(counts_E, group=self.group)
        with torch.no_grad():
            gate.balancer.bias.copy_(saved)
        gate.balancer.update(counts_E)

    def replicated_tensors(self) -> Iterator[Tensor]:
        """Parameters and buffers every rank holds a copy of (all but the local experts)."""
        expert_ids = {id(t) for t in [*self.experts.parameters(), *self.experts.buffers()]}
        for t in [*self.parameters(), *self.buffers()]:
            if id(t) not in expert_ids:
                yield t

    def expert_parameter_names(self) -> list[str]:
        """Qualified names of the sharded parameters (for DDP's ignore list and the like)."""
        return [f"experts.{n}" for n, _ in self.experts.named_parameters()]

    def dispatch(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """This rank's routed rows through the experts of every rank (two all-to-alls)."""
        backend = get_backend(self.backend, x_TD.device)
        y_TD, self.last_counts = expert_parallel_dispatch(
            x_TD, routing, self.experts, functools.partial(backend, options=self.backend_options),
            self.group, self.exchange_stats,
        )
        return y_TD

    def rank_load(self) -> Tensor:
        """Assignments each rank's experts received in the last forward, int64 ``[W]``."""
        if self.last_counts is None:
            raise RuntimeError("rank_load needs a forward first")
        W = self.world_size
        return self.last_counts.sum(0).view(W, -1).sum(-1)

    def load_imbalance(self) -> float:
        """``max / mean - 1`` of `rank_load` (0 when perfectly balanced or empty)."""
        load = self.rank_load().double()
        mean = float(load.mean())
        return float(load.max()) / mean - 1.0 if mean > 0 else 0.0

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, world_size={self.world_size}, rank={self.rank}, "
            f"experts={self.expert_range.start}..{self.expert_range.stop - 1}"
        )


def shard_experts(
    moe: MoE,
    group: dist.ProcessGroup | None = None,
    *,
    expert_grad_scale: float = 1.0,
    broadcast_replicated: bool = True,
) -> ExpertParallelMoE:
    """The expert-parallel form of ``moe`` on this rank (see `ExpertParallelMoE`).

    Every rank of ``group`` calls it with an `MoE` of the same configuration; with
    ``broadcast_replicated`` (default) the gate and shared experts are taken from the
    group's first rank; each rank keeps its own block of ``moe``'s experts, so build
    ``moe`` from the same seed everywhere to get the single-process model.
    """
    return ExpertParallelMoE.from_moe(
        moe, group, expert_grad_scale=expert_grad_scale, broadcast_replicated=broadcast_replicated
    )


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The sharded expert parameters of every `ExpertParallelMoE` in ``model``, by
    qualified name: what data parallelism over the same ranks must leave alone.

    With DDP use `exclude_experts_from_ddp`; with FSDP2 over the same ranks pass
    ``ignored_params=set(expert_parameters(model).values())`` to ``fully_shard``; with FSDP2
    on a two-dimensional (ep, dp) mesh use `gatedmoe.parallel.fsdp.fully_shard_expert_parallel`.
    """
    out: dict[str, nn.Parameter] = {}
    for prefix, m in model.named_modules():
        if isinstance(m, ExpertParallelMoE):
            for name, p in m.experts.named_parameters():
                out[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = p
    return out


def exclude_experts_from_ddp(model: nn.Module) -> nn.Module:
    """Mark the sharded experts of ``model`` for ``DistributedDataParallel`` to ignore
    (no broadcast at wrap time, no gradient averaging); call before wrapping. Returns
    ``model``.

    DDP then averages the replicated parameters (gate, shared experts, the rest of the
    model) over its group; build the `ExpertParallelMoE` with ``expert_grad_scale=1/W``
    to match, and give it its own process group (``dist.new_group()``) so its
    all-to-alls never interleave with DDP's all-reduces.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = list(expert_parameters(model))
    # DDP's documented hook for parameters it must not touch (used e.g. by TorchRec).
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return model
