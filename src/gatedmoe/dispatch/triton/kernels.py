"""Triton kernels of the fused MoE backend (SwiGLU experts, no biases).

Kernels over the expert-sorted assignment list; the first three are tiled as (row tile
of one expert) x (column block):

* `glu_fwd_kernel`   h = x[token] @ W_in[e]^T, gathering rows inside the A loads or
                     reading rows gathered beforehand through TMA; epilogue writes h
                     (kept for backward) and a = silu(h_gate) * h_up.
* `gemm_kernel`      C = A[rows] @ B[e], optionally gathering A rows by token, scaling
                     rows by the routing weight, and scatter-adding rows into C[token]
                     with atomics in C's dtype (forward combine; input gradient; float32
                     or the input dtype, ``TritonOptions.fp32_scatter``).
* `swiglu_bwd_kernel` elementwise, after ``ga = gy[token] @ W_out[e]`` (a `gemm_kernel`):
                     recomputes a from h, computes dL/dweight = <ga, a> per row, writes
                     dL/dh and weight * a (for the W_out gradient). Fusing it into
                     the GEMM epilogue measured 2x slower (register pressure of eight
                     live [BM, BN] fp32 tiles; measured again in the third session:
                     2.0-2.8x slower).
* `wgrad_kernel`     weight gradient out[e] = L[rows_e]^T @ R[rows_e], one program per
                     (expert, output tile), an operand optionally read by token; used
                     for the W_out gradient where no gathered copy of gy exists.

* `decode_glu_kernel`, `decode_down_kernel`, `decode_combine_kernel`: the decode path
                     (inference, a few rows per expert; see the section at the end).

Row tiles never straddle two experts; each program works out its tile's expert and rows
from the per-expert counts (`_tile_rows`), so a call needs no schedule tensors from the host.

Shape legend: T tokens, D model dim, H expert hidden, E experts, N routed assignments.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _program_tile(n_tiles, n_cols, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to (row tile, column block), GROUP_M row tiles at a time.

    Consecutive programs sweep the column blocks of a group of row tiles, so the weight
    blocks they read stay in L2 while the group's rows reuse them (the grouped ordering of
    Triton's matmul tutorial). Row-tile-major order re-read the whole expert weight for
    every row tile when the columns outnumber the SMs.
    """
    pid = tl.program_id(0)
    n_pid_n = tl.cdiv(n_cols, BN)
    per_group = GROUP_M * n_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _tile_rows(t, counts_ptr, E, BM: tl.constexpr, E_POW2: tl.constexpr):
    """Expert, first row, rows and row mask of row tile ``t``, from the per-expert counts.

    The in-kernel form of `launchers.tile_schedule` (the readable host reference, tested against
    this): each expert's rows split into ceil(count / BM) tiles, experts in order, so no
    tile straddles two experts. Every program recomputes the two prefix sums over E (a few
    hundred instructions): cheaper than the dozen host launches a precomputed table cost.
    Tiles past the last get expert -1.
    """
    idx = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + idx, mask=idx < E, other=0).to(tl.int32)
    tiles = (counts + BM - 1) // BM
    tile_end = tl.cumsum(tiles, 0)
    row_end = tl.cumsum(counts, 0)
    e = tl.sum((tile_end <= t).to(tl.int32), 0)  # experts whose tiles all come before t
    here = idx == e
    first_tile = tl.sum(tl.where(here, tile_end - tiles, 0), 0)
    end = tl.sum(tl.where(here, row_end, 0), 0)
    row0 = end - tl.sum(tl.where(here, counts, 0), 0) + (t - first_tile) * BM
    rows = row0 + tl.arange(0, BM)
    return tl.where(e < E, e, -1), row0, rows, rows < end


@triton.jit
def _load_rows(a_ptr, DESC: tl.constexpr, row0, k0, a_rows, stride_am, k, row_mask, K):
    """The tile of rows x columns ``k`` (starting at k0, bounded by K): a TMA load at
    (row0, k0) when ``a_ptr`` is a descriptor over contiguous rows, else a masked pointer
    load of rows ``a_rows`` (token ids when gathering). The GEMM kernels' [BM, BK] A tiles;
    `wgrad_kernel`'s [BK, BM] / [BK, BN] operand tiles."""
    if DESC:
        a = a_ptr.load([row0, k0])
    else:
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + k[None, :], mask=row_mask[:, None] & (k < K)[None, :],
                    other=0.0)
    return a


