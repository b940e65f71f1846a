"""The fused MoE forward and backward as `torch.library` custom ops (with fake and
autograd registrations), launching the kernels of `kernels.py`; `moe_glu` is the entry
point (the custom op under torch.compile, an autograd.Function over the same code in eager
mode).

Weight gradients use `torch._grouped_mm` in its "reduce over rows" form where available
(CUDA bf16; elsewhere a per-expert loop), one cuBLAS product per expert where the experts
are few and large (`PER_EXPERT_MIN_ROWS`), and for the W_out gradient when gy was not
gathered into a copy `kernels.wgrad_kernel`, which reads gy rows by token.

Shape legend: T tokens, D model dim, H expert hidden, E experts, N routed assignments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

try:  # Triton >= 3.3: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

from gatedmoe.dispatch.triton.kernels import (
    gemm_kernel,
    glu_fwd_kernel,
    swiglu_bwd_kernel,
    tile_schedule_kernel,
    wgrad_kernel,
)

__all__ = ["moe_glu", "moe_glu_forward", "tile_schedule", "device_tile_schedule", "set_fp32_scatter", "fp32_scatter"]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel."""

    BM: int
    BN: int
    BK: int
    warps: int
    stages: int
    group_m: int = 8
    tma: bool = True  # weight (and ungathered row) tiles through TMA descriptors where possible
    # Gathered kernels only ("glu_fwd", "glu_bwd"): gather the rows into expert order with one
    # copy first, so the GEMM reads them through TMA instead of gathering inside its loads.
    pregather: bool = False


# Per-kernel configs; `benchmarks/triton_tune.py` measures the alternatives on a GPU.
_INTERPRETER = KernelConfig(16, 16, 16, 4, 1)  # smallest legal tl.dot


def kernel_configs(dtype: torch.dtype, device: torch.device, H: int) -> dict[str, KernelConfig]:
    """Configs for the kernels "glu_fwd", "gemm_fwd", "glu_bwd", "gemm_bwd", "wgrad" on this problem.

    bf16 choices are the fastest of `benchmarks/triton_tune.py` on an H100 (BENCHMARKS.md).
    """
    if device.type != "cuda":
        return dict.fromkeys(KERNELS, _INTERPRETER)
    if dtype == torch.float32:
        return dict.fromkeys(KERNELS, KernelConfig(64, 64, 32, 4, 2))
    cfgs = dict(CONFIGS_BF16)
    # Measured: a gathered copy read through TMA beats gathering inside the loads once each
    # row is reused over enough columns (the copy costs N*D, the product N*D*H); for the
    # backward's product the copy is free (the W_out gradient needs it), yet at H=512 the
    # in-load gather still won.
    if H < PREGATHER_MIN_H["glu_fwd"]:
        cfgs["glu_fwd"] = replace(cfgs["glu_fwd"], pregather=False, group_m=8)
    if H < PREGATHER_MIN_H["glu_bwd"]:
        cfgs["glu_bwd"] = replace(cfgs["glu_bwd"], pregather=False)
    return cfgs


# glu_fwd's BN counts gate/up column pairs: its accumulators hold [BM, 2 BN].
# "glu_bwd" is the gathered gy @ W_out product feeding the SwiGLU backward.
CONFIGS_BF16: dict[str, KernelConfig] = {
    "glu_fwd": KernelConfig(128, 128, 64, 8, 4, group_m=16, pregather=True),
    "gemm_fwd": KernelConfig(128, 256, 64, 8, 4),
    "glu_bwd": KernelConfig(128, 256, 64, 8, 4, pregather=True),
    "gemm_bwd": KernelConfig(128, 256, 64, 8, 4),
    "wgrad": KernelConfig(128, 128, 64, 4, 4),
}
KERNELS = tuple(CONFIGS_BF16)
# Below these expert widths the gathered kernels gather inside their loads (see kernel_configs).
PREGATHER_MIN_H = {"glu_fwd": 2048, "glu_bwd": 1024}


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


def _e_pow2(E: int) -> int:
    return max(16, triton.next_power_of_2(E))


def device_tile_schedule(counts_E: Tensor, N: int, BM: int) -> tuple[Tensor, Tensor]:
    """``(tile_expert, tile_row)`` as the kernels compute them (-1 for unused tiles); for tests."""
    E = counts_E.numel()
    MT = n_row_tiles(N, E, BM)
    tile_expert = _alloc(MT, device=counts_E.device, dtype=torch.int32)
    tile_row = _alloc(MT, device=counts_E.device, dtype=torch.int32)
    tile_schedule_kernel[(MT,)](counts_E, tile_expert, tile_row, E, BM=BM, E_POW2=_e_pow2(E))
    return tile_expert, tile_row


