"""Differentiable collectives for expert parallelism.

`all_to_all` exchanges rows of a 2-D tensor between the ranks of a process group with
uneven split sizes (``torch.distributed.all_to_all_single``); its backward is the
reverse exchange, so gradients travel back to the rank that sent each row.

Backends: ``all_to_all_single`` with uneven splits is supported by NCCL and, on the
torch this library is tested with (2.13), by gloo on CPU tensors
(``tests/parallel/test_comm.py``), so there is one code path and no fallback. (The list
form ``all_to_all`` on gloo rejects uneven sizes; we do not use it.)

Shape legend: N rows sent by this rank, M rows received, D row width, W ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ExchangeStats", "all_to_all", "all_gather_counts"]


@dataclass
class ExchangeStats:
    """Time and volume spent in `all_to_all`, accumulated until `reset`.

    ``seconds`` is only measured when ``timed`` is True (on CUDA that synchronises the
    device around each exchange, so leave it off outside benchmarks).
    """

    timed: bool = False
    seconds: float = 0.0
    calls: int = 0
    bytes_sent: int = 0

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes_sent = 0.0, 0, 0


def _sync(t: Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def _exchange(
    x_ND: Tensor,
    recv_splits: list[int],
    send_splits: list[int],
    group: dist.ProcessGroup | None,
    stats: ExchangeStats | None,
) -> Tensor:
    x_ND = x_ND.contiguous()
    out_MD = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
    start = 0.0
    if stats is not None and stats.timed:
        _sync(x_ND)
        start = time.perf_counter()
    dist.all_to_all_single(out_MD, x_ND, recv_splits, send_splits, group=group)
    if stats is not None:
        if stats.timed:
            _sync(out_MD)
            stats.seconds += time.perf_counter() - start
        stats.calls += 1
        stats.bytes_sent += x_ND.numel() * x_ND.element_size()
    return out_MD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, recv_splits, send_splits, group, stats):
        ctx.recv_splits, ctx.send_splits = recv_splits, send_splits
        ctx.group, ctx.stats = group, stats
        return _exchange(x_ND, recv_splits, send_splits, group, stats)

    @staticmethod
    def backward(ctx, grad_MD):
        # The reverse exchange: row i of the output came from some rank; its gradient goes
        # back there, into the slot it was read from.
        grad_ND = _exchange(grad_MD, ctx.send_splits, ctx.recv_splits, ctx.group, ctx.stats)
        return grad_ND, None, None, None, None


def all_to_all(
    x_ND: Tensor,
    recv_splits: list[int],
    send_splits: list[int],
    group: dist.ProcessGroup | None = None,
    stats: ExchangeStats | None = None,
) -> Tensor:
    """Send ``send_splits[j]`` consecutive rows of ``x_ND`` to rank j of ``group``; return
    the rows received, ``recv_splits[j]`` of them from rank j, in rank order.

    Differentiable: the backward pass runs the reverse exchange. Every rank of ``group``
    must call it (forward and backward) the same number of times in the same order.

    Parameters
    ----------
    x_ND : Tensor ``[N, ...]``
        Rows to send, ``N == sum(send_splits)``.
    recv_splits, send_splits : list of int, length W
        Rows received from and sent to each rank (they must agree pairwise across ranks).
    group : ProcessGroup, optional
        Default: the world.
    stats : ExchangeStats, optional
        Accumulates calls, bytes and (if ``stats.timed``) seconds, backward included.

    Returns
    -------
    Tensor ``[sum(recv_splits), ...]``, dtype and device of ``x_ND``.

    Examples
    --------
    Under ``torchrun --nproc_per_node 2`` with gloo, rank r sends one row to each rank:

    >>> y = all_to_all(torch.full((2, 3), float(rank)), [1, 1], [1, 1])  # doctest: +SKIP
    >>> y[:, 0].tolist()  # doctest: +SKIP
    [0.0, 1.0]
    """
    if x_ND.dim() < 1 or x_ND.shape[0] != sum(send_splits):
        raise ValueError(f"x_ND has {x_ND.shape[0] if x_ND.dim() else 0} rows but send_splits sums to {sum(send_splits)}")
    return _AllToAll.apply(x_ND, list(recv_splits), list(send_splits), group, stats)


def all_gather_counts(counts: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Stack every rank's 1-D int64 ``counts [C]`` into ``[W, C]`` (row j from rank j).

    Not differentiable (counts carry no gradient).
    """
    W = dist.get_world_size(group)
    out = counts.new_empty((W, *counts.shape))
    dist.all_gather(list(out.unbind(0)), counts.contiguous(), group=group)
    return out
