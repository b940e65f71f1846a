"""Triton kernels of the counting sort of given top-k choices (`gatedmoe.gates.topk_sort`
launches them and holds the plain-PyTorch reference they are tested against).

Shape legend: T tokens, E experts, K choices per token, N = T*K assignments, B row blocks of
BT tokens, BE = E padded to a power of two. An id outside ``[0, E)`` is "bad": it is counted
in an extra bucket E, which sorts after every expert (see `gatedmoe.gates.topk_sort`).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["topk_hist_kernel", "topk_sort_kernel"]


@triton.jit
def _block_choices(experts_ptr, rows, rmask, cols, E, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """Per row of one block: how many of its K ids name each expert (``[BT, BE]`` int32), and
    how many are bad (``[BT]`` int32). Rows past T count nothing."""
    chosen = tl.zeros([BT, BE], dtype=tl.int32)
    bad = tl.zeros([BT], dtype=tl.int32)
    for j in tl.static_range(K):
        e_j = tl.load(experts_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0)
        ok = (e_j >= 0) & (e_j < E)
        # -1 matches no column: a bad id must not land in a padding column of the tile. The
        # key fits int32 (E <= 4096), so int64 ids do not widen the [BT, BE] comparison.
        key = tl.where(rmask & ok, e_j, -1).to(tl.int32)
        chosen += (cols[None, :] == key[:, None]).to(tl.int32)
        bad += (rmask & ~ok).to(tl.int32)
    return chosen, bad


@triton.jit
def _scatter_block(
    experts_ptr, weights_ptr, token_ptr, expert_ptr, weight_ptr, pos_ptr, rows, rmask, cols, base, bad_base,
    E, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
):
    """Write one block's assignments: (t, j) with expert e goes to ``base[e]`` plus the
    assignments to e of earlier rows of the block and of earlier choices of row t (a row may
    name an expert twice); bad ids likewise from ``bad_base``. Returns the block's per-expert
    and bad totals, for the next block's bases."""
    chosen, bad = _block_choices(experts_ptr, rows, rmask, cols, E, K, BT, BE)
    slot = tl.cumsum(chosen, axis=0) - chosen + base[None, :]
    bad_slot = tl.cumsum(bad, axis=0) - bad + bad_base
    for j in tl.static_range(K):
        e_j = tl.load(experts_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0)
        w_j = tl.load(weights_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0.0)
        ok = rmask & (e_j >= 0) & (e_j < E)
        hit = cols[None, :] == tl.where(ok, e_j, -1).to(tl.int32)[:, None]
        pos = tl.where(ok, tl.sum(tl.where(hit, slot, 0), axis=1), bad_slot).to(tl.int64)
        slot += hit.to(tl.int32)
        bad_slot += (rmask & ~ok).to(tl.int32)
        tl.store(token_ptr + pos, rows.to(tl.int64), mask=rmask)
        tl.store(expert_ptr + pos, e_j.to(tl.int64), mask=rmask)
        tl.store(weight_ptr + pos, w_j, mask=rmask)
        tl.store(pos_ptr + rows.to(tl.int64) * K + j, pos, mask=rmask)
    return tl.sum(chosen, axis=0), tl.sum(bad, axis=0)


@triton.jit
def topk_hist_kernel(experts_ptr, hist_ptr, T, E, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """This block's histogram of the ids into hist ``[B, E + 1]`` int32 (column E: bad ids)."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    chosen, bad = _block_choices(experts_ptr, rows, rows < T, cols, E, K, BT, BE)
    row_ptr = hist_ptr + pid.to(tl.int64) * (E + 1)
    tl.store(row_ptr + cols, tl.sum(chosen, axis=0), mask=cols < E)
    tl.store(row_ptr + E, tl.sum(bad, axis=0))


@triton.jit
def topk_sort_kernel(
    experts_ptr, weights_ptr, prefix_ptr, counts_ptr, token_ptr, expert_ptr, weight_ptr, pos_ptr,
    T, E, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, ONE_PROGRAM: tl.constexpr,
):
    """Counting sort by expert, stable in (token, choice) order, as a stable argsort of the
    flattened ids. Writes the sorted token, expert (int64) and weight ``[N]``, and pos
    ``[T, K]`` (its inverse).

    ONE_PROGRAM: one program walks all row blocks twice, first counting (it writes counts
    ``[E + 1]`` int64 itself), then scattering; ``prefix_ptr`` is unused. Otherwise program b
    sorts block b from counts ``[E + 1]`` and prefix ``[B, E + 1]`` (the exclusive prefix of
    `topk_hist_kernel`'s histograms over the blocks, by `route_scan_kernel`).
    """
    cols = tl.arange(0, BE)
    cmask = cols < E
    if ONE_PROGRAM:
        counts = tl.zeros([BE], dtype=tl.int32)
        n_bad = tl.zeros([], dtype=tl.int32)
        for start in range(0, T, BT):
            rows = start + tl.arange(0, BT)
            chosen, bad = _block_choices(experts_ptr, rows, rows < T, cols, E, K, BT, BE)
            counts += tl.sum(chosen, axis=0)
            n_bad += tl.sum(bad, axis=0)
        tl.store(counts_ptr + cols, counts.to(tl.int64), mask=cmask)
        tl.store(counts_ptr + E, n_bad.to(tl.int64))
        base = tl.cumsum(counts, axis=0) - counts
        bad_base = tl.sum(counts, axis=0)
        for start in range(0, T, BT):
            rows = start + tl.arange(0, BT)
            n_e, n_b = _scatter_block(experts_ptr, weights_ptr, token_ptr, expert_ptr, weight_ptr, pos_ptr, rows,
                                      rows < T, cols, base, bad_base, E, K, BT, BE)
            base += n_e
            bad_base += n_b
    else:
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        counts = tl.load(counts_ptr + cols, mask=cmask, other=0).to(tl.int32)
        prefix_row = prefix_ptr + pid.to(tl.int64) * (E + 1)
        base = tl.cumsum(counts, axis=0) - counts + tl.load(prefix_row + cols, mask=cmask, other=0)
        bad_base = tl.sum(counts, axis=0) + tl.load(prefix_row + E)
        _scatter_block(experts_ptr, weights_ptr, token_ptr, expert_ptr, weight_ptr, pos_ptr, rows, rows < T, cols,
                       base, bad_base, E, K, BT, BE)
