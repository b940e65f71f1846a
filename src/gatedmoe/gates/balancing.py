"""Auxiliary-loss-free load balancing by a selection-only expert bias.

Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"
(used by DeepSeek-V3): a bias ``b_e`` is added to the routing scores *for selection
only*; after each training step ``b_e <- b_e + u * sign(mean_j c_j - c_e)`` where
``c_e`` is the number of tokens expert e received. Overloaded experts become less
likely to be picked; the combine weights never see the bias, so no gradient flows
through it and no auxiliary loss competes with the language-model loss.

When the update happens is the balancer's ``every``: "forward" steps after each training
forward from that forward's counts (simple, but with gradient accumulation it steps once per
micro-batch and under data parallelism each rank would drift apart); "step" accumulates
the counts of every micro-batch and takes one step in `BiasBalancer.step`, which the
training loop calls once per optimizer step (``gatedmoe.balance_step(model)``) and which
sums the counts over the ranks of a process group first: DeepSeek-V3's "at the end of
each step", over the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gatedmoe.validation import positive_int, real_in

__all__ = ["BALANCE_EVERY", "BiasBalancer"]

BALANCE_EVERY = ("forward", "step")


class BiasBalancer(nn.Module):
    """Holds the selection bias ``[E]`` (a buffer, saved in checkpoints) and its update rule.

    Parameters
    ----------
    n_experts : int
        E.
    update_rate : float
        u, the step of the sign update (DeepSeek-V3 uses 0.001). Must be >= 0.
    every : {"forward", "step"}
        When to step (module docstring): after each training forward (default), or once
        per optimizer step from the counts accumulated since the last `step`.

    Examples
    --------
    >>> import torch
    >>> b = BiasBalancer(3, update_rate=0.1, every="step")
    >>> b.observe(torch.tensor([4, 0, 2])); b.observe(torch.tensor([4, 0, 2]))
    >>> b.bias.tolist()  # nothing yet
    [0.0, 0.0, 0.0]
    >>> b.step(); [round(v, 3) for v in b.bias.tolist()]  # counts [8, 0, 4], mean 4
    [-0.1, 0.1, 0.0]
    """

    def __init__(self, n_experts: int, update_rate: float = 1e-3, every: str = "forward") -> None:
        super().__init__()
        positive_int("n_experts", n_experts)
        self.update_rate = real_in("update_rate", update_rate, 0.0)
        if every not in BALANCE_EVERY:
            raise ValueError(f"every must be one of {BALANCE_EVERY}, got {every!r}")
        self.every = every
        self.register_buffer("bias", torch.zeros(n_experts))
        # Counts observed since the last `step` (every="step"); not saved: a checkpoint is
        # written between optimizer steps, when nothing is pending.
        self.pending: Tensor | None = None

    @torch.no_grad()
    def update(self, counts_E: Tensor) -> None:
        """One sign step from these per-expert assignment counts."""
        c = counts_E.to(self.bias.device, torch.float32)
        self.bias += self.update_rate * torch.sign(c.mean() - c)

    @torch.no_grad()
    def observe(self, counts_E: Tensor) -> None:
        """The counts of one training forward: a step now (``every="forward"``) or
        accumulated for the next `step` (``every="step"``)."""
        if self.every == "forward":
            self.update(counts_E)
            return
        c = counts_E.detach().to(self.bias.device, torch.long)
        self.pending = c.clone() if self.pending is None else self.pending + c

    @torch.no_grad()
    def step(self, group: dist.ProcessGroup | None = None, distributed: bool = False) -> None:
        """Close an optimizer step (``every="step"``): one sign step from the counts
        observed since the last call, summed over ``group`` first when ``distributed``
        (None = the world; every rank of it must call), then forget them. A no-op for
        ``every="forward"``."""
        if self.every != "step":
            return
        pending = self.pending if self.pending is not None else torch.zeros_like(self.bias, dtype=torch.long)
        self.pending = None
        if distributed:
            pending = pending.clone()
            dist.all_reduce(pending, group=group)
        if int(pending.sum()) > 0:
            self.update(pending)

    def extra_repr(self) -> str:
        return f"update_rate={self.update_rate}, every={self.every!r}"
