"""Host side of the kernels in `kernels.py`: one ``launch_*`` function per kernel (grid,
TMA descriptors, constexpr flags), the row-tile schedule the kernels follow, and the
weight-gradient products done with torch (`weight_grad`). `reference.py` holds a plain
PyTorch version of each launcher with the same signature.

Shape legend: T tokens, D model dim, H expert hidden, E experts, N routed assignments.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

try:  # Triton >= 3.3: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

from gatedmoe.dispatch.triton.config import DECODE_COMBINE_BLOCK, KernelConfig, decode_row_tiles
from gatedmoe.dispatch.triton.kernels import (
    decode_combine_kernel,
    decode_down_kernel,
    decode_glu_kernel,
    gemm_kernel,
    glu_fwd_kernel,
    swiglu_bwd_kernel,
    tile_schedule_kernel,
    wgrad_kernel,
)

__all__ = [
    "alloc",
    "e_pow2",
    "device_tile_schedule",
    "launch_decode_combine",
    "launch_decode_down",
    "launch_decode_glu",
    "launch_gemm",
    "launch_glu_fwd",
    "launch_swiglu_bwd",
    "launch_wgrad",
    "n_row_tiles",
    "precision",
    "scatter_buffer",
    "tile_schedule",
    "tma_ok",
    "weight_grad",
]


def alloc(*shape: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Uninitialised buffer for a kernel to fill (tests swap in a NaN-poisoned one)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for inputs of ``dtype``: IEEE for float32 (TF32 would
    lose the float32 results the tests compare), "tf32" otherwise (unused by 16-bit dots)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_ok(t: Tensor, last_dim: int) -> bool:
    """Whether a TMA descriptor can address ``t`` (CUDA, 16-bit, 16-byte aligned rows and base)."""
    return (
        TensorDescriptor is not None
        and t.is_cuda
        and t.dtype in (torch.bfloat16, torch.float16)
        and (last_dim * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def tile_schedule(counts_E: Tensor, N: int, BM: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row tiles that never straddle experts: the readable reference of the schedule each
    kernel program computes for itself (`kernels._tile_rows`).

    Returns ``(tile_expert [MT], tile_row [MT], expert_end [E])`` with
    ``MT = ceil(N / BM) + E`` (an upper bound); unused tiles have ``tile_expert == -1``.
    """
    E = counts_E.numel()
    counts = counts_E.to(torch.int64)
    expert_end = torch.cumsum(counts, 0)
    tiles = (counts + BM - 1) // BM
    tile_end = torch.cumsum(tiles, 0)
    MT = triton.cdiv(N, BM) + E
    t = torch.arange(MT, device=counts.device)
    e = torch.searchsorted(tile_end, t, right=True)
    valid = e < E
    ec = e.clamp(max=E - 1)
    first_tile = tile_end[ec] - tiles[ec]
    tile_row = (expert_end[ec] - counts[ec]) + (t - first_tile) * BM
    tile_expert = torch.where(valid, e, torch.full_like(e, -1))
    return tile_expert.to(torch.int32), tile_row.to(torch.int32), expert_end.to(torch.int32)


def n_row_tiles(N: int, E: int, BM: int) -> int:
    """Programs along the rows: an upper bound on the tiles (each expert may leave one partial)."""
    return triton.cdiv(N, BM) + E


def e_pow2(E: int) -> int:
    """The kernels' ``E_POW2``: E rounded up to a power of two, at least 16 (a ``tl.arange``
    over the experts for the in-kernel tile schedule)."""
    return max(16, triton.next_power_of_2(E))


def scatter_buffer(T: int, D: int, like: Tensor, fp32_scatter: bool) -> Tensor:
    """Zeroed ``[T, D]`` buffer the scatter GEMMs add their rows into: float32 with
    ``fp32_scatter`` (see `TritonOptions`), else ``like``'s dtype."""
    return torch.zeros(T, D, device=like.device, dtype=torch.float32 if fp32_scatter else like.dtype)


def device_tile_schedule(counts_E: Tensor, N: int, BM: int) -> tuple[Tensor, Tensor]:
    """``(tile_expert, tile_row)`` as the kernels compute them (-1 for unused tiles); for tests."""
    E = counts_E.numel()
    MT = n_row_tiles(N, E, BM)
    tile_expert = alloc(MT, device=counts_E.device, dtype=torch.int32)
    tile_row = alloc(MT, device=counts_E.device, dtype=torch.int32)
    tile_schedule_kernel[(MT,)](counts_E, tile_expert, tile_row, E, BM=BM, E_POW2=e_pow2(E))
    return tile_expert, tile_row