@triton.jit
def tile_schedule_kernel(counts_ptr, tile_expert_ptr, tile_row_ptr, E, BM: tl.constexpr, E_POW2: tl.constexpr):
    """Writes `_tile_rows`' expert and first row of every tile (tests compare it with the host)."""
    t = tl.program_id(0)
    e, row0, _, _ = _tile_rows(t, counts_ptr, E, BM, E_POW2)
    tl.store(tile_expert_ptr + t, e)
    tl.store(tile_row_ptr + t, tl.where(e < 0, -1, row0))


@triton.jit
def glu_fwd_kernel(
    x_ptr, token_ptr, w_ptr, h_ptr, a_ptr,
    counts_ptr, E, n_tiles,
    D, H,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr, W_DESC: tl.constexpr, X_DESC: tl.constexpr, STORE_H: tl.constexpr,
):
    """``W_DESC``: ``w_ptr`` is a TMA descriptor over the 3-D view ``[2E, H, D]`` of W_in
    (block ``[2, BN, BK]``: the gate rows and the up rows of the same BN columns, and zeros
    past H). Without it, B's columns interleave gate and up rows (column 2j is gate j, 2j+1
    is up j) so that one product of pointer loads fills the ``[BM, 2BN]`` accumulator;
    columns past H are masked.

    ``X_DESC``: ``x_ptr`` is a TMA descriptor over rows already gathered into expert order
    (``x[token]``, ``[N, D]``, block ``[BM, BK]``) and ``token_ptr`` is unused; otherwise
    the rows are gathered by token inside the loads (Hopper's TMA cannot gather).
    ``STORE_H``: write h (training); inference writes only a."""
    pid_m, pid_n = _program_tile(n_tiles, H, BN, GROUP_M)
    e, row0, rows, row_mask = _tile_rows(pid_m, counts_ptr, E, BM, E_POW2)
    if e < 0:
        return
    if X_DESC:
        x_rows = rows.to(tl.int64)  # unused: the descriptor addresses rows by row0
    else:
        x_rows = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    ks = tl.arange(0, BK)
    if W_DESC:
        # One load brings the gate and the up block of the same columns; one product fills
        # the [BM, 2BN] accumulator (two loads and two products measured 2-6% slower).
        acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            a = _load_rows(x_ptr, X_DESC, row0, k0, x_rows, D, k0 + ks, row_mask, D)
            w = tl.reshape(w_ptr.load([2 * e, pid_n * BN, k0]), (2 * BN, BK))
            acc = tl.dot(a, w.T, acc, input_precision=PREC)
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN)), (0, 2, 1)))
    else:
        j2 = tl.arange(0, 2 * BN)
        cols2 = pid_n * BN + j2 // 2
        w_rows = cols2 + (j2 % 2) * H
        col2_mask = cols2 < H
        w_e = w_ptr + e.to(tl.int64) * (2 * H) * D
        acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            k = k0 + ks
            k_mask = k < D
            a = _load_rows(x_ptr, X_DESC, row0, k0, x_rows, D, k, row_mask, D)
            b = tl.load(w_e + w_rows[None, :].to(tl.int64) * D + k[:, None], mask=k_mask[:, None] & col2_mask[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
        acc_g, acc_u = tl.split(tl.reshape(acc, (BM, BN, 2)))
    cols = pid_n * BN + tl.arange(0, BN)
    out_mask = row_mask[:, None] & (cols < H)[None, :]
    rows64 = rows.to(tl.int64)
    g = acc_g.to(a_ptr.dtype.element_ty)
    u = acc_u.to(a_ptr.dtype.element_ty)
    if STORE_H:  # kept for backward; inference skips it
        h_row = h_ptr + rows64[:, None] * (2 * H)
        tl.store(h_row + cols[None, :], g, mask=out_mask)
        tl.store(h_row + H + cols[None, :], u, mask=out_mask)
    # The activation reads the rounded h, exactly what backward will recompute from.
    gf = g.to(tl.float32)
    act = gf * tl.sigmoid(gf) * u.to(tl.float32)
    tl.store(a_ptr + rows64[:, None] * H + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def gemm_kernel(
    a_ptr, b_ptr, c_ptr, token_ptr, weight_ptr,
    counts_ptr, E, n_tiles,
    K, N_COLS,
    stride_am, stride_be, stride_bk, stride_bn, stride_cm, b_rows_per_e,
    GATHER_A: tl.constexpr, SCALE: tl.constexpr, SCATTER_C: tl.constexpr,
    A_DESC: tl.constexpr, B_DESC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,
):
    """``B_DESC``: 0 = ``b_ptr`` is a pointer with strides; 1 = a TMA descriptor over the 2-D
    view ``[E * b_rows_per_e, K]`` (rows are output columns, k contiguous); 2 = a descriptor
    over ``[E * b_rows_per_e, N_COLS]`` (rows are k). ``A_DESC``: ``a_ptr`` is a descriptor
    over ``[N, K]`` (only without the gather). Descriptor tiles that run past an expert's
    rows read the next expert's rows; those products land only in masked outputs (or meet
    zeros of A's masked k), and the host uses mode 2 only when ``BK`` divides K.
    """
    pid_m, pid_n = _program_tile(n_tiles, N_COLS, BN, GROUP_M)
    e, row0, rows, row_mask = _tile_rows(pid_m, counts_ptr, E, BM, E_POW2)
    if e < 0:
        return
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < N_COLS
    rows64 = rows.to(tl.int64)
    tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    a_rows = tok if GATHER_A else rows64
    ks = tl.arange(0, BK)
    b_e = b_ptr + e.to(tl.int64) * stride_be if B_DESC == 0 else b_ptr
    b_row0 = e * b_rows_per_e
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + ks
        k_mask = k < K
        a = _load_rows(a_ptr, A_DESC, row0, k0, a_rows, stride_am, k, row_mask, K)
        if B_DESC == 1:
            b = b_ptr.load([b_row0 + pid_n * BN, k0]).T
        elif B_DESC == 2:
            b = b_ptr.load([b_row0 + k0, pid_n * BN])
        else:
            b = tl.load(b_e + k[:, None].to(tl.int64) * stride_bk + cols[None, :].to(tl.int64) * stride_bn,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if SCALE:
        w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SCATTER_C:
        tl.atomic_add(c_ptr + tok[:, None] * stride_cm + cols[None, :], acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _swiglu_bwd_chunk(ga_ptr, h_ptr, gh_ptr, wa_ptr, w, rows64, row_mask, cols, H):
    """One column chunk of `swiglu_bwd_kernel` (rows ``rows64``, columns ``cols`` of the H
    halves; ``w`` the rows' routing weights, float32): loads ga and h, stores dL/dh (both
    halves) and ``weight * a``, returns ``(g_gate, g_up, <ga, a>)``: the two dL/dh chunks as
    stored (gh's dtype) and each row's part of dL/dweight. Shared with
    `fp8_kernels.fp8_swiglu_bwd_kernel`, which also quantises the returned chunks."""
    mask = row_mask[:, None] & (cols < H)[None, :]
    ga = tl.load(ga_ptr + rows64[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h_row = h_ptr + rows64[:, None] * (2 * H)
    hg = tl.load(h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    hu = tl.load(h_row + H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(hg)
    silu = hg * sig
    act = silu * hu
    gw = tl.sum(ga * act, axis=1)
    ga = ga * w[:, None]
    g_gate = (ga * hu * (sig + silu * (1.0 - sig))).to(gh_ptr.dtype.element_ty)
    g_up = (ga * silu).to(gh_ptr.dtype.element_ty)
    gh_row = gh_ptr + rows64[:, None] * (2 * H)
    tl.store(gh_row + cols[None, :], g_gate, mask=mask)
    tl.store(gh_row + H + cols[None, :], g_up, mask=mask)
    tl.store(wa_ptr + rows64[:, None] * H + cols[None, :], (act * w[:, None]).to(wa_ptr.dtype.element_ty), mask=mask)
    return g_gate, g_up, gw


@triton.jit
def swiglu_bwd_kernel(
    ga_ptr, h_ptr, weight_ptr, gh_ptr, wa_ptr, gweight_ptr,
    N, H,
    BM: tl.constexpr, BH: tl.constexpr,
):
    """Elementwise SwiGLU backward with the routing weight, row-blocked.

    ``ga`` = gy[token] @ W_out[e] (before the weight). Writes
    ``dL/dweight[n] = <ga[n], a[n]>`` with ``a = silu(h_gate) * h_up``, ``weight * a``
    (the W_out gradient is ``gy[token]^T (weight * a)``, so the routing weight needs no
    pass over the gathered gy), and ``dL/dh = weight * ga * (dsilu(h_gate) * h_up, silu(h_gate))``.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    gw = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, H, BH):
        _, _, gw_chunk = _swiglu_bwd_chunk(ga_ptr, h_ptr, gh_ptr, wa_ptr, w, rows64, row_mask, c0 + tl.arange(0, BH), H)
        gw += gw_chunk
    tl.store(gweight_ptr + rows, gw, mask=row_mask)


@triton.jit
def wgrad_kernel(
    l_ptr, r_ptr, out_ptr, token_ptr, counts_ptr, E,
    P, Q, stride_l, stride_r,
    GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, L_DESC: tl.constexpr, R_DESC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, E_POW2: tl.constexpr,
):
    """Weight gradient ``out[e] = L[rows_e]^T @ R[rows_e]`` (``[E, P, Q]``), the reduction
    running over expert e's rows of the expert-sorted list.

    ``GATHER_L`` / ``GATHER_R``: that operand's rows are read by token (``L[token[n]]``), so
    the gathered copy of x or gy never exists. ``L_DESC`` / ``R_DESC``: that (ungathered)
    operand is a TMA descriptor over ``[N, P]`` / ``[N, Q]`` (block ``[BK, BM]`` /
    ``[BK, BN]``). A descriptor tile running past the expert's rows reads the next expert's
    rows; they meet the zeros of the other operand's masked rows, so the host pairs a
    descriptor only with a pointer-loaded operand. (Zeroing those rows in registers instead
    cost 1.5x: the tile then no longer goes from TMA straight to the tensor cores.)
    One program per (expert, BM x BN output tile), column blocks of a row block adjacent
    (they share L).
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(P, BM)
    n_n = tl.cdiv(Q, BN)
    e = pid // (n_m * n_n)
    pid_m = (pid % (n_m * n_n)) // n_n
    pid_n = pid % n_n
    idx = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + idx, mask=idx < E, other=0).to(tl.int32)
    end = tl.sum(tl.where(idx <= e, counts, 0), 0)
    start = end - tl.sum(tl.where(idx == e, counts, 0), 0)
    pc = pid_m * BM + tl.arange(0, BM)
    qc = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(start, end, BK):
        rows = r0 + ks
        rmask = rows < end
        if GATHER_L or GATHER_R:
            tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
        l_rows = tok if GATHER_L else rows.to(tl.int64)
        r_rows = tok if GATHER_R else rows.to(tl.int64)
        lt = _load_rows(l_ptr, L_DESC, r0, pid_m * BM, l_rows, stride_l, pc, rmask, P)  # [BK, BM]
        rt = _load_rows(r_ptr, R_DESC, r0, pid_n * BN, r_rows, stride_r, qc, rmask, Q)  # [BK, BN]
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision=PREC)
    out = out_ptr + e.to(tl.int64) * P * Q
    tl.store(out + pc[:, None].to(tl.int64) * Q + qc[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(pc < P)[:, None] & (qc < Q)[None, :])


# ------------------------------------------------------------------------------ decode path
# Inference with few rows per expert (`ops.moe_glu_decode`): the time is the read of the routed
# experts' weights, so the products are tiled to read each weight tile once, coalesced, with
# enough programs to fill the GPU at T=1: small row tiles (16 rows), narrow column blocks
# (`config.decode_configs` narrows them until a product has enough programs) and the whole reduction in one
# program (no split-K: the output columns alone give the parallelism, and SwiGLU needs the full
# h). Three launches whose grids depend on the sizes only (T, N, E, D, H), no host sync:
#   decode_glu_kernel     a[n] = silu(x[token[n]] @ Wg[e]^T) * (x[token[n]] @ Wu[e]^T)   [N, H]
#   decode_down_kernel    o[n] = weight[n] * (a[n] @ W_out[e]^T)                      [N, D] fp32
#   decode_combine_kernel y[t] = sum over n with token[n] == t of o[n], in assignment order,
#                         rounded once: deterministic (no atomics), as a CUDA graph replay
#                         must be to match eager.


@triton.jit
def decode_glu_kernel(
    x_ptr, token_ptr, w_ptr, a_ptr,
    counts_ptr, E, n_tiles,
    D, H,
    stride_we, stride_wh, stride_wd,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,
):
    """One program per (row tile of one expert, BN columns of H): gate and up columns of W_in
    (rows ``c`` and ``H + c`` of ``W_in[e]``) read once, [BK, BN] at a time, as two products
    into two [BM, BN] accumulators; the epilogue writes ``a = silu(g) * u`` from g rounded to
    a's dtype, as `glu_fwd_kernel` does. W_in is read through its strides (a transposed
    layout is read as it is stored, coalesced along H, never copied)."""
    pid_m, pid_n = _program_tile(n_tiles, H, BN, GROUP_M)
    e, row0, rows, row_mask = _tile_rows(pid_m, counts_ptr, E, BM, E_POW2)
    if e < 0:
        return
    tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < H
    w_g = w_ptr + e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wh
    w_u = w_g + H * stride_wh
    ks = tl.arange(0, BK)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + ks
        k_mask = k < D
        xa = tl.load(x_ptr + tok[:, None] * D + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        wg = tl.load(w_g + k[:, None] * stride_wd, mask=w_mask, other=0.0)
        wu = tl.load(w_u + k[:, None] * stride_wd, mask=w_mask, other=0.0)
        acc_g = tl.dot(xa, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(xa, wu, acc_u, input_precision=PREC)
    g = acc_g.to(a_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(a_ptr.dtype.element_ty).to(tl.float32)
    act = g * tl.sigmoid(g) * u
    out_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(a_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def decode_down_kernel(
    a_ptr, w_ptr, weight_ptr, o_ptr,
    counts_ptr, E, n_tiles,
    H, D,
    stride_we, stride_wd, stride_wh,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,
):
    """One program per (row tile of one expert, BN columns of D): ``o[n] = weight[n] *
    (a[n] @ W_out[e]^T)`` in float32, ``W_out[e]`` (through its strides) read once."""
    pid_m, pid_n = _program_tile(n_tiles, D, BN, GROUP_M)
    e, row0, rows, row_mask = _tile_rows(pid_m, counts_ptr, E, BM, E_POW2)
    if e < 0:
        return
    rows64 = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < D
    w_e = w_ptr + e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wd
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        k = k0 + ks
        k_mask = k < H
        aa = tl.load(a_ptr + rows64[:, None] * H + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_e + k[:, None] * stride_wh, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(aa, w, acc, input_precision=PREC)
    wt = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    acc = acc * wt[:, None]
    tl.store(o_ptr + rows64[:, None] * D + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def decode_combine_kernel(
    o_ptr, token_ptr, y_ptr,
    N, D,
    BN: tl.constexpr, CN: tl.constexpr, G: tl.constexpr,
):
    """One program per (token t, BN columns): ``y[t] = sum of o[n] over the assignments n of
    t``, in increasing n. The token ids are scanned CN at a time; the hits of a chunk are
    ranked by a prefix sum and their rows gathered G at a time (one [G, BN] load per G hits,
    so a token's k rows cost one or two memory round trips, not one per chunk or per row). A
    token without assignments gets zeros. The order of the sum depends on N and the routing
    alone: the result is deterministic (no atomics)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_mask = cols < D
    slots = tl.arange(0, G)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for n0 in range(0, N, CN):
        n = n0 + tl.arange(0, CN)
        hit = tl.load(token_ptr + n, mask=n < N, other=-1) == t
        rank = tl.cumsum(hit.to(tl.int32), 0)  # 1-based rank of each hit in the chunk
        n_hits = tl.max(rank, 0)
        for j0 in range(0, n_hits, G):
            # Row of the hit ranked j0 + g + 1, for each of the G slots.
            sel = hit[None, :] & (rank[None, :] == (j0 + slots + 1)[:, None])
            pos = tl.sum(tl.where(sel, n[None, :], 0), 1).to(tl.int64)
            valid = j0 + slots < n_hits
            v = tl.load(o_ptr + pos[:, None] * D + cols[None, :], mask=valid[:, None] & col_mask[None, :], other=0.0)
            acc += tl.sum(v, 0)
    tl.store(y_ptr + t.to(tl.int64) * D + cols, acc.to(y_ptr.dtype.element_ty), mask=col_mask)
