"""Triton kernels of the fused top-k routing (`gatedmoe.gates.fused_topk` launches them and
holds the plain-PyTorch reference they are tested against).

Shape legend: T tokens, E experts, K experts per token, N = T*K assignments, B row blocks
of BT tokens. Every program owns BT whole rows of the ``[T, E]`` logits (E padded to a
power of two BE), so scores and top-k need no atomics and come out the same on every run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gatedmoe.gates.topk_sort_kernels import sort_one_block

__all__ = ["route_bwd_kernel", "route_fwd_kernel"]

SOFTMAX = tl.constexpr(0)
SIGMOID = tl.constexpr(1)


@triton.jit
def route_fwd_kernel(
    logits_ptr, bias_ptr, probs_ptr, lse_ptr, weights_ptr, experts_ptr,
    counts_ptr, token_ptr, sorted_expert_ptr, sorted_weight_ptr, pos_ptr, ok_ptr,
    T, E, scale, mask_value,
    K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
    SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    SORT: tl.constexpr, SORT_BN: tl.constexpr, SORT_S: tl.constexpr,
):
    """Scores, logsumexp, top-k with renormalisation.

    Writes probs ``[T, E]`` (softmax p, or the sigmoid scores over their sum), lse ``[T]``,
    weights ``[T, K]`` float32 and experts ``[T, K]`` int32 in choice order, sorted by expert
    afterwards by `gatedmoe.gates.topk_sort`'s kernels. Ties go to the lowest expert id.

    SORT (one program, T <= BT and T*K <= SORT_BN): the same program then sorts them itself
    (`topk_sort_kernels.sort_one_block`: counts, ok, the sorted token, expert, weight and
    pos); otherwise those six pointers are unused.
    """
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    kk = tl.arange(0, BK)
    rmask = rows < T
    cmask = cols < E
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    logit = tl.load(logits_ptr + offs, mask=mask, other=float("-inf"))
    # Padding rows would give exp(-inf - -inf) = NaN: they are computed on a zero row instead.
    logit = tl.where(rmask[:, None], logit, tl.where(cmask[None, :], 0.0, float("-inf")))
    row_max = tl.max(logit, axis=1)
    ex = tl.exp(logit - row_max[:, None])
    total_ex = tl.sum(ex, axis=1)
    tl.store(lse_ptr + rows, row_max + tl.log(total_ex), mask=rmask)
    if SCORE == SOFTMAX:
        score = ex / total_ex[:, None]
        tl.store(probs_ptr + offs, score, mask=mask)
    else:
        score = tl.where(cmask[None, :], tl.sigmoid(logit), 0.0)
        tl.store(probs_ptr + offs, score / tl.sum(score, axis=1)[:, None], mask=mask)
    sel = score
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
    sel = tl.where(cmask[None, :], sel, float("-inf"))
    if N_GROUP > 1:
        # DeepSeek-V3's group limit: a group scores the sum of its two largest selection
        # scores; experts outside the TOPK_GROUP best groups get mask_value.
        GS: tl.constexpr = BE // N_GROUP
        sel3 = tl.reshape(sel, [BT, N_GROUP, GS])
        gcols = tl.arange(0, GS)
        first = tl.max(sel3, axis=2)
        first_at = tl.min(tl.where(sel3 == first[:, :, None], gcols[None, None, :], GS), axis=2)
        second = tl.max(tl.where(gcols[None, None, :] == first_at[:, :, None], float("-inf"), sel3), axis=2)
        group_score = first + second
        groups = tl.arange(0, N_GROUP)
        keep = tl.zeros([BT, N_GROUP], dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(group_score, axis=1)
            at = tl.min(tl.where(group_score == best[:, None], groups[None, :], N_GROUP), axis=1)
            hit = groups[None, :] == at[:, None]
            keep = tl.where(hit, 1, keep)
            group_score = tl.where(hit, float("-inf"), group_score)
        keep_e = tl.reshape(tl.broadcast_to(keep[:, :, None], [BT, N_GROUP, GS]), [BT, BE])
        sel = tl.where(keep_e != 0, sel, mask_value)
    w_tile = tl.zeros([BT, BK], dtype=tl.float32)
    e_tile = tl.zeros([BT, BK], dtype=tl.int32)
    kept = tl.zeros([BT], dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(sel, axis=1)
        # NaN scores match nothing: clamp so a bad row still names a real expert (the layer's
        # finiteness check reports it; an out-of-range id would fault the expert kernels).
        at = tl.minimum(tl.min(tl.where(sel == best[:, None], cols[None, :], BE), axis=1), E - 1)
        hit = cols[None, :] == at[:, None]
        w = tl.sum(tl.where(hit, score, 0.0), axis=1)
        kept += w
        w_tile = tl.where(kk[None, :] == j, w[:, None], w_tile)
        e_tile = tl.where(kk[None, :] == j, at[:, None], e_tile)
        sel = tl.where(hit, float("-inf"), sel)
    if NORMALIZE:
        w_tile = w_tile / tl.maximum(kept, 1e-20)[:, None]
    w_tile = w_tile * scale
    koffs = rows[:, None].to(tl.int64) * K + kk[None, :]
    kmask = rmask[:, None] & (kk[None, :] < K)
    tl.store(weights_ptr + koffs, w_tile, mask=kmask)
    tl.store(experts_ptr + koffs, e_tile, mask=kmask)
    if SORT:
        # The sort reads the choices back in another order than its threads wrote them: the
        # barrier makes every thread's stores visible to the whole program first.
        tl.debug_barrier()
        sort_one_block(experts_ptr, weights_ptr, counts_ptr, token_ptr, sorted_expert_ptr, sorted_weight_ptr,
                       pos_ptr, ok_ptr, T * K, E, K, SORT_BN, SORT_S, BE)


@triton.jit
def route_bwd_kernel(
    saved_ptr, lse_ptr, weights_ptr, experts_ptr, pos_ptr, g_weight_ptr, g_probs_ptr, g_lse_ptr, g_logits_ptr,
    T, E, scale,
    K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, SCORE: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_GW: tl.constexpr, HAS_GP: tl.constexpr, HAS_GLSE: tl.constexpr,
):
    """Gradient of the logits from those of the sorted weights, the probs and the lse.

    ``saved`` is the softmax p ``[T, E]`` (SCORE=softmax) or the logits (sigmoid). With g_w
    the weight gradients in choice order and w the weights: softmax with renormalisation
    (scale times the softmax over the kept logits) gives ``w (g_w - <g_w, w> / scale)`` on the kept logits; otherwise
    g_w lands on the score s of each kept expert: ``scale g_w`` unnormalised,
    ``(scale g_w - <g_w, w>) / sum_kept s`` normalised. Then through the score:
    softmax ``p (g - <g, p>)``, sigmoid ``s (1 - s) g``; the lse adds ``g_lse softmax(l)``.
    """
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    rmask = rows < T
    cmask = cols < E
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    saved = tl.load(saved_ptr + offs, mask=mask, other=0.0)
    if SCORE == SOFTMAX:
        s = saved
    else:
        s = tl.where(mask, tl.sigmoid(saved), 0.0)
    g_s = tl.zeros([BT, BE], dtype=tl.float32)
    g_l = tl.zeros([BT, BE], dtype=tl.float32)
    if HAS_GW:
        dot = tl.zeros([BT], dtype=tl.float32)
        kept = tl.zeros([BT], dtype=tl.float32)
        for j in tl.static_range(K):
            pos = tl.load(pos_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0)
            g_j = tl.load(g_weight_ptr + pos, mask=rmask, other=0.0)
            w_j = tl.load(weights_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0.0)
            e_j = tl.load(experts_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=BE)
            dot += g_j * w_j
            kept += tl.sum(tl.where(cols[None, :] == e_j[:, None], s, 0.0), axis=1)
        for j in tl.static_range(K):
            pos = tl.load(pos_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0)
            g_j = tl.load(g_weight_ptr + pos, mask=rmask, other=0.0)
            w_j = tl.load(weights_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0.0)
            e_j = tl.load(experts_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=BE)
            hit = cols[None, :] == e_j[:, None]
            if SCORE == SOFTMAX and NORMALIZE:
                g_l += tl.where(hit, (w_j * (g_j - dot / scale))[:, None], 0.0)
            elif NORMALIZE:
                g_s += tl.where(hit, ((scale * g_j - dot) / tl.maximum(kept, 1e-20))[:, None], 0.0)
            else:
                g_s += tl.where(hit, (scale * g_j)[:, None], 0.0)
    if HAS_GP:
        g_p = tl.load(g_probs_ptr + offs, mask=mask, other=0.0)
        if SCORE == SOFTMAX:
            g_s += g_p
        else:
            total = tl.where(rmask, tl.sum(s, axis=1), 1.0)
            q = s / total[:, None]
            g_s += (g_p - tl.sum(g_p * q, axis=1)[:, None]) / total[:, None]
    if SCORE == SOFTMAX:
        g_l += s * (g_s - tl.sum(g_s * s, axis=1)[:, None])
    else:
        g_l += s * (1.0 - s) * g_s
    if HAS_GLSE:
        g_lse = tl.load(g_lse_ptr + rows, mask=rmask, other=0.0)
        if SCORE == SOFTMAX:
            p = s
        else:
            lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
            p = tl.where(mask, tl.exp(saved - lse[:, None]), 0.0)
        g_l += g_lse[:, None] * p
    tl.store(g_logits_ptr + offs, g_l, mask=mask)