def launch_glu_fwd(x, token, w_in, h, a, counts, N: int, D: int, H: int, cfg: KernelConfig, prec: str, *,
                   gathered: bool = False, store_h: bool = True) -> None:
    """``h[n] = x[token[n]] @ W_in[e]^T`` ([N, 2H], gate then up) and ``a = silu(h_gate) * h_up``
    ([N, H]) over the expert-sorted rows. ``gathered``: ``x`` holds the rows already in
    expert order (``x[token]``, [N, D]); ``store_h=False``: write only the activation ``a``
    (inference)."""
    E = w_in.shape[0]
    w_arg, w_desc = w_in, False
    if cfg.tma and w_in.is_contiguous() and tma_ok(w_in, D):
        w_arg, w_desc = TensorDescriptor.from_tensor(w_in.view(E * 2, H, D), [2, cfg.BN, cfg.BK]), True
    x_arg, x_desc = x, False
    if gathered:
        if not tma_ok(x, D):
            raise ValueError("gathered rows are read through TMA: pass bf16/fp16 CUDA rows with 16-byte aligned rows")
        x_arg, x_desc = TensorDescriptor.from_tensor(x, [cfg.BM, cfg.BK]), True
    MT = n_row_tiles(N, E, cfg.BM)
    glu_fwd_kernel[(triton.cdiv(H, cfg.BN) * MT,)](
        x_arg, token, w_arg, h, a, counts, E, MT, D, H,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PREC=prec, GROUP_M=cfg.group_m, E_POW2=e_pow2(E),
        W_DESC=w_desc, X_DESC=x_desc, STORE_H=store_h, num_warps=cfg.warps, num_stages=cfg.stages,
    )


def launch_swiglu_bwd(ga, h, weight, gh, wa, gweight, N: int, H: int) -> None:
    """SwiGLU backward with the routing weight: from ``ga = gy[token] @ W_out[e]`` ([N, H])
    and h ([N, 2H]) write dL/dh ``gh`` ([N, 2H]), ``wa = weight * a`` ([N, H]; may be ``ga``
    itself) and dL/dweight ``gweight`` ([N], float32)."""
    BM, BH = (16, 16) if ga.device.type != "cuda" else (8, 256)
    swiglu_bwd_kernel[(triton.cdiv(N, BM),)](ga, h, weight, gh, wa, gweight, N, H, BM=BM, BH=BH,
                                              num_warps=1 if ga.device.type != "cuda" else 4)


def launch_gemm(a, b, b_strides, c, token, weight, counts, N: int, K: int, n_cols: int, *,
                gather: bool, scale: bool, scatter: bool, cfg: KernelConfig, prec: str) -> None:
    """``C[rows_e] = A[rows_e] @ B[e]`` over the expert-sorted rows, B's element ``[e, k, n]``
    at ``b_strides``; ``gather``: A's rows are read by token (``a[token[n]]``); ``scale``:
    rows times ``weight[n]``; ``scatter``: rows added into ``c[token[n]]`` (atomics in c's
    dtype) instead of stored at ``c[n]``."""
    stride_be, stride_bk, stride_bn = b_strides
    E, R, C = b.shape
    b_arg, b_desc = b, 0
    if cfg.tma and b.is_contiguous() and tma_ok(b, C):
        if (stride_bk, stride_bn) == (1, C):  # rows of b[e] are output columns, k contiguous
            b_arg, b_desc = TensorDescriptor.from_tensor(b.view(E * R, C), [cfg.BN, cfg.BK]), 1
        elif (stride_bk, stride_bn) == (C, 1) and K % cfg.BK == 0:  # rows of b[e] are k
            b_arg, b_desc = TensorDescriptor.from_tensor(b.view(E * R, C), [cfg.BK, cfg.BN]), 2
    a_arg, a_desc = a, False
    if cfg.tma and not gather and a.is_contiguous() and tma_ok(a, K):
        a_arg, a_desc = TensorDescriptor.from_tensor(a, [cfg.BM, cfg.BK]), True
    MT = n_row_tiles(N, E, cfg.BM)
    gemm_kernel[(triton.cdiv(n_cols, cfg.BN) * MT,)](
        a_arg, b_arg, c, token, weight, counts, E, MT, K, n_cols,
        a.stride(0), stride_be, stride_bk, stride_bn, c.stride(0), R,
        GATHER_A=gather, SCALE=scale, SCATTER_C=scatter, A_DESC=a_desc, B_DESC=b_desc,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PREC=prec, GROUP_M=cfg.group_m, E_POW2=e_pow2(E),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )


