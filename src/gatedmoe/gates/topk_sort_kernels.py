"""Triton kernels of the counting sort of given top-k choices (`gatedmoe.gates.topk_sort`
launches them and holds the plain-PyTorch reference they are tested against).

The N = T*K assignments are sorted in blocks of BN consecutive ones in (token, choice) order,
whatever E and K. An assignment's slot is its expert's start (exclusive prefix of the counts)
+ the assignments to that expert in earlier blocks + those earlier in its own block (its rank).
The rank comes from comparing the block's keys with each other in [S, S] tiles (BN^2 / 2
comparisons, not growing with E); the start and earlier blocks' share are one [BE] vector per
block that each assignment reads by its expert id (`tl.gather`). Only the histogram, the
prefix over the experts and that read are O(E) per block.

Shape legend: T tokens, E experts, K choices per token, N = T*K assignments, B blocks of BN
assignments, S rows and columns of a rank tile, BE = E padded to a power of two. An id outside
``[0, E)`` is "bad": its key is E, an extra bucket that sorts after every expert (see
`gatedmoe.gates.topk_sort`).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["sort_one_block", "topk_hist_kernel", "topk_scan_kernel", "topk_sort_kernel"]


@triton.jit
def _keys(experts_ptr, n, N, E):
    """For assignments ``n`` (int64, may run past N): their ids as given, their keys (int32:
    the id, or E for a bad id or past N), and which are in ``[0, N)`` and which good."""
    valid = n < N
    ids = tl.load(experts_ptr + n, mask=valid, other=0)
    good = valid & (ids >= 0) & (ids < E)
    # E <= 4096, so the key fits int32 and int64 ids do not widen the rank tiles.
    key = tl.where(good, ids, E).to(tl.int32)
    return ids, key, valid, good


@triton.jit
def _block_hist(experts_ptr, start, N, E, BN: tl.constexpr, BE: tl.constexpr):
    """Block ``[start, start + BN)``'s per-expert counts (``[BE]`` int32) and bad ids (int32)."""
    _, key, valid, good = _keys(experts_ptr, start + tl.arange(0, BN), N, E)
    # The mask also keeps the key E (== BE when E is a power of two) out of the bins.
    hist = tl.histogram(key, BE, mask=good)
    return hist, tl.sum((valid & ~good).to(tl.int32), axis=0)