_FP32_SCATTER = False


def set_fp32_scatter(enabled: bool = True) -> None:
    """Accumulate the scatter-adds (forward combine ``y[token] += weight * o`` and the input
    gradient ``dL/dx[token] += ...``) in float32 instead of the input dtype.

    Off by default: the kernels then add their rows with bf16/fp16 atomics straight into the
    output, which is what the grouped backend's ``index_add`` does in precision (each token
    sums k rounded terms), at half the atomic traffic. Measured on an H100 (BENCHMARKS.md):
    fine-grained shape (k=8) forward 2.03 vs 2.42 ms; relative error of y against a float32
    run 5.0e-3 (float32 scatter 3.5e-3, grouped backend 5.8e-3). Float32 inputs always
    accumulate in float32.
    """
    global _FP32_SCATTER
    _FP32_SCATTER = bool(enabled)


def fp32_scatter() -> bool:
    """Whether the scatter-adds accumulate in float32 (see `set_fp32_scatter`)."""
    return _FP32_SCATTER


def _scatter_buffer(T: int, D: int, like: Tensor) -> Tensor:
    """Zeroed ``[T, D]`` buffer the scatter GEMMs add their rows into (see `set_fp32_scatter`)."""
    return torch.zeros(T, D, device=like.device, dtype=torch.float32 if _FP32_SCATTER else like.dtype)