def launch_wgrad(lhs: Tensor, rhs: Tensor, out: Tensor, token: Tensor, counts: Tensor, *, gather_l: bool,
                 gather_r: bool, cfg: KernelConfig, prec: str) -> None:
    """``out[e] = lhs[rows_e]^T @ rhs[rows_e]`` with `kernels.wgrad_kernel`; a gathered
    operand is read by token (``lhs[token[n]]``). At most one operand goes through TMA: its
    tiles may run into the next expert's rows, which only the other operand's masked (zero)
    rows cancel."""
    E, P, Q = out.shape
    l_arg, l_desc = lhs, False
    r_arg, r_desc = rhs, False
    if cfg.tma and not gather_r and rhs.is_contiguous() and tma_ok(rhs, Q):
        r_arg, r_desc = TensorDescriptor.from_tensor(rhs, [cfg.BK, cfg.BN]), True
    elif cfg.tma and not gather_l and lhs.is_contiguous() and tma_ok(lhs, P):
        l_arg, l_desc = TensorDescriptor.from_tensor(lhs, [cfg.BK, cfg.BM]), True
    wgrad_kernel[(E * triton.cdiv(P, cfg.BM) * triton.cdiv(Q, cfg.BN),)](
        l_arg, r_arg, out, token, counts, E, P, Q, lhs.stride(0), rhs.stride(0),
        GATHER_L=gather_l, GATHER_R=gather_r, L_DESC=l_desc, R_DESC=r_desc,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PREC=prec, E_POW2=e_pow2(E), num_warps=cfg.warps, num_stages=cfg.stages,
    )


def launch_decode_glu(x, token, w_in, a, counts, N: int, D: int, H: int, cfg: KernelConfig, prec: str) -> None:
    """Decode path, first product: ``a[n] = silu(x[token[n]] @ Wg[e]^T) * (x[token[n]] @ Wu[e]^T)``
    ([N, H]) over the expert-sorted rows, with `kernels.decode_glu_kernel`; ``w_in`` [E, 2H, D]
    with any strides (``x`` contiguous). The grid depends on N, E, H and ``cfg`` only
    (`config.decode_row_tiles` row tiles)."""
    E = w_in.shape[0]
    MT = decode_row_tiles(N, E, cfg.BM)
    decode_glu_kernel[(triton.cdiv(H, cfg.BN) * MT,)](
        x, token, w_in, a, counts, E, MT, D, H, *w_in.stride(),
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PREC=prec, GROUP_M=cfg.group_m, E_POW2=e_pow2(E),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )


def launch_decode_down(a, w_out, weight, o, counts, N: int, H: int, D: int, cfg: KernelConfig, prec: str) -> None:
    """Decode path, second product: ``o[n] = weight[n] * (a[n] @ W_out[e]^T)`` ([N, D], float32),
    with `kernels.decode_down_kernel`; ``w_out`` [E, D, H] with any strides."""
    E = w_out.shape[0]
    MT = decode_row_tiles(N, E, cfg.BM)
    decode_down_kernel[(triton.cdiv(D, cfg.BN) * MT,)](
        a, w_out, weight, o, counts, E, MT, H, D, *w_out.stride(),
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PREC=prec, GROUP_M=cfg.group_m, E_POW2=e_pow2(E),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )


def launch_decode_combine(o, token, y, N: int, D: int) -> None:
    """Decode path, combine: ``y[t] = sum of o[n] over the assignments of token t`` ([T, D], y's
    dtype; zeros for a token without assignments), deterministic, with
    `kernels.decode_combine_kernel`."""
    # In the interpreter (tests) small blocks, so that several scan steps and gathers run.
    BN, CN, G = DECODE_COMBINE_BLOCK if y.is_cuda else (16, 16, 2)
    T = y.shape[0]
    decode_combine_kernel[(T, triton.cdiv(D, BN))](o, token, y, N, D, BN=BN, CN=CN, G=G,
                                                   num_warps=4 if y.is_cuda else 1)


def weight_grad(lhs_NP: Tensor, rhs_NQ: Tensor, counts_E: Tensor, offs_E: Tensor | None,
                host_counts: list[int] | None = None) -> Tensor:
    """``out[e] = lhs[rows_e]^T @ rhs[rows_e]``, ``[E, P, Q]`` (fp32 accumulate); ``offs_E``
    are the int32 end offsets of the experts' rows (only the grouped GEMM reads them). On
    CUDA bf16 one grouped GEMM, or with ``host_counts`` (the counts as a host list) one
    product per expert; elsewhere a per-expert loop in float32."""
    E = counts_E.numel()
    cuda_bf16 = lhs_NP.is_cuda and lhs_NP.dtype == torch.bfloat16
    if cuda_bf16 and host_counts is None and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(lhs_NP.t(), rhs_NQ, offs=offs_E)
    out = lhs_NP.new_empty(E, lhs_NP.shape[1], rhs_NQ.shape[1])
    start = 0
    for e, c in enumerate(host_counts if host_counts is not None else counts_E.tolist()):
        lhs, rhs = lhs_NP[start : start + c], rhs_NQ[start : start + c]
        if not c:
            out[e].zero_()
        elif cuda_bf16:  # cuBLAS accumulates in float32
            torch.mm(lhs.t(), rhs, out=out[e])
        else:
            out[e] = (lhs.float().t() @ rhs.float()).to(out.dtype)
        start += c
    return out
