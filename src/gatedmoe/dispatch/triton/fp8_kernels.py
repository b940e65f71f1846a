"""Triton kernels of the FP8 path (`gatedmoe.dispatch.options.FP8Recipe`).

* `quantize_rows_kernel`   activation rows -> FP8 with one power-of-two scale per
                           ``1 x G`` tile (G = the recipe's block, or the whole row).
* `quantize_blocks_kernel` a weight ``[E, R, C]`` -> e4m3 with one scale per ``B x B``
                           block, optionally also writing the transposed copy ``[E, C, R]``
                           the backward's data-gradient GEMMs read (same blocks, same scales).
* `fp8_glu_fwd_kernel`     h = xq[token] @ W_in[e]^T (x quantised per token, gathered in the
                           loads as FP8: half the bytes of the bf16 gather) with the SwiGLU
                           epilogue writing h (input dtype, for backward) and a, quantised
                           in the epilogue (blockwise: the tile's BN columns are one 1 x block
                           tile of each row, so its amax is the tile's row max).
* `fp8_swiglu_bwd_kernel`  the SwiGLU backward of `kernels.swiglu_bwd_kernel` (its column
                           chunks: `kernels._swiglu_bwd_chunk`), also writing dL/dh quantised
                           in 1 x block tiles (blockwise).
* `fp8_gemm_kernel`        C = A[rows] @ B[e]^T with FP8 A and B (B stored ``[E, N_COLS, K]``,
                           k contiguous, as Hopper's FP8 tensor cores read both operands;
                           B, and A when not gathered, through TMA descriptors),
                           optionally gathering A by token, scaling rows by the routing
                           weight, and scatter-adding into C[token]: the forward's second
                           GEMM and both backward data-gradient GEMMs.

The weight gradients stay in the input dtype (`launchers.weight_grad`): FP8 weight-gradient
kernels were measured slower and less accurate and dropped (kernels README, "FP8").

Scaling: blockwise (``BLOCKWISE``) takes one ``BK``-deep slice of the reduction per step
with ``BK`` = the block: its product starts from zero (so Hopper's reduced-precision FP8
accumulation spans ``BK`` products) and is scaled by the row's and the column's scale of
that slice and added to a float32 accumulator, as DeepSeek-V3 promotes every 128 products.
Rowwise accumulates all of K (promoted every ``BK`` products through
``max_num_imprecise_acc``) and scales once in the epilogue.

Every scale is a power of two (`_pow2_scale`): q = RN(v * 2^-e) is exact up to the FP8
rounding, which is round to nearest even (``fp_downcast_rounding="rtne"``, the GPU's default,
spelled out; Triton's interpreter drops carries either way, see `_round_fp8_in_fp32`).

Shape legend: T tokens, D model dim, H expert hidden, E experts, N routed assignments,
KB scale blocks along a reduction.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gatedmoe.dispatch.triton.kernels import _program_tile, _swiglu_bwd_chunk, _tile_rows

_AMAX_FLOOR = tl.constexpr(2.0**-100)


@triton.jit
def _pow2_scale(amax, FMAX_EXP: tl.constexpr):
    """``(s, 1/s)``: the smallest power of two ``s`` with ``amax / s <= 1.75 * 2^FMAX_EXP``
    (the format's maximum), from the float32 bits of amax (`fp8_reference.pow2_scale`)."""
    bits = tl.maximum(amax, _AMAX_FLOOR).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 - FMAX_EXP + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return scale, inv


@triton.jit
def _round_fp8_in_fp32(v, FMAX_EXP: tl.constexpr):
    """``v`` rounded to the nearest (ties to even) value of the FP8 format, as float32: integer
    rounding of the float32 bits to the format's mantissa width (the carry moves into the
    exponent), and below the format's smallest normal a round to its subnormal spacing by
    adding and subtracting 1.5 times a power of two (v + MAGIC stays in one binade for
    either sign of v). Triton's interpreter (3.9) drops that carry in
    its own float8 conversion (127.9 -> 64 in e4m3); its conversion of a value the format
    holds exactly is right, so the kernels round first when interpreted (``ROUND``)."""
    if FMAX_EXP == 8:  # e4m3: 3 mantissa bits, smallest normal 2^-6
        DROP: tl.constexpr = 20
        MAGIC: tl.constexpr = 24576.0  # 1.5 * 2^14: ulp 2^-9 (the subnormal spacing) for +-v
        TINY: tl.constexpr = 0.015625
    else:  # e5m2: 2 mantissa bits, smallest normal 2^-14
        DROP: tl.constexpr = 21
        MAGIC: tl.constexpr = 192.0  # 1.5 * 2^7: ulp 2^-16
        TINY: tl.constexpr = 0.00006103515625
    v_bits = v.to(tl.int32, bitcast=True)
    bits = (v_bits + ((1 << (DROP - 1)) - 1) + ((v_bits >> DROP) & 1)) & ~((1 << DROP) - 1)
    sub = tl.abs((v + MAGIC) - MAGIC)
    # The sign bit, not v < 0: -0.0 for -0.0 and for a small negative, as the conversion gives.
    sub = tl.where(v_bits < 0, -sub, sub)
    return tl.where(tl.abs(v) < TINY, sub, bits.to(tl.float32, bitcast=True))


@triton.jit
def _to_fp8(v, inv, FMAX: tl.constexpr, FMAX_EXP: tl.constexpr, dtype: tl.constexpr, ROUND: tl.constexpr):
    """``RN(v * inv)`` in ``dtype``, clamped to the format's range (exact scaling by a power
    of two; only the rounding to FP8 is inexact). ``ROUND``: round in float32 first
    (`_round_fp8_in_fp32`, for the interpreter)."""
    q = tl.minimum(tl.maximum(v * inv, -FMAX), FMAX)
    if ROUND:
        q = _round_fp8_in_fp32(q, FMAX_EXP)
    return q.to(dtype, fp_downcast_rounding="rtne")


@triton.jit
def quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr, R, C, stride_x, KB, G,
    BR: tl.constexpr, BC: tl.constexpr, FMAX: tl.constexpr, FMAX_EXP: tl.constexpr, ROUND: tl.constexpr,
):
    """Program (row block, tile): ``s[r, kb]`` and ``q[r, kb*G : (kb+1)*G]`` (q contiguous,
    ``[R, C]``; s ``[R, KB]``). Two sweeps over the tile's columns: amax, then quantise."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    kb = tl.program_id(1)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    c0 = kb * G
    c1 = tl.minimum(c0 + G, C)
    amax = tl.zeros((BR,), dtype=tl.float32)
    for c in range(c0, c1, BC):
        cols = c + tl.arange(0, BC)
        mask = rmask[:, None] & (cols < c1)[None, :]
        v = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
    scale, inv = _pow2_scale(amax, FMAX_EXP)
    for c in range(c0, c1, BC):
        cols = c + tl.arange(0, BC)
        mask = rmask[:, None] & (cols < c1)[None, :]
        v = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + rows64[:, None] * C + cols[None, :], _to_fp8(v, inv[:, None], FMAX, FMAX_EXP, q_ptr.dtype.element_ty, ROUND),
                 mask=mask)
    tl.store(s_ptr + rows64 * KB + kb, scale, mask=rmask)


@triton.jit
def _weight_tile(w_ptr, R, C, RB, CB, BR: tl.constexpr, BC: tl.constexpr):
    """The tile of ``w [E, R, C]`` a program over (e, row block, column block) owns:
    ``(e, rb, cb, r, c, base, w [BR, BC] float32)``, zeros past the edges."""
    pid = tl.program_id(0)
    e = pid // (RB * CB)
    rb = (pid // CB) % RB
    cb = pid % CB
    r = rb * BR + tl.arange(0, BR)
    c = cb * BC + tl.arange(0, BC)
    base = e.to(tl.int64) * R * C
    mask = (r < R)[:, None] & (c < C)[None, :]
    w = tl.load(w_ptr + base + r[:, None].to(tl.int64) * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    return e, rb, cb, r, c, base, w


@triton.jit
def _store_transposed(w_ptr, qt_ptr, base, r, c, R, C, inv, FMAX: tl.constexpr, FMAX_EXP: tl.constexpr,
                      ROUND: tl.constexpr):
    """The tile ``w[e, r, c]`` read again transposed, rounded with ``inv`` (a scalar, or one
    per column c as ``[BC, 1]``) and stored into ``qt [E, C, R]`` along qt's rows. Storing the
    rounded tile through transposed pointers wrote every fourth row of qt wrong on the H200
    (Triton 3.6, the one-byte elements; README, 'FP8'), and the data-gradient GEMMs read qt;
    rounding is elementwise, so these are the same bytes."""
    mask_t = (c < C)[:, None] & (r < R)[None, :]
    wt = tl.load(w_ptr + base + r[None, :].to(tl.int64) * C + c[:, None], mask=mask_t, other=0.0).to(tl.float32)
    qt = _to_fp8(wt, inv, FMAX, FMAX_EXP, qt_ptr.dtype.element_ty, ROUND)
    tl.store(qt_ptr + base + c[:, None].to(tl.int64) * R + r[None, :], qt, mask=mask_t)


@triton.jit
def quantize_blocks_kernel(
    w_ptr, q_ptr, qt_ptr, s_ptr, R, C, RB, CB,
    B: tl.constexpr, FMAX: tl.constexpr, FMAX_EXP: tl.constexpr, WRITE_T: tl.constexpr, ROUND: tl.constexpr,
):
    """Program (e, row block, column block) of ``w [E, R, C]``: ``s[e, rb, cb]``, its block
    of ``q [E, R, C]`` and, with ``WRITE_T``, of ``qt [E, C, R]`` (the transpose)."""
    e, rb, cb, r, c, base, w = _weight_tile(w_ptr, R, C, RB, CB, B, B)
    scale, inv = _pow2_scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), FMAX_EXP)
    q = _to_fp8(w, inv, FMAX, FMAX_EXP, q_ptr.dtype.element_ty, ROUND)
    mask = (r < R)[:, None] & (c < C)[None, :]
    tl.store(q_ptr + base + r[:, None].to(tl.int64) * C + c[None, :], q, mask=mask)
    if WRITE_T:
        _store_transposed(w_ptr, qt_ptr, base, r, c, R, C, inv, FMAX, FMAX_EXP, ROUND)
    tl.store(s_ptr + tl.program_id(0), scale)


@triton.jit
def weight_amax_kernel(w_ptr, rmax_ptr, cmax_ptr, R, C, RB, CB, BR: tl.constexpr, BC: tl.constexpr):
    """Program (e, row block, column block) of ``w [E, R, C]``: the tile's row and column
    amaxes max-ed into ``rmax [E, R]`` and ``cmax [E, C]``, zero-initialised int32 holding
    float32 bits (amaxes are >= 0, whose bit patterns order as their values)."""
    e, rb, cb, r, c, base, w = _weight_tile(w_ptr, R, C, RB, CB, BR, BC)
    a = tl.abs(w)
    tl.atomic_max(rmax_ptr + e * R + r, tl.max(a, axis=1).to(tl.int32, bitcast=True), mask=r < R)
    tl.atomic_max(cmax_ptr + e * C + c, tl.max(a, axis=0).to(tl.int32, bitcast=True), mask=c < C)


@triton.jit
def quantize_rows_and_cols_kernel(
    w_ptr, q_ptr, qt_ptr, s_ptr, st_ptr, rmax_ptr, cmax_ptr, R, C, RB, CB,
    BR: tl.constexpr, BC: tl.constexpr, FMAX: tl.constexpr, FMAX_EXP: tl.constexpr, ROUND: tl.constexpr,
):
    """Program (e, row block, column block) of ``w [E, R, C]``, after `weight_amax_kernel`:
    its tile of ``q [E, R, C]`` scaled per row (``s [E, R]``) and of ``qt [E, C, R]``, the
    transpose, scaled per row of its own (``st [E, C]``, from w's column amaxes). The
    rowwise recipe's weight and its transpose from two reads of w, where quantising a
    transposed copy took a copy and four more."""
    e, rb, cb, r, c, base, w = _weight_tile(w_ptr, R, C, RB, CB, BR, BC)
    rmask = r < R
    cmask = c < C
    rs, rinv = _pow2_scale(tl.load(rmax_ptr + e * R + r, mask=rmask, other=0).to(tl.float32, bitcast=True), FMAX_EXP)
    cs, cinv = _pow2_scale(tl.load(cmax_ptr + e * C + c, mask=cmask, other=0).to(tl.float32, bitcast=True), FMAX_EXP)
    q = _to_fp8(w, rinv[:, None], FMAX, FMAX_EXP, q_ptr.dtype.element_ty, ROUND)
    tl.store(q_ptr + base + r[:, None].to(tl.int64) * C + c[None, :], q, mask=rmask[:, None] & cmask[None, :])
    _store_transposed(w_ptr, qt_ptr, base, r, c, R, C, cinv[:, None], FMAX, FMAX_EXP, ROUND)
    if cb == 0:
        tl.store(s_ptr + e * R + r, rs, mask=rmask)
    if rb == 0:
        tl.store(st_ptr + e * C + c, cs, mask=cmask)


@triton.jit
def fp8_glu_fwd_kernel(
    xq_ptr, xs_ptr, token_ptr, w_ptr, ws_ptr, h_ptr, a_ptr, as_ptr,
    counts_ptr, E, n_tiles, D, H, KB, WNB, WKB,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, E_POW2: tl.constexpr,
    BLOCKWISE: tl.constexpr, WB: tl.constexpr, STORE_H: tl.constexpr, QUANT_A: tl.constexpr,
    FMAX: tl.constexpr, FMAX_EXP: tl.constexpr, ROUND: tl.constexpr, W_DESC: tl.constexpr,
):
    """``xq [T, D]`` FP8 with scales ``xs [T, KB]``; ``w [E, 2H, D]`` e4m3 (gate rows, then
    up rows) with scales ``ws [E, WNB, WKB]``, weight row r's scale row ``r // WB``.
    Writes h ``[N, 2H]`` (``STORE_H``) and a ``[N, H]``: with ``QUANT_A`` (blockwise, BN ==
    the block) as FP8 into ``a_ptr`` with scales ``as [N, H / BN]``, else in h's dtype.
    ``W_DESC``: ``w_ptr`` is a TMA descriptor over ``[E * 2H, D]`` (block ``[BN, BK]``); a
    gate block running past H reads up rows, which land only in masked columns."""
    pid_m, pid_n = _program_tile(n_tiles, H, BN, GROUP_M)
    e, row0, rows, row_mask = _tile_rows(pid_m, counts_ptr, E, BM, E_POW2)
    if e < 0:
        return
    tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < H
    g_rows = cols.to(tl.int64)
    u_rows = g_rows + H
    ws_e = ws_ptr + e.to(tl.int64) * WNB * WKB
    ks = tl.arange(0, BK)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + ks
        k_mask = k < D
        a = tl.load(xq_ptr + tok[:, None] * D + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if W_DESC:
            w_row0 = e * (2 * H) + pid_n * BN
            bg = w_ptr.load([w_row0, k0]).T
            bu = w_ptr.load([w_row0 + H, k0]).T
        else:
            w_e = w_ptr + e.to(tl.int64) * (2 * H) * D
            b_mask = k_mask[:, None] & col_mask[None, :]
            bg = tl.load(w_e + g_rows[None, :] * D + k[:, None], mask=b_mask, other=0.0)
            bu = tl.load(w_e + u_rows[None, :] * D + k[:, None], mask=b_mask, other=0.0)
        if BLOCKWISE:
            kb = k0 // BK
            sa = tl.load(xs_ptr + tok * KB + kb, mask=row_mask, other=0.0)
            sg = tl.load(ws_e + (g_rows // WB) * WKB + kb, mask=col_mask, other=0.0)
            su = tl.load(ws_e + (u_rows // WB) * WKB + kb, mask=col_mask, other=0.0)
            acc_g += tl.dot(a, bg) * (sa[:, None] * sg[None, :])
            acc_u += tl.dot(a, bu) * (sa[:, None] * su[None, :])
        else:
            acc_g = tl.dot(a, bg, acc_g, max_num_imprecise_acc=BK)
            acc_u = tl.dot(a, bu, acc_u, max_num_imprecise_acc=BK)
    if not BLOCKWISE:
        sa = tl.load(xs_ptr + tok * KB, mask=row_mask, other=0.0)
        sg = tl.load(ws_e + (g_rows // WB) * WKB, mask=col_mask, other=0.0)
        su = tl.load(ws_e + (u_rows // WB) * WKB, mask=col_mask, other=0.0)
        acc_g = acc_g * (sa[:, None] * sg[None, :])
        acc_u = acc_u * (sa[:, None] * su[None, :])
    out_mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    g = acc_g.to(h_ptr.dtype.element_ty)
    u = acc_u.to(h_ptr.dtype.element_ty)
    if STORE_H:
        h_row = h_ptr + rows64[:, None] * (2 * H)
        tl.store(h_row + cols[None, :], g, mask=out_mask)
        tl.store(h_row + H + cols[None, :], u, mask=out_mask)
    # From the rounded h, as backward recomputes it; rounded to h's dtype, as the reference
    # quantises it.
    gf = g.to(tl.float32)
    act = (gf * tl.sigmoid(gf) * u.to(tl.float32)).to(h_ptr.dtype.element_ty).to(tl.float32)
    if QUANT_A:
        act = tl.where(out_mask, act, 0.0)
        scale, inv = _pow2_scale(tl.max(tl.abs(act), axis=1), FMAX_EXP)
        tl.store(a_ptr + rows64[:, None] * H + cols[None, :], _to_fp8(act, inv[:, None], FMAX, FMAX_EXP, a_ptr.dtype.element_ty, ROUND),
                 mask=out_mask)
        tl.store(as_ptr + rows64 * tl.cdiv(H, BN) + pid_n, scale, mask=row_mask)
    else:
        tl.store(a_ptr + rows64[:, None] * H + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, token_ptr, weight_ptr,
    counts_ptr, E, n_tiles, K, N_COLS, KB, WNB, WKB, stride_cm,
    GATHER_A: tl.constexpr, SCALE: tl.constexpr, SCATTER_C: tl.constexpr,
    BLOCKWISE: tl.constexpr, WB: tl.constexpr, A_DESC: tl.constexpr, B_DESC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, E_POW2: tl.constexpr,
):
    """``C[rows_e] = A[rows_e] @ B[e]^T``: A FP8 ``[*, K]`` (rows by token with
    ``GATHER_A``) with scales ``as [*, KB]``; B e4m3 ``[E, N_COLS, K]`` with scales
    ``bs [E, WNB, WKB]`` (row r's scale row ``r // WB``). ``SCALE``: rows times
    ``weight[n]``; ``SCATTER_C``: rows added into ``c[token[n]]`` (atomics in c's dtype),
    else stored at ``c[n]``. ``B_DESC``: ``b_ptr`` is a TMA descriptor over ``[E * N_COLS, K]``
    (block ``[BN, BK]``); tiles running past the expert's N_COLS rows land in masked columns.
    ``A_DESC`` (only without ``GATHER_A``): ``a_ptr`` is a descriptor over ``[N, K]`` (block
    ``[BM, BK]``); rows past the expert's land in masked rows."""
    pid_m, pid_n = _program_tile(n_tiles, N_COLS, BN, GROUP_M)
    e, row0, rows, row_mask = _tile_rows(pid_m, counts_ptr, E, BM, E_POW2)
    if e < 0:
        return
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < N_COLS
    rows64 = rows.to(tl.int64)
    tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    a_rows = tok if GATHER_A else rows64
    bs_e = bs_ptr + e.to(tl.int64) * WNB * WKB
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + ks
        k_mask = k < K
        if A_DESC:
            a = a_ptr.load([row0, k0])
        else:
            a = tl.load(a_ptr + a_rows[:, None] * K + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if B_DESC:
            b = b_ptr.load([e * N_COLS + pid_n * BN, k0]).T
        else:
            b_e = b_ptr + e.to(tl.int64) * N_COLS * K
            b = tl.load(b_e + cols64[None, :] * K + k[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if BLOCKWISE:
            kb = k0 // BK
            sa = tl.load(as_ptr + a_rows * KB + kb, mask=row_mask, other=0.0)
            sb = tl.load(bs_e + (cols64 // WB) * WKB + kb, mask=col_mask, other=0.0)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        else:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BK)
    if not BLOCKWISE:
        sa = tl.load(as_ptr + a_rows * KB, mask=row_mask, other=0.0)
        sb = tl.load(bs_e + (cols64 // WB) * WKB, mask=col_mask, other=0.0)
        acc = acc * (sa[:, None] * sb[None, :])
    if SCALE:
        w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SCATTER_C:
        tl.atomic_add(c_ptr + tok[:, None] * stride_cm + cols[None, :], acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _quantize_row_tiles(v, q_ptrs, s_ptrs, mask, row_mask, FMAX: tl.constexpr, FMAX_EXP: tl.constexpr,
                        ROUND: tl.constexpr):
    """``v [BM, B]`` (float32) as one ``1 x B`` tile of each row: the FP8 values at ``q_ptrs``,
    each row's scale at ``s_ptrs`` (masked by ``mask`` / ``row_mask``)."""
    scale, inv = _pow2_scale(tl.max(tl.abs(v), axis=1), FMAX_EXP)
    tl.store(q_ptrs, _to_fp8(v, inv[:, None], FMAX, FMAX_EXP, q_ptrs.dtype.element_ty, ROUND), mask=mask)
    tl.store(s_ptrs, scale, mask=row_mask)


@triton.jit
def fp8_swiglu_bwd_kernel(
    ga_ptr, h_ptr, weight_ptr, gh_ptr, wa_ptr, gweight_ptr, ghq_ptr, ghs_ptr,
    N, H,
    BM: tl.constexpr, BH: tl.constexpr, FMAX: tl.constexpr, FMAX_EXP: tl.constexpr, ROUND: tl.constexpr,
):
    """`kernels.swiglu_bwd_kernel` (same outputs, the same `kernels._swiglu_bwd_chunk`) that
    also quantises dL/dh for the dL/dx GEMM: with ``BH`` = the block (H a multiple of it)
    each column chunk of the gate and of the up half is one ``1 x BH`` tile of each row of
    dL/dh, so its amax is the chunk's row max and ``ghq [N, 2H]`` / ``ghs [N, 2H / BH]`` are
    written with no second pass over dL/dh. The tiles quantise dL/dh rounded to its dtype,
    as the reference does."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    HB = H // BH  # scale blocks per half: gate tiles at [0, HB), up tiles at [HB, 2 HB)
    w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    gw = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, H, BH):
        cols = c0 + tl.arange(0, BH)
        g_gate, g_up, gw_chunk = _swiglu_bwd_chunk(ga_ptr, h_ptr, gh_ptr, wa_ptr, w, rows64, row_mask, cols, H)
        gw += gw_chunk
        mask = row_mask[:, None] & (cols < H)[None, :]
        q_row = ghq_ptr + rows64[:, None] * (2 * H)
        s_row = ghs_ptr + rows64 * (2 * HB) + c0 // BH
        _quantize_row_tiles(g_gate.to(tl.float32), q_row + cols[None, :], s_row, mask, row_mask, FMAX, FMAX_EXP, ROUND)
        _quantize_row_tiles(g_up.to(tl.float32), q_row + H + cols[None, :], s_row + HB, mask, row_mask, FMAX, FMAX_EXP,
                            ROUND)
    tl.store(gweight_ptr + rows, gw, mask=row_mask)