@triton.jit
def _scatter_block(
    experts_ptr, weights_ptr, token_ptr, expert_ptr, weight_ptr, pos_ptr, start, N, E, base, bad_base,
    K: tl.constexpr, BN: tl.constexpr, S: tl.constexpr,
):
    """Write block ``[start, start + BN)``: assignment n with key k goes to ``base[k]`` (or
    ``bad_base`` for bad ids) plus its rank, the block's assignments before n with key k."""
    ii = tl.arange(0, S)
    for r in tl.static_range(0, BN, S):
        # A partial block (decode: T*K of a few) skips its empty rows' tiles.
        if start + r < N:
            n = start + r + ii
            ids, key, valid, good = _keys(experts_ptr, n, N, E)
            rank = tl.zeros([S], dtype=tl.int32)
            # Only the tiles at or left of the diagonal hold earlier assignments: BN^2 / 2 +
            # BN * S / 2 comparisons per full block. Padding past N has key E but never
            # precedes a valid n.
            for c in range(0, r + S, S):
                _, key_c, _, _ = _keys(experts_ptr, start + c + ii, N, E)
                same = (key[:, None] == key_c[None, :]) & ((c + ii)[None, :] < (r + ii)[:, None])
                rank += tl.sum(same.to(tl.int32), axis=1)
            slot = tl.where(good, tl.gather(base, tl.where(good, key, 0), 0), bad_base) + rank
            slot = slot.to(tl.int64)
            w = tl.load(weights_ptr + n, mask=valid, other=0.0)
            tl.store(token_ptr + slot, (n.to(tl.int32) // K).to(tl.int64), mask=valid)
            tl.store(expert_ptr + slot, ids.to(tl.int64), mask=valid)
            # Rounded to the sorted weights' dtype (to nearest even on the GPU; Triton's CPU
            # interpreter truncates a narrowing to bf16).
            tl.store(weight_ptr + slot, w.to(weight_ptr.dtype.element_ty), mask=valid)
            tl.store(pos_ptr + n, slot, mask=valid)


@triton.jit
def topk_hist_kernel(experts_ptr, hist_ptr, N, E, BN: tl.constexpr, BE: tl.constexpr):
    """Block b's histogram of the ids into hist ``[B, E + 1]`` int32 (column E: bad ids)."""
    pid = tl.program_id(0)
    hist, bad = _block_hist(experts_ptr, pid.to(tl.int64) * BN, N, E, BN, BE)
    cols = tl.arange(0, BE)
    row_ptr = hist_ptr + pid.to(tl.int64) * (E + 1)
    tl.store(row_ptr + cols, hist, mask=cols < E)
    tl.store(row_ptr + E, bad)


@triton.jit
def topk_scan_kernel(hist_ptr, prefix_ptr, counts_ptr, ok_ptr, NB, E, CH: tl.constexpr):
    """Per column (one program each; E + 1 of them, the last the bad ids): exclusive prefix of
    its histogram column over the blocks into prefix ``[B, E]``, and its total into counts
    ``[E]`` (int64). Here ``E`` is the histogram's width. The last program also writes
    ``ok[0]``: 1 if there is no bad id, else 0."""
    e = tl.program_id(0)
    carry = tl.zeros([], dtype=tl.int32)
    for start in range(0, NB, CH):
        b = start + tl.arange(0, CH)
        bmask = b < NB
        h = tl.load(hist_ptr + b.to(tl.int64) * E + e, mask=bmask, other=0)
        tl.store(prefix_ptr + b.to(tl.int64) * E + e, carry + tl.cumsum(h, axis=0) - h, mask=bmask)
        carry += tl.sum(h, axis=0)
    tl.store(counts_ptr + e, carry.to(tl.int64))
    if e == E - 1:
        tl.store(ok_ptr, (carry == 0).to(tl.int32))


@triton.jit
def topk_sort_kernel(
    experts_ptr, weights_ptr, prefix_ptr, counts_ptr, token_ptr, expert_ptr, weight_ptr, pos_ptr, ok_ptr,
    N, E, K: tl.constexpr, BN: tl.constexpr, S: tl.constexpr, BE: tl.constexpr, ONE_PROGRAM: tl.constexpr,
):
    """Counting sort by expert of the flattened ids ``[N]``, stable in (token, choice) order, as
    a stable argsort of them. Writes the sorted token, expert (int64) and weight ``[N]``, and
    pos ``[N]`` (its inverse).

    ONE_PROGRAM: N <= BN, one program sorts the single block (it writes counts ``[E + 1]``
    int64 and ``ok[0]``, 1 if no id is bad, itself; ``prefix_ptr`` is unused). Otherwise program b sorts block b from counts
    ``[E + 1]`` and prefix ``[B, E + 1]`` (the exclusive prefix of `topk_hist_kernel`'s
    histograms over the blocks, by `topk_scan_kernel`).
    """
    if ONE_PROGRAM:
        # N <= BN: the whole sort is one block (decode sizes).
        sort_one_block(experts_ptr, weights_ptr, counts_ptr, token_ptr, expert_ptr, weight_ptr, pos_ptr, ok_ptr,
                       N, E, K, BN, S, BE)
    else:
        cols = tl.arange(0, BE)
        cmask = cols < E
        pid = tl.program_id(0)
        counts = tl.load(counts_ptr + cols, mask=cmask, other=0).to(tl.int32)
        prefix_row = prefix_ptr + pid.to(tl.int64) * (E + 1)
        base = tl.cumsum(counts, axis=0) - counts + tl.load(prefix_row + cols, mask=cmask, other=0)
        bad_base = tl.sum(counts, axis=0) + tl.load(prefix_row + E)
        _scatter_block(experts_ptr, weights_ptr, token_ptr, expert_ptr, weight_ptr, pos_ptr, pid.to(tl.int64) * BN,
                       N, E, base, bad_base, K, BN, S)


@triton.jit
def sort_one_block(
    experts_ptr, weights_ptr, counts_ptr, token_ptr, expert_ptr, weight_ptr, pos_ptr, ok_ptr, N, E,
    K: tl.constexpr, BN: tl.constexpr, S: tl.constexpr, BE: tl.constexpr,
):
    """The whole counting sort in the calling program, for N <= BN: counts ``[E + 1]`` int64
    (entry E the bad ids), ``ok[0]`` (1 if no id is bad), and the sorted token, expert, weight
    and pos as `topk_sort_kernel` writes them. Also run at the end of the fused gate's
    `route_fwd_kernel` when one program routes every token (its launch saved at decode sizes)."""
    cols = tl.arange(0, BE)
    cmask = cols < E
    counts, n_bad = _block_hist(experts_ptr, 0, N, E, BN, BE)
    tl.store(counts_ptr + cols, counts.to(tl.int64), mask=cmask)
    tl.store(counts_ptr + E, n_bad.to(tl.int64))
    tl.store(ok_ptr, (n_bad == 0).to(tl.int32))
    base = tl.cumsum(counts, axis=0) - counts
    bad_base = tl.sum(counts, axis=0)
    _scatter_block(experts_ptr, weights_ptr, token_ptr, expert_ptr, weight_ptr, pos_ptr, 0, N, E,
                   base, bad_base, K, BN, S)
