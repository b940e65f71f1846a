"""The fused MoE forward and backward with per-expert LoRA adapters on both expert weights
(`gatedmoe.experts.lora.ExpertLoRA`, unmerged): host side of `lora_kernels.py`, the
autograd, and `moe_glu_lora`, the entry point (an autograd.Function in eager mode, the
custom ops ``gatedmoe::moe_glu_lora_forward`` / ``_backward`` under torch.compile).
`gatedmoe.dispatch.reference.reference_dispatch` (which adds ``s B_e A_e`` to each weight)
is its oracle; `lora_reference.py` holds each launcher in plain PyTorch.

With ``W'_e = W_e + s B_e A_e`` (``s = alpha / R``) and rows in expert order:

forward (four launches; the base path has two)
    z_in  = s x[token] @ A_in[e]^T                   [N, R]   lora_gemm (gathered, LORA off)
    h     = x[token] @ W_in[e]^T + z_in @ B_in[e]^T  [N, 2H]  lora_glu_fwd, a = silu(h_g) * h_u
    z_out = s a @ A_out[e]^T                         [N, R]   lora_gemm (LORA off)
    y[token] += weight * (a @ W_out[e]^T + z_out @ B_out[e]^T)  lora_gemm (scatter)
backward
    u_out = s gy[token] @ B_out[e]                   [N, R]
    ga    = gy[token] @ W_out[e] + u_out @ A_out[e]  [N, H]   (= gy[token] @ W'_out[e])
    gh, weight * a, dL/dweight                                swiglu_bwd_kernel, unchanged
    u_in  = s gh @ B_in[e]                           [N, R]
    gx[token] += gh @ W_in[e] + u_in @ A_in[e]                (scatter)
    dA_in = u_in^T x[token], dB_in = gh^T z_in, dA_out = u_out^T (weight * a),
    dB_out = gy[token]^T (weight * z_out): grouped per expert by `kernels.wgrad_kernel`
    (operands read by token where they are gathered), accumulated in float32
    dW_in, dW_out only when the base weights require gradients (frozen by default).
The scale s sits in the rank-R factors (the small products' epilogues), so the adapter
term is one more ``tl.dot`` into the base product's accumulator, and no gradient needs a
pass of its own to be scaled.

Shape legend: T tokens, D model dim, H expert hidden, E experts, N routed assignments,
R adapter rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

from gatedmoe.dispatch.options import TritonOptions
from gatedmoe.dispatch.triton import config, launchers
from gatedmoe.dispatch.triton.config import KernelConfig
from gatedmoe.dispatch.triton.kernels import swiglu_bwd_kernel, wgrad_kernel
from gatedmoe.dispatch.triton.lora_kernels import lora_gemm_kernel, lora_glu_fwd_kernel

try:  # Triton >= 3.3: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

__all__ = [
    "launch_lora_gemm",
    "launch_lora_glu_fwd",
    "launch_lora_wgrad",
    "moe_glu_lora",
    "moe_glu_lora_backward",
    "moe_glu_lora_forward",
    "RANK_BLOCK",
]

# Gradients of (x, weight, w_in, w_out, A_in, B_in, A_out, B_out): the order of the
# backward op's outputs and of its ``needs`` flags.
_GRAD_NAMES = ("x", "weight", "w_in", "w_out", "A_in", "B_in", "A_out", "B_out")


# Ranks per ``tl.dot`` of the adapter terms (``BR``; larger ranks loop): 16, the smallest
# ``tl.dot`` tile. Compiled by Triton 3.6 for sm90 (ptxas -v, bf16, the base kernels' CUDA
# configs): the first product's kernel spills 380 bytes with BR=16, as the base kernel does
# (400), but 648 with 32 and 1876 with 64; the scatter product spills about the same with 16
# or 32 (2800 / 2896 bytes, base 2576). Not timed yet.
RANK_BLOCK = 16


def _tma_ok(t: Tensor, last_dim: int) -> bool:
    """`launchers.tma_ok` on CUDA (16-bit, aligned); in Triton's interpreter any dtype with
    16-byte aligned rows, so that the CPU tests run the descriptor paths too (the base
    kernels' descriptors are CUDA-only)."""
    if t.is_cuda:
        return launchers.tma_ok(t, last_dim)
    return TensorDescriptor is not None and (last_dim * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def launch_lora_glu_fwd(x, token, w_in, z, b_in, h, a, counts, N: int, D: int, H: int, R: int,
                        cfg: KernelConfig, prec: str, *, gathered: bool = False, store_h: bool = True) -> None:
    """``h[n] = x[token[n]] @ W_in[e]^T + z[n] @ B_in[e]^T`` ([N, 2H], gate then up) and
    ``a = silu(h_gate) * h_up`` ([N, H]) with `lora_kernels.lora_glu_fwd_kernel`; ``w_in``
    [E, 2H, D] and ``b_in`` [E, 2H, R] contiguous, ``z`` [N, R]. W_in through a TMA
    descriptor where ``cfg.tma`` and the layout allow. ``gathered``: ``x`` holds the rows
    already in expert order (``x[token]``, [N, D]), read through TMA."""
    E = w_in.shape[0]
    w_arg, w_desc = w_in, False
    if cfg.tma and w_in.is_contiguous() and _tma_ok(w_in, D):
        w_arg, w_desc = TensorDescriptor.from_tensor(w_in.view(E * 2, H, D), [2, cfg.BN, cfg.BK]), True
    x_arg = x
    if gathered:
        if not _tma_ok(x, D):
            raise ValueError("gathered rows are read through TMA: pass rows whose width is 16-byte aligned")
        x_arg = TensorDescriptor.from_tensor(x, [cfg.BM, cfg.BK])
    MT = launchers.n_row_tiles(N, E, cfg.BM)
    lora_glu_fwd_kernel[(triton.cdiv(H, cfg.BN) * MT,)](
        x_arg, token, w_arg, z, b_in, h, a, counts, E, MT, D, H, R,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BR=RANK_BLOCK, PREC=prec, GROUP_M=cfg.group_m,
        E_POW2=launchers.e_pow2(E), STORE_H=store_h, W_DESC=w_desc, X_DESC=gathered, num_warps=cfg.warps,
        num_stages=cfg.stages,
    )


def launch_lora_gemm(a, b, b_strides, c, token, weight, counts, N: int, K: int, n_cols: int, *, gather: bool,
                     scale: bool, scatter: bool, cfg: KernelConfig, prec: str, z=None, l_=None, l_strides=None,
                     alpha: float = 1.0, rank_out: bool = False) -> None:
    """``C[rows_e] = alpha * (A[rows_e] @ B[e] + Z[rows_e] @ L[e])`` over the expert-sorted
    rows with `lora_kernels.lora_gemm_kernel`: B's element ``[e, k, n]`` at ``b_strides``,
    L's ``[e, r, n]`` at ``l_strides``, Z ``[N, R]`` contiguous (no adapter term without
    ``z``); ``gather``, ``scale`` and ``scatter`` as `launchers.launch_gemm`. ``rank_out``:
    the output is a rank-R factor (``n_cols`` = R), computed in one column block of up to 128
    columns with pointer loads; other products read B (and ungathered A rows) through TMA
    descriptors where ``cfg.tma`` and the layout allow, as `launchers.launch_gemm` does."""
    E, B_rows, B_cols = b.shape
    stride_be, stride_bk, stride_bn = b_strides
    lora = z is not None
    R = z.shape[1] if lora else 0
    BN = min(128, max(16, triton.next_power_of_2(n_cols))) if rank_out else cfg.BN
    b_arg, b_desc = b, 0
    a_arg, a_desc = a, False
    if not rank_out and cfg.tma:
        if b.is_contiguous() and _tma_ok(b, B_cols):
            if (stride_bk, stride_bn) == (1, B_cols):  # rows of b[e] are output columns, k contiguous
                b_arg, b_desc = TensorDescriptor.from_tensor(b.view(E * B_rows, B_cols), [BN, cfg.BK]), 1
            elif (stride_bk, stride_bn) == (B_cols, 1) and K % cfg.BK == 0:  # rows of b[e] are k
                b_arg, b_desc = TensorDescriptor.from_tensor(b.view(E * B_rows, B_cols), [cfg.BK, BN]), 2
        if not gather and a.is_contiguous() and _tma_ok(a, K):
            a_arg, a_desc = TensorDescriptor.from_tensor(a, [cfg.BM, cfg.BK]), True
    MT = launchers.n_row_tiles(N, E, cfg.BM)
    z_arg, l_arg = (z, l_) if lora else (c, b)
    stride_le, stride_lr, stride_ln = l_strides if lora else (0, 0, 0)
    lora_gemm_kernel[(triton.cdiv(n_cols, BN) * MT,)](
        a_arg, b_arg, c, z_arg, l_arg, token, weight, counts, E, MT, K, n_cols, R, float(alpha),
        a.stride(0), stride_be, stride_bk, stride_bn, c.stride(0), stride_le, stride_lr, stride_ln, B_rows,
        GATHER_A=gather, SCALE=scale, SCATTER_C=scatter, LORA=lora, A_DESC=a_desc, B_DESC=b_desc,
        BM=cfg.BM, BN=BN, BK=cfg.BK, BR=RANK_BLOCK, PREC=prec, GROUP_M=cfg.group_m, E_POW2=launchers.e_pow2(E),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )


def launch_lora_wgrad(lhs: Tensor, rhs: Tensor, token: Tensor, counts: Tensor, E: int, *, gather_l: bool,
                      gather_r: bool, cfg: KernelConfig, prec: str) -> Tensor:
    """``out[e] = lhs[rows_e]^T @ rhs[rows_e]``, ``[E, P, Q]`` float32 (zero for an expert
    without rows), with `kernels.wgrad_kernel` through pointer loads (a gathered operand
    read by token). A side of width R gets a tile of its own width, not the config's."""
    P, Q = lhs.shape[1], rhs.shape[1]
    BM = cfg.BM if P > 64 else max(16, triton.next_power_of_2(P))
    BN = cfg.BN if Q > 64 else max(16, triton.next_power_of_2(Q))
    out = launchers.alloc(E, P, Q, device=lhs.device, dtype=torch.float32)
    wgrad_kernel[(E * triton.cdiv(P, BM) * triton.cdiv(Q, BN),)](
        lhs, rhs, out, token, counts, E, P, Q, lhs.stride(0), rhs.stride(0),
        GATHER_L=gather_l, GATHER_R=gather_r, L_DESC=False, R_DESC=False,
        BM=BM, BN=BN, BK=cfg.BK, PREC=prec, E_POW2=launchers.e_pow2(E), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return out


def _configs(x: Tensor, H: int, configs: Sequence[int] | None) -> dict[str, KernelConfig]:
    return config.kernel_configs(x.dtype, x.device, H, config.configs_from_ints(configs))


def _pregather(cfg: KernelConfig, rows: Tensor) -> bool:
    """Whether the rows are gathered into expert order by one copy first (`KernelConfig.pregather`:
    by the base kernels' measured width rule on CUDA, or an override), read through TMA."""
    return cfg.pregather and cfg.tma and _tma_ok(rows, rows.shape[1])


def _forward_impl(x_TD, token_N, weight_N, counts_E, w_in, w_out, A_in, B_in, A_out, B_out, scale, need_h,
                  fp32_scatter, configs):
    """``(y [T, D], h [N or 0, 2H], z_in [N, R], z_out [N, R])``."""
    x = x_TD.contiguous()
    T, D = x.shape
    N, H, R = token_N.numel(), w_out.shape[-1], A_in.shape[1]
    h = launchers.alloc(N if need_h else 0, 2 * H, device=x.device, dtype=x.dtype)
    z_in = launchers.alloc(N, R, device=x.device, dtype=x.dtype)
    z_out = launchers.alloc(N, R, device=x.device, dtype=x.dtype)
    if N == 0:
        return torch.zeros_like(x), h, z_in, z_out
    w_in, w_out = w_in.contiguous(), w_out.contiguous()
    A_in, B_in, A_out, B_out = (t.contiguous() for t in (A_in, B_in, A_out, B_out))
    cfgs = _configs(x, H, configs)
    prec = launchers.precision(x.dtype)
    # Wide experts: one gathered copy, read in order by the rank-R factor and through TMA by
    # the first product (the base path's rule, `config.PREGATHER_MIN_H`).
    xs = x.index_select(0, token_N) if _pregather(cfgs["glu_fwd"], x) else None
    # z_in = s x[token] @ A_in[e]^T: B[k=d, n=r] = A_in[e, r, d]
    launch_lora_gemm(x if xs is None else xs, A_in, (R * D, 1, D), z_in, token_N, weight_N, counts_E, N, D, R,
                     gather=xs is None, scale=False, scatter=False, cfg=cfgs["glu_fwd"], prec=prec, alpha=scale,
                     rank_out=True)
    a = launchers.alloc(N, H, device=x.device, dtype=x.dtype)
    launch_lora_glu_fwd(x if xs is None else xs, token_N, w_in, z_in, B_in, h, a, counts_E, N, D, H, R,
                        cfgs["glu_fwd"], prec, gathered=xs is not None, store_h=need_h)
    del xs
    # z_out = s a @ A_out[e]^T: B[k=h, n=r] = A_out[e, r, h]
    launch_lora_gemm(a, A_out, (R * H, 1, H), z_out, token_N, weight_N, counts_E, N, H, R, gather=False,
                     scale=False, scatter=False, cfg=cfgs["gemm_fwd"], prec=prec, alpha=scale, rank_out=True)
    y = launchers.scatter_buffer(T, D, x, fp32_scatter)
    # y[token] += weight * (a @ W_out[e]^T + z_out @ B_out[e]^T): B[k=h, n=d] = w_out[e, d, h],
    # L[r, n=d] = B_out[e, d, r]
    launch_lora_gemm(a, w_out, (D * H, 1, H), y, token_N, weight_N, counts_E, N, H, D, gather=False, scale=True,
                     scatter=True, cfg=cfgs["gemm_fwd"], prec=prec, z=z_out, l_=B_out, l_strides=(D * R, 1, R))
    return y.to(x.dtype), h, z_in, z_out


def _backward_impl(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, A_in, B_in, A_out, B_out,
                   h_box: list[Tensor], z_in, z_out, scale, needs: Sequence[bool], fp32_scatter, configs):
    """Gradients in `_GRAD_NAMES` order, None where ``needs`` says no. ``h_box`` holds h; it is
    emptied once h is read (as in `ops._backward_impl`)."""
    need = dict(zip(_GRAD_NAMES, needs, strict=True))
    gy, x = gy_TD.contiguous(), x_TD.contiguous()
    T, D = x.shape
    N, H, R, E = token_N.numel(), w_out_EDH.shape[-1], A_in.shape[1], w_in_EHD.shape[0]
    if N == 0:
        zeros = (torch.zeros_like(x), weight_N.new_zeros(0), torch.zeros_like(w_in_EHD), torch.zeros_like(w_out_EDH),
                 torch.zeros_like(A_in), torch.zeros_like(B_in), torch.zeros_like(A_out), torch.zeros_like(B_out))
        return tuple(g if need[n] else None for n, g in zip(_GRAD_NAMES, zeros, strict=True))
    w_in, w_out = w_in_EHD.contiguous(), w_out_EDH.contiguous()
    A_in_c, B_in_c, A_out_c, B_out_c = (t.contiguous() for t in (A_in, B_in, A_out, B_out))
    cfgs = _configs(x, H, configs)
    prec = launchers.precision(x.dtype)
    # Wide experts: gy gathered by one copy (the base path's rule), which the rank-R factor,
    # the gathered product (through TMA) and the gradients of B_out and W_out all read.
    gys = gy.index_select(0, token_N) if _pregather(cfgs["glu_bwd"], gy) else None
    gy_rows = gy if gys is None else gys
    # u_out = s gy[token] @ B_out[e]: B[k=d, n=r] = B_out[e, d, r]
    u_out = launchers.alloc(N, R, device=x.device, dtype=x.dtype)
    launch_lora_gemm(gy_rows, B_out_c, (D * R, R, 1), u_out, token_N, weight_N, counts_E, N, D, R,
                     gather=gys is None, scale=False, scatter=False, cfg=cfgs["glu_bwd"], prec=prec, alpha=scale,
                     rank_out=True)
    # ga = gy[token] @ W_out[e] + u_out @ A_out[e]: B[k=d, n=h] = w_out[e, d, h], L[r, n=h] = A_out[e, r, h]
    ga = launchers.alloc(N, H, device=x.device, dtype=x.dtype)
    launch_lora_gemm(gy_rows, w_out, (D * H, H, 1), ga, token_N, weight_N, counts_E, N, D, H, gather=gys is None,
                     scale=False, scatter=False, cfg=cfgs["glu_bwd"], prec=prec, z=u_out, l_=A_out_c,
                     l_strides=(R * H, H, 1))
    gh = launchers.alloc(N, 2 * H, device=x.device, dtype=x.dtype)
    gweight = launchers.alloc(N, device=x.device, dtype=torch.float32)
    # weight * a written over ga in place (each element read before it is written).
    wa = ga
    BM, BH = (16, 16) if not x.is_cuda else (8, 256)
    swiglu_bwd_kernel[(triton.cdiv(N, BM),)](ga, h_box.pop(), weight_N, gh, wa, gweight, N, H, BM=BM, BH=BH,
                                              num_warps=4 if x.is_cuda else 1)
    del ga
    # u_in = s gh @ B_in[e]: B[k=j, n=r] = B_in[e, j, r]
    u_in = launchers.alloc(N, R, device=x.device, dtype=x.dtype)
    launch_lora_gemm(gh, B_in_c, (2 * H * R, R, 1), u_in, token_N, weight_N, counts_E, N, 2 * H, R, gather=False,
                     scale=False, scatter=False, cfg=cfgs["gemm_bwd"], prec=prec, alpha=scale, rank_out=True)
    gx = None
    if need["x"]:
        # gx[token] += gh @ W_in[e] + u_in @ A_in[e]: B[k=j, n=d] = w_in[e, j, d], L[r, n=d] = A_in[e, r, d]
        gx = launchers.scatter_buffer(T, D, x, fp32_scatter)
        launch_lora_gemm(gh, w_in, (2 * H * D, D, 1), gx, token_N, weight_N, counts_E, N, 2 * H, D, gather=False,
                         scale=False, scatter=True, cfg=cfgs["gemm_bwd"], prec=prec, z=u_in, l_=A_in_c,
                         l_strides=(R * D, D, 1))
        gx = gx.to(x.dtype)
    wcfg = cfgs["wgrad"]

    def adapter_grad(name, lhs, rhs, like, gather_l=False, gather_r=False):
        if not need[name]:
            return None
        g = launch_lora_wgrad(lhs, rhs, token_N, counts_E, E, gather_l=gather_l, gather_r=gather_r, cfg=wcfg,
                              prec=prec)
        return g.to(like.dtype)

    grads = {
        "x": gx,
        "weight": gweight.to(weight_N.dtype) if need["weight"] else None,
        "A_in": adapter_grad("A_in", u_in, x, A_in, gather_r=True),  # u_in^T x[token]     [E, R, D]
        "B_in": adapter_grad("B_in", gh, z_in, B_in),  # gh^T z_in                        [E, 2H, R]
        "A_out": adapter_grad("A_out", u_out, wa, A_out),  # u_out^T (weight * a)         [E, R, H]
    }
    if need["B_out"]:  # gy[token]^T (weight * z_out)                                    [E, D, R]
        wz = (z_out.float() * weight_N.float()[:, None]).to(x.dtype)
        grads["B_out"] = adapter_grad("B_out", gy_rows, wz, B_out, gather_l=gys is None)
    # The base weights' gradients (only when they train: frozen by default under LoRA), as the
    # base path computes them.
    if need["w_in"] or need["w_out"]:
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        if need["w_in"]:
            grads["w_in"] = launchers.weight_grad(gh, x.index_select(0, token_N), counts_E, offs).to(w_in_EHD.dtype)
        if need["w_out"]:
            gys = gy.index_select(0, token_N) if gys is None else gys
            grads["w_out"] = launchers.weight_grad(gys, wa, counts_E, offs).to(w_out_EDH.dtype)
    return tuple(grads.get(n) for n in _GRAD_NAMES)


# ---------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("gatedmoe::moe_glu_lora_forward", mutates_args=())
def moe_glu_lora_forward(
    x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor, w_out_EDH: Tensor,
    A_in: Tensor, B_in: Tensor, A_out: Tensor, B_out: Tensor, scale: float, need_h: bool = True,
    fp32_scatter: bool = False, configs: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y_TD, h_N2H, z_in_NR, z_out_NR)``: the SwiGLU MoE output with the adapters, and what
    backward reads (h with 0 rows when ``need_h=False``)."""
    return _forward_impl(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, A_in, B_in, A_out, B_out, scale,
                         need_h, fp32_scatter, configs)


@moe_glu_lora_forward.register_fake
def _(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, A_in, B_in, A_out, B_out, scale, need_h=True,
      fp32_scatter=False, configs=None):
    N, H, R = token_N.shape[0], w_out_EDH.shape[-1], A_in.shape[1]
    return (x_TD.new_empty(x_TD.shape), x_TD.new_empty(N if need_h else 0, 2 * H), x_TD.new_empty(N, R),
            x_TD.new_empty(N, R))


@torch.library.custom_op("gatedmoe::moe_glu_lora_backward", mutates_args=())
def moe_glu_lora_backward(
    gy_TD: Tensor, x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor,
    w_out_EDH: Tensor, A_in: Tensor, B_in: Tensor, A_out: Tensor, B_out: Tensor, h_N2H: Tensor, z_in: Tensor,
    z_out: Tensor, scale: float, need_base: bool = False, fp32_scatter: bool = False,
    configs: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, weight, w_in, w_out, A_in, B_in, A_out, B_out; those of w_in and w_out
    only with ``need_base`` (else empty tensors of 0 elements)."""
    needs = (True, True, need_base, need_base, True, True, True, True)
    grads = _backward_impl(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, A_in, B_in, A_out, B_out,
                           [h_N2H], z_in, z_out, scale, needs, fp32_scatter, configs)
    return tuple(g if g is not None else x_TD.new_empty(0) for g in grads)


@moe_glu_lora_backward.register_fake
def _(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, A_in, B_in, A_out, B_out, h_N2H, z_in, z_out,
      scale, need_base=False, fp32_scatter=False, configs=None):
    base = (w_in_EHD.new_empty(w_in_EHD.shape), w_out_EDH.new_empty(w_out_EDH.shape)) if need_base else \
        (x_TD.new_empty(0), x_TD.new_empty(0))
    return (x_TD.new_empty(x_TD.shape), weight_N.new_empty(weight_N.shape), *base, A_in.new_empty(A_in.shape),
            B_in.new_empty(B_in.shape), A_out.new_empty(A_out.shape), B_out.new_empty(B_out.shape))


def _setup_context(ctx, inputs, output):
    x, token, weight, counts, w_in, w_out, A_in, B_in, A_out, B_out, scale, need_h, fp32_scatter, configs = inputs
    ctx.scale, ctx.need_h, ctx.fp32_scatter, ctx.configs = scale, need_h, fp32_scatter, configs
    for t in output[1:]:
        ctx.mark_non_differentiable(t)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, token, weight, counts, w_in, w_out, A_in, B_in, A_out, B_out, *output[1:])


def _backward(ctx, gy, *_unused):
    if not ctx.need_h:
        raise RuntimeError("moe_glu_lora_forward(..., need_h=False) kept no activations for backward")
    x, token, weight, counts, w_in, w_out, A_in, B_in, A_out, B_out, h, z_in, z_out = ctx.saved_tensors
    need_base = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
    g = moe_glu_lora_backward(gy, x, token, weight, counts, w_in, w_out, A_in, B_in, A_out, B_out, h, z_in, z_out,
                              ctx.scale, need_base, ctx.fp32_scatter, ctx.configs)
    gx, gw, gwi, gwo, gai, gbi, gao, gbo = g
    return (gx, None, gw, None, gwi if need_base else None, gwo if need_base else None, gai, gbi, gao, gbo, None,
            None, None, None)


moe_glu_lora_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerMoEGLULoRA(torch.autograd.Function):
    """The custom ops' forward and backward without the dispatcher's Python layer (as
    `ops._EagerMoEGLU`); the backward computes only the gradients autograd asks for (no base
    weight gradients while the base is frozen)."""

    @staticmethod
    def forward(ctx, x, token, weight, counts, w_in, w_out, A_in, B_in, A_out, B_out, scale, need_h, fp32_scatter,
                configs):
        y, h, z_in, z_out = _forward_impl(x, token, weight, counts, w_in, w_out, A_in, B_in, A_out, B_out, scale,
                                          need_h, fp32_scatter, configs)
        ctx.scale, ctx.need_h, ctx.fp32_scatter, ctx.configs = scale, need_h, fp32_scatter, configs
        ctx.save_for_backward(x, token, weight, counts, w_in, w_out, A_in, B_in, A_out, B_out, z_in, z_out)
        # h on ctx, not saved: backward lets it go once read (see `ops._EagerMoEGLU`).
        ctx.h = h
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        if not ctx.need_h:
            raise RuntimeError("moe_glu_lora(..., need_h=False) kept no activations for backward")
        if ctx.h is None:
            raise RuntimeError("the triton MoE backward frees its saved activations as it goes: backward through "
                               "this graph a second time (retain_graph=True) is not supported; use the grouped "
                               "backend for that")
        x, token, weight, counts, w_in, w_out, A_in, B_in, A_out, B_out, z_in, z_out = ctx.saved_tensors
        h_box = [ctx.h]
        ctx.h = None
        n = ctx.needs_input_grad
        needs = (n[0], n[2], n[4], n[5], n[6], n[7], n[8], n[9])
        gx, gw, gwi, gwo, gai, gbi, gao, gbo = _backward_impl(
            gy, x, token, weight, counts, w_in, w_out, A_in, B_in, A_out, B_out, h_box, z_in, z_out, ctx.scale,
            needs, ctx.fp32_scatter, ctx.configs)
        return gx, None, gw, None, gwi, gwo, gai, gbi, gao, gbo, None, None, None, None


def moe_glu_lora(
    x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor, w_out_EDH: Tensor,
    A_in: Tensor, B_in: Tensor, A_out: Tensor, B_out: Tensor, scale: float, need_h: bool = True,
    options: TritonOptions | None = None,
) -> Tensor:
    """``y_TD``: the SwiGLU MoE over the expert-sorted assignments with the adapted weights
    ``W_in[e] + s B_in[e] A_in[e]`` and ``W_out[e] + s B_out[e] A_out[e]``, fused (module
    docstring), with autograd.

    ``A_in [E, R, D]``, ``B_in [E, 2H, R]``, ``A_out [E, R, H]``, ``B_out [E, D, R]`` and the
    weights in ``x_TD``'s dtype; ``scale`` is s = alpha / R. ``need_h=False``: inference (h not
    written, no backward). ``options`` (default ``TritonOptions()``): scatter precision and
    kernel config overrides of the large-batch kernels ("glu_fwd", "gemm_fwd", "glu_bwd",
    "gemm_bwd", "wgrad"), read as the base kernels read them: tiles, warps, stages, group_m,
    TMA for the weights and ungathered rows, and a pre-gathered copy of wide rows.

    Examples
    --------
    >>> lora = bank.lora  # doctest: +SKIP
    >>> y_TD = moe_glu_lora(x_TD, routing.token, routing.weight, routing.counts, bank.w_in, bank.w_out,
    ...                     lora.A_in, lora.B_in, lora.A_out, lora.B_out, lora.scale)  # doctest: +SKIP
    """
    options = options if options is not None else TritonOptions()
    configs = config.configs_to_ints({k: v for k, v in (options.configs or {}).items() if k in config.KERNELS}) or None
    scale = float(scale)
    args = (x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, A_in, B_in, A_out, B_out, scale, need_h,
            options.fp32_scatter, configs)
    if torch.compiler.is_compiling():
        return moe_glu_lora_forward(*args)[0]
    if not torch.is_grad_enabled():
        return _forward_impl(*args)[0]
    return _EagerMoEGLULoRA.apply(*args)