def _alloc(*shape: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Uninitialised buffer for a kernel to fill (tests swap in a NaN-poisoned one)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_glu_fwd(x, token, w_in, h, a, counts, N: int, D: int, H: int, cfg: KernelConfig, prec: str, *,
                   gathered: bool = False, store_h: bool = True) -> None:
    """``gathered``: ``x`` holds the rows already in expert order (``x[token]``, [N, D]);
    ``store_h=False``: write only the activation ``a`` (inference)."""
    E = w_in.shape[0]
    w_arg, w_desc = w_in, False
    if cfg.tma and w_in.is_contiguous() and _tma_ok(w_in, D):
        w_arg, w_desc = TensorDescriptor.from_tensor(w_in.view(E * 2, H, D), [2, cfg.BN, cfg.BK]), True
    x_arg, x_desc = x, False
    if gathered:
        if not _tma_ok(x, D):
            raise ValueError("gathered rows are read through TMA: pass bf16/fp16 CUDA rows with 16-byte aligned rows")
        x_arg, x_desc = TensorDescriptor.from_tensor(x, [cfg.BM, cfg.BK]), True
    MT = n_row_tiles(N, E, cfg.BM)
    glu_fwd_kernel[(triton.cdiv(H, cfg.BN) * MT,)](
        x_arg, token, w_arg, h, a, counts, E, MT, D, H,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PREC=prec, GROUP_M=cfg.group_m, E_POW2=_e_pow2(E),
        W_DESC=w_desc, X_DESC=x_desc, STORE_H=store_h, num_warps=cfg.warps, num_stages=cfg.stages,
    )


def launch_swiglu_bwd(ga, h, weight, gh, wa, gweight, N: int, H: int) -> None:
    BM, BH = (16, 16) if ga.device.type != "cuda" else (8, 256)
    swiglu_bwd_kernel[(triton.cdiv(N, BM),)](ga, h, weight, gh, wa, gweight, N, H, BM=BM, BH=BH,
                                              num_warps=1 if ga.device.type != "cuda" else 4)


def _tma_ok(t: Tensor, last_dim: int) -> bool:
    """Whether a TMA descriptor can address ``t`` (CUDA, 16-bit, 16-byte aligned rows and base)."""
    return (
        TensorDescriptor is not None
        and t.is_cuda
        and t.dtype in (torch.bfloat16, torch.float16)
        and (last_dim * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def launch_gemm(a, b, b_strides, c, token, weight, counts, N: int, K: int, n_cols: int, *,
                gather: bool, scale: bool, scatter: bool, cfg: KernelConfig, prec: str) -> None:
    stride_be, stride_bk, stride_bn = b_strides
    E, R, C = b.shape
    b_arg, b_desc = b, 0
    if cfg.tma and b.is_contiguous() and _tma_ok(b, C):
        if (stride_bk, stride_bn) == (1, C):  # rows of b[e] are output columns, k contiguous
            b_arg, b_desc = TensorDescriptor.from_tensor(b.view(E * R, C), [cfg.BN, cfg.BK]), 1
        elif (stride_bk, stride_bn) == (C, 1) and K % cfg.BK == 0:  # rows of b[e] are k
            b_arg, b_desc = TensorDescriptor.from_tensor(b.view(E * R, C), [cfg.BK, cfg.BN]), 2
    a_arg, a_desc = a, False
    if cfg.tma and not gather and a.is_contiguous() and _tma_ok(a, K):
        a_arg, a_desc = TensorDescriptor.from_tensor(a, [cfg.BM, cfg.BK]), True
    MT = n_row_tiles(N, E, cfg.BM)
    gemm_kernel[(triton.cdiv(n_cols, cfg.BN) * MT,)](
        a_arg, b_arg, c, token, weight, counts, E, MT, K, n_cols,
        a.stride(0), stride_be, stride_bk, stride_bn, c.stride(0), R,
        GATHER_A=gather, SCALE=scale, SCATTER_C=scatter, A_DESC=a_desc, B_DESC=b_desc,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PREC=prec, GROUP_M=cfg.group_m, E_POW2=_e_pow2(E),
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
    if cfg.tma and not gather_r and rhs.is_contiguous() and _tma_ok(rhs, Q):
        r_arg, r_desc = TensorDescriptor.from_tensor(rhs, [cfg.BK, cfg.BN]), True
    elif cfg.tma and not gather_l and lhs.is_contiguous() and _tma_ok(lhs, P):
        l_arg, l_desc = TensorDescriptor.from_tensor(lhs, [cfg.BK, cfg.BM]), True
    wgrad_kernel[(E * triton.cdiv(P, cfg.BM) * triton.cdiv(Q, cfg.BN),)](
        l_arg, r_arg, out, token, counts, E, P, Q, lhs.stride(0), rhs.stride(0),
        GATHER_L=gather_l, GATHER_R=gather_r, L_DESC=l_desc, R_DESC=r_desc,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PREC=prec, E_POW2=_e_pow2(E), num_warps=cfg.warps, num_stages=cfg.stages,
    )


def _problem(x: Tensor, token_N: Tensor, w_out_EDH: Tensor):
    """Sizes and kernel configs shared by forward and backward."""
    T, D = x.shape
    N = token_N.numel()
    H = w_out_EDH.shape[-1]
    return T, D, N, H, kernel_configs(x.dtype, x.device, H)


def _pregather(cfg: KernelConfig, rows: Tensor) -> bool:
    """Whether a gathered kernel reads a gathered copy of ``rows`` through TMA (see `KernelConfig`)."""
    return cfg.pregather and cfg.tma and _tma_ok(rows, rows.shape[1])


@torch.library.custom_op("gatedmoe::moe_glu_forward", mutates_args=())
def moe_glu_forward(
    x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor, w_out_EDH: Tensor,
    need_h: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(y_TD, h_N2H)``: the SwiGLU MoE output and the first GEMM's output (for backward).

    With ``need_h=False`` (inference) h is not written and comes back with 0 rows; such an
    output cannot be differentiated.
    """
    return _forward_impl(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h)


def _forward_impl(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h):
    x = x_TD.contiguous()
    T, D, N, H, cfgs = _problem(x, token_N, w_out_EDH)
    h = _alloc(N if need_h else 0, 2 * H, device=x.device, dtype=x.dtype)
    a = _alloc(N, H, device=x.device, dtype=x.dtype)
    if N == 0:
        return torch.zeros_like(x), h
    w_in = w_in_EHD.contiguous()
    w_out = w_out_EDH.contiguous()
    prec = _prec(x.dtype)
    cfg = cfgs["glu_fwd"]
    if _pregather(cfg, x):
        launch_glu_fwd(x.index_select(0, token_N), token_N, w_in, h, a, counts_E, N, D, H, cfg, prec,
                       gathered=True, store_h=need_h)
    else:
        launch_glu_fwd(x, token_N, w_in, h, a, counts_E, N, D, H, cfg, prec, store_h=need_h)
    # Zeroed only now: the GPU runs the first GEMM while the host prepares the rest (at
    # small sizes the host's time until that launch shows in the step time).
    y = _scatter_buffer(T, D, x)
    # y[token] += weight * (a @ W_out[e]^T): B[k=h, n=d] = w_out[e, d, h]
    launch_gemm(a, w_out, (D * H, 1, H), y, token_N, weight_N, counts_E, N, H, D,
                gather=False, scale=True, scatter=True, cfg=cfgs["gemm_fwd"], prec=prec)
    return y.to(x.dtype), h


@moe_glu_forward.register_fake
def _(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h=True):
    N = token_N.shape[0] if need_h else 0
    H = w_out_EDH.shape[-1]
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(N, 2 * H)


# Weight gradients as one cuBLAS product per expert instead of one grouped GEMM when the
# experts are few and large. Measured on an H100 (BENCHMARKS.md): Mixtral (E=8, 2048 rows
# per expert) W_in gradient 5.4-5.6 vs 6.0-6.3 ms, W_out 2.7 vs 2.8-2.9; at 1024 rows per
# expert and below the grouped GEMM is as fast or faster (up to 10x at 512 rows, E=256).
PER_EXPERT_MIN_ROWS = 2048  # mean rows per expert
PER_EXPERT_MAX_E = 16  # one launch per expert: keep the host's share small


def _counts_on_host(counts_E: Tensor, N: int, dtype: torch.dtype) -> Callable[[], list[int]] | None:
    """Start copying the per-expert counts to the host if the weight gradients will be
    per-expert products (see `PER_EXPERT_MIN_ROWS`); returns a function that waits for the
    copy and gives the list, or None.

    The copy is queued at the start of backward and waited for only at the weight
    gradients, so the host never waits for the GPU's queued products (a plain ``tolist()``
    there would drain the queue). Not while a CUDA graph is being captured.
    """
    E = counts_E.numel()
    if not (counts_E.is_cuda and dtype == torch.bfloat16 and E <= PER_EXPERT_MAX_E and N >= PER_EXPERT_MIN_ROWS * E):
        return None
    if torch.cuda.is_current_stream_capturing():
        return None
    host = torch.empty(E, dtype=counts_E.dtype, pin_memory=True)
    host.copy_(counts_E, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return wait


def _wgrad(lhs_NP: Tensor, rhs_NQ: Tensor, counts_E: Tensor, offs_E: Tensor | None,
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


@torch.library.custom_op("gatedmoe::moe_glu_backward", mutates_args=())
def moe_glu_backward(
    gy_TD: Tensor, x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor,
    w_in_EHD: Tensor, w_out_EDH: Tensor, h_N2H: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_w_in, grad_w_out)`` of `moe_glu_forward`."""
    return _backward_impl(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, [h_N2H])


def _backward_impl(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, h_box: list[Tensor]):
    """``h_box`` holds h; it is emptied once h is read, so a caller that keeps no other
    reference frees its [N, 2H] before the weight gradients are allocated."""
    gy = gy_TD.contiguous()
    x = x_TD.contiguous()
    T, D, N, H, cfgs = _problem(x, token_N, w_out_EDH)
    if N == 0:
        return torch.zeros_like(x), weight_N.new_zeros(0), torch.zeros_like(w_in_EHD), torch.zeros_like(w_out_EDH)
    w_in = w_in_EHD.contiguous()
    w_out = w_out_EDH.contiguous()
    prec = _prec(x.dtype)
    host_counts = _counts_on_host(counts_E, N, x.dtype)
    gh = _alloc(N, 2 * H, device=x.device, dtype=x.dtype)
    # ga = gy[token] @ W_out[e]: B[k=d, n=h] = w_out[e, d, h]. The W_out gradient needs the
    # gathered gy as well, so a pre-gathered copy serves both.
    ga = _alloc(N, H, device=x.device, dtype=x.dtype)
    cfg = cfgs["glu_bwd"]
    gys = gy.index_select(0, token_N) if _pregather(cfg, gy) else None
    launch_gemm(gy if gys is None else gys, w_out, (D * H, H, 1), ga, token_N, weight_N, counts_E, N, D, H,
                gather=gys is None, scale=False, scatter=False, cfg=cfg, prec=prec)
    # Allocated after the first launch, as in forward.
    gx = _scatter_buffer(T, D, x)
    gweight = _alloc(N, device=x.device, dtype=torch.float32)
    # The SwiGLU backward writes weight * a over ga in place (each element is read before it
    # is written, by the same program): one [N, H] buffer fewer at the peak.
    wa = ga
    launch_swiglu_bwd(ga, h_box.pop(), weight_N, gh, wa, gweight, N, H)
    del ga
    # grad_x[token] += gh @ W_in[e]: B[k=j, n=d] = w_in[e, j, d]
    launch_gemm(gh, w_in, (2 * H * D, D, 1), gx, token_N, weight_N, counts_E, N, 2 * H, D,
                gather=False, scale=False, scatter=True, cfg=cfgs["gemm_bwd"], prec=prec)
    # Weight gradients one at a time, the larger first, each operand freed as soon as it is
    # used: the peak then holds gh [N, 2H] and grad_w_in, never both with grad_w_out.
    xs = x.index_select(0, token_N)
    counts_list = host_counts() if host_counts is not None else None
    offs = torch.cumsum(counts_E, 0, dtype=torch.int32) if counts_list is None else None
    grad_w_in = _wgrad(gh, xs, counts_E, offs, counts_list)  # [E, 2H, D]
    del xs, gh
    if gys is None:
        # No gathered copy of gy exists: a kernel reading gy by token beats copy + grouped GEMM
        # (measured on the H100, fine-grained shape: 0.66 vs 0.78 ms). Where the copy exists
        # the grouped GEMM is faster (DeepSeek 1.17 vs 1.14 ms with the copy charged to it).
        grad_w_out = _alloc(*w_out.shape, device=x.device, dtype=x.dtype)  # [E, D, H]
        launch_wgrad(gy, wa, grad_w_out, token_N, counts_E, gather_l=True, gather_r=False, cfg=cfgs["wgrad"],
                     prec=prec)
    else:
        grad_w_out = _wgrad(gys, wa, counts_E, offs, counts_list)  # [E, D, H]
    del gys, wa
    return gx.to(x.dtype), gweight.to(weight_N.dtype), grad_w_in.to(w_in_EHD.dtype), grad_w_out.to(w_out_EDH.dtype)


@moe_glu_backward.register_fake
def _(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, h_N2H):
    return x_TD.new_empty(x_TD.shape), weight_N.new_empty(weight_N.shape), w_in_EHD.new_empty(w_in_EHD.shape), \
        w_out_EDH.new_empty(w_out_EDH.shape)


def _setup_context(ctx, inputs, output):
    x, token, weight, counts, w_in, w_out, need_h = inputs
    ctx.need_h = need_h
    # h is returned only to be saved: no gradient flows into it, and without this autograd
    # would hand backward a zero-filled [N, 2H] for it (measured: 0.3 ms and 0.9 GB on Mixtral).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, token, weight, counts, w_in, w_out, output[1])


def _backward(ctx, gy, _gh_unused):
    if not ctx.need_h:
        raise RuntimeError("moe_glu_forward(..., need_h=False) kept no activations for backward; call it with "
                           "need_h=True when gradients are needed")
    x, token, weight, counts, w_in, w_out, h = ctx.saved_tensors
    gx, gw, gwi, gwo = moe_glu_backward(gy, x, token, weight, counts, w_in, w_out, h)
    return gx, None, gw, None, gwi, gwo, None


moe_glu_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerMoEGLU(torch.autograd.Function):
    """The same forward and backward as the custom ops, without the dispatcher's Python
    custom-op layer (measured on the H100 machine: ~75 us of host time per forward call,
    more with autograd; at T=8192 d=1024 the whole step is host-bound)."""

    @staticmethod
    def forward(ctx, x, token, weight, counts, w_in, w_out, need_h):
        y, h = _forward_impl(x, token, weight, counts, w_in, w_out, need_h)
        ctx.need_h = need_h
        ctx.save_for_backward(x, token, weight, counts, w_in, w_out)
        # h is kept on ctx, not saved, so backward can let it go once read (a saved tensor
        # lives until the node is done): [N, 2H] less at the backward's peak. It is an
        # output marked non-differentiable, so it has no grad_fn and makes no cycle.
        ctx.h = h
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)  # no zero-filled [N, 2H] gradient for h
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, _gh_unused):
        if not ctx.need_h:
            raise RuntimeError("moe_glu(..., need_h=False) kept no activations for backward; call it with "
                               "need_h=True when gradients are needed")
        if ctx.h is None:
            raise RuntimeError("the triton MoE backward frees its saved activations as it goes: backward through "
                               "this graph a second time (retain_graph=True) is not supported; use the grouped "
                               "backend for that")
        x, token, weight, counts, w_in, w_out = ctx.saved_tensors
        h_box = [ctx.h]
        ctx.h = None
        gx, gw, gwi, gwo = _backward_impl(gy, x, token, weight, counts, w_in, w_out, h_box)
        return gx, None, gw, None, gwi, gwo, None


def moe_glu(
    x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor, w_out_EDH: Tensor,
    need_h: bool = True,
) -> tuple[Tensor, Tensor]:
    """`moe_glu_forward` with autograd: the custom op while torch.compile traces (so the
    graph sees one opaque op with its fake and autograd rules), a plain autograd.Function
    running the same code in eager mode (less host time per call), and that code alone
    when gradients are disabled."""
    if torch.compiler.is_compiling():
        return moe_glu_forward(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h)
    if not torch.is_grad_enabled():  # no graph to record: skip the Function's ~20 us of host time
        return _forward_impl(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h)
    return _EagerMoEGLU.apply(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h)
