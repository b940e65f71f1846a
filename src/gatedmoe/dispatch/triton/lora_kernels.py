"""Triton kernels of the fused MoE with per-expert LoRA adapters (`gatedmoe.experts.lora`).

The adapted weight of expert e is ``W_e + s B_e A_e`` (``A_e [R, in]``, ``B_e [out, R]``); its
product with rows ``v`` is ``v W_e^T + (s v A_e^T) B_e^T``, computed with the rank R in the
middle (``B_e A_e`` is never formed). The ``[N, R]`` factor ``z = s v A_e^T`` is a grouped
product of its own (`lora_gemm_kernel` with ``LORA=False``, the R columns in one column
block, s in its epilogue); the second, ``z B_e^T``, is one more ``tl.dot`` into the
accumulator of the base product, before its epilogue (no second accumulator: on the GPU
the base tiles' fp32 accumulators already hold 128 x 256 values):

* `lora_glu_fwd_kernel` h = x[token] @ W_in[e]^T + z_in @ B_in[e]^T, then `glu_fwd_kernel`'s
                        epilogue (h kept for backward, a = silu(h_gate) * h_up).
* `lora_gemm_kernel`    C = alpha (A[rows] @ B[e] + Z[rows] @ L[e]), with `gemm_kernel`'s options
                        (gather A rows by token, scale rows by the routing weight, scatter-add
                        into C[token]); ``LORA=False`` is the plain grouped product, used for the
                        rank-R factors (alpha = s).

Both read the weight operand through a TMA descriptor where the host can make one, as the
base kernels do (else pointer loads with strides), and rows in expert order (ungathered, or
gathered into a copy beforehand) likewise. Rows gathered by token inside the loads and the
rank-R operands are pointer loads. The
backward's SwiGLU derivative and the adapters' gradients (``[E, R, in]`` and ``[E, out, R]``,
grouped per expert) are `kernels.swiglu_bwd_kernel` and `kernels.wgrad_kernel` unchanged.

Shape legend: T tokens, D model dim, H expert hidden, E experts, N routed assignments,
R adapter rank.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gatedmoe.dispatch.triton.kernels import _load_rows, _program_tile, _tile_rows


@triton.jit
def lora_glu_fwd_kernel(
    x_ptr, token_ptr, w_ptr, z_ptr, lb_ptr, h_ptr, a_ptr,
    counts_ptr, E, n_tiles,
    D, H, R,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
    GROUP_M: tl.constexpr, E_POW2: tl.constexpr, STORE_H: tl.constexpr, W_DESC: tl.constexpr,
    X_DESC: tl.constexpr,
):
    """`glu_fwd_kernel` plus the adapter term:
    ``z[rows] [BM, BR]`` times the rows of ``B_in[e] [2H, R]`` that match the accumulator's
    columns, BR ranks at a time, into the same accumulator (before the rounding to h). ``z``
    is ``s x[token] @ A_in[e]^T`` ``[N, R]`` in expert order, ``lb`` is ``B_in`` ``[E, 2H, R]``
    contiguous.

    ``W_DESC``: ``w_ptr`` is a TMA descriptor over the 3-D view ``[2E, H, D]`` of W_in (block
    ``[2, BN, BK]``), the accumulator's columns are the BN gate columns then the BN up
    columns; without it, pointer loads with gate and up columns interleaved. ``X_DESC``:
    ``x_ptr`` is a TMA descriptor over rows already gathered into expert order (``x[token]``,
    ``[N, D]``, block ``[BM, BK]``); otherwise rows are gathered by token inside the loads.
    Both as `glu_fwd_kernel`."""
    pid_m, pid_n = _program_tile(n_tiles, H, BN, GROUP_M)
    e, row0, rows, row_mask = _tile_rows(pid_m, counts_ptr, E, BM, E_POW2)
    if e < 0:
        return
    rows64 = rows.to(tl.int64)
    if X_DESC:
        x_rows = rows64  # unused: the descriptor addresses rows by row0
    else:
        x_rows = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    ks = tl.arange(0, BK)
    j2 = tl.arange(0, 2 * BN)
    acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
    if W_DESC:
        cols2 = pid_n * BN + j2 % BN
        w_rows = (cols2 + (j2 // BN) * H).to(tl.int64)
        for k0 in range(0, D, BK):
            a = _load_rows(x_ptr, X_DESC, row0, k0, x_rows, D, k0 + ks, row_mask, D)
            w = tl.reshape(w_ptr.load([2 * e, pid_n * BN, k0]), (2 * BN, BK))
            acc = tl.dot(a, w.T, acc, input_precision=PREC)
    else:
        cols2 = pid_n * BN + j2 // 2
        w_rows = (cols2 + (j2 % 2) * H).to(tl.int64)
        w_e = w_ptr + e.to(tl.int64) * (2 * H) * D
        for k0 in range(0, D, BK):
            k = k0 + ks
            a = _load_rows(x_ptr, X_DESC, row0, k0, x_rows, D, k, row_mask, D)
            b = tl.load(w_e + w_rows[None, :] * D + k[:, None], mask=(k < D)[:, None] & (cols2 < H)[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    col2_mask = cols2 < H
    # The adapter term: R/D of the base product's work, on the tile already in registers.
    lb_e = lb_ptr + e.to(tl.int64) * (2 * H) * R
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        r_mask = r < R
        z = tl.load(z_ptr + rows64[:, None] * R + r[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        lb = tl.load(lb_e + w_rows[None, :] * R + r[:, None], mask=r_mask[:, None] & col2_mask[None, :], other=0.0)
        acc = tl.dot(z, lb, acc, input_precision=PREC)
    if W_DESC:
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN)), (0, 2, 1)))
    else:
        acc_g, acc_u = tl.split(tl.reshape(acc, (BM, BN, 2)))
    cols = pid_n * BN + tl.arange(0, BN)
    out_mask = row_mask[:, None] & (cols < H)[None, :]
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
def lora_gemm_kernel(
    a_ptr, b_ptr, c_ptr, z_ptr, l_ptr, token_ptr, weight_ptr,
    counts_ptr, E, n_tiles,
    K, N_COLS, R, alpha,
    stride_am, stride_be, stride_bk, stride_bn, stride_cm, stride_le, stride_lr, stride_ln, b_rows_per_e,
    GATHER_A: tl.constexpr, SCALE: tl.constexpr, SCATTER_C: tl.constexpr, LORA: tl.constexpr,
    A_DESC: tl.constexpr, B_DESC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
    GROUP_M: tl.constexpr, E_POW2: tl.constexpr,
):
    """``C[rows_e] = alpha * (A[rows_e] @ B[e] (+ Z[rows_e] @ L[e]))`` over the expert-sorted rows.

    B's element ``[e, k, n]`` is at ``b_ptr + e * stride_be + k * stride_bk + n * stride_bn``;
    with ``LORA``, ``Z`` is ``[N, R]`` contiguous in expert order and L's element ``[e, r, n]``
    at the ``stride_l*`` strides. ``GATHER_A``: A's rows are read by token (``a[token[n]]``);
    ``SCALE``: rows times ``weight[n]``; ``SCATTER_C``: rows added
    into ``c[token[n]]`` (atomics in c's dtype) instead of stored at ``c[n]``; ``A_DESC`` and
    ``B_DESC`` (TMA descriptors for the ungathered rows and the weight), as
    `kernels.gemm_kernel` does."""
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
    if LORA:
        l_e = l_ptr + e.to(tl.int64) * stride_le
        for r0 in range(0, R, BR):
            r = r0 + tl.arange(0, BR)
            r_mask = r < R
            z = tl.load(z_ptr + rows64[:, None] * R + r[None, :], mask=row_mask[:, None] & r_mask[None, :],
                        other=0.0)
            lt = tl.load(l_e + r[:, None].to(tl.int64) * stride_lr + cols[None, :].to(tl.int64) * stride_ln,
                         mask=r_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(z, lt, acc, input_precision=PREC)
    acc = acc * alpha
    if SCALE:
        w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SCATTER_C:
        tl.atomic_add(c_ptr + tok[:, None] * stride_cm + cols[None, :], acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=out_mask)
