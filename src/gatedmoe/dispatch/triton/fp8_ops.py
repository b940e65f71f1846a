"""The FP8 forward and backward of the fused MoE (`gatedmoe.dispatch.options.FP8Recipe`):
host side of `fp8_kernels.py`, the per-step weight cache, and `moe_glu_fp8`, the entry
point (an autograd.Function; `fp8_reference.py` is its plain PyTorch oracle).

Forward: x quantised per token (``[T, D]``, before the gather: each token's k copies share
its tiles, so this is a pass over T rows, not T*k), the first GEMM gathers FP8 rows and
quantises a in its SwiGLU epilogue (blockwise), the second GEMM scales by the routing
weight and scatter-adds. Backward: gy quantised per token in ``grad_format``; the gathered
gy @ W_out^T GEMM in FP8; the SwiGLU backward (blockwise: `fp8_kernels.fp8_swiglu_bwd_kernel`,
which also quantises dL/dh; rowwise: `kernels.swiglu_bwd_kernel`, then a quantisation pass
over ``[N, 2H]``); the dL/dx GEMM in FP8 with its scatter-add; the weight gradients in the
input dtype as without FP8 (`launchers.weight_grad`; FP8 weight gradients were tried and
dropped, kernels README "FP8"). Under torch.compile the custom ops
`moe_glu_fp8_forward` / `moe_glu_fp8_backward` run the same code.

Weights are quantised once per optimizer step: the FP8 copies (and the transposed copies
the backward reads) are kept on the parameter and rebuilt when its version counter (every
in-place update bumps it) or its storage changes, or an optimizer has stepped (fused
optimizers do not bump version counters). They cost 1 byte per weight, 2 with the
transposes (training).

Shape legend: T tokens, D model dim, H expert hidden, E experts, N routed assignments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

from gatedmoe.dispatch.options import FP8_MAX, FP8Recipe
from gatedmoe.dispatch.triton import launchers
from gatedmoe.dispatch.triton.config import KernelConfig
from gatedmoe.dispatch.triton.fp8_config import (
    fp8_configs_from_ints,
    fp8_configs_to_ints,
    fp8_kernel_configs,
)
from gatedmoe.dispatch.triton.fp8_kernels import (
    fp8_gemm_kernel,
    fp8_glu_fwd_kernel,
    fp8_swiglu_bwd_kernel,
    quantize_blocks_kernel,
    quantize_rows_and_cols_kernel,
    quantize_rows_kernel,
    weight_amax_kernel,
)
from gatedmoe.dispatch.triton.fp8_reference import _FMAX_EXP, FP8_DTYPES
from gatedmoe.dispatch.triton.launchers import TensorDescriptor
from gatedmoe.dispatch.triton.ops import _counts_on_host

__all__ = [
    "QuantizedWeight",
    "fp8_swiglu_bwd",
    "fp8_unsupported",
    "moe_glu_fp8",
    "moe_glu_fp8_backward",
    "moe_glu_fp8_forward",
    "quantize_rows",
    "quantize_weight",
    "quantized_weight",
]

_CACHE_ATTR = "_gatedmoe_fp8_cache"
# Optimizer steps taken in this process, counted by a global post-step hook registered on
# first use. A fused optimizer (`torch.optim.AdamW(fused=True)`) writes the parameters in
# place without bumping their version counters, so the version alone would keep serving the
# FP8 copy of the weights before the step.
_optimizer_steps = 0
_step_hook = None


def _steps_taken() -> int:
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_count_step)
    return _optimizer_steps


def _count_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _round(t: Tensor) -> bool:
    """Whether the kernels round to FP8 in float32 first: only in Triton's CPU interpreter,
    whose own float8 conversion is wrong where rounding carries into the exponent
    (`fp8_kernels._round_fp8_in_fp32`); on the GPU the conversion rounds correctly."""
    return not t.is_cuda


def quantize_rows(x_RC: Tensor, fmt: str, group: int | None) -> tuple[Tensor, Tensor]:
    """``(q [R, C], s [R, KB])``: rows of ``x`` in FP8 ``fmt`` with one power-of-two scale
    per ``1 x group`` tile (``None``: per row), as `fp8_reference.quantize_rows`.

    Examples
    --------
    >>> q, s = quantize_rows(torch.randn(64, 256, device="cuda"), "e4m3", 128)  # doctest: +SKIP
    >>> q.dtype, s.shape  # doctest: +SKIP
    (torch.float8_e4m3fn, torch.Size([64, 2]))
    """
    x = x_RC if x_RC.stride(-1) == 1 else x_RC.contiguous()
    R, C = x.shape
    G = C if group is None else group
    KB = triton.cdiv(C, G) if C else 1
    q = launchers.alloc(R, C, device=x.device, dtype=FP8_DTYPES[fmt])
    s = launchers.alloc(R, KB, device=x.device, dtype=torch.float32)
    if R and C:
        BR = 32 if x.is_cuda else 16
        BC = min(128, max(16, triton.next_power_of_2(G)))
        quantize_rows_kernel[(triton.cdiv(R, BR), KB)](x, q, s, R, C, x.stride(0), KB, G, BR=BR, BC=BC,
                                                       FMAX=FP8_MAX[fmt], FMAX_EXP=_FMAX_EXP[fmt], ROUND=_round(x),
                                                       num_warps=4)
    return q, s


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight ``w [E, R, C]`` in e4m3, rows = output channels, reduction contiguous:
    ``q [E, R, C]`` with scales ``s [E, WNB, WKB]`` (row r, column c: ``s[e, r // WB, c // block]``),
    and for backward the transpose ``qt [E, C, R]`` with ``st`` (None when not built)."""

    q: Tensor
    s: Tensor
    qt: Tensor | None
    st: Tensor | None
    WB: int


def quantize_weight(w: Tensor, recipe: FP8Recipe, transpose: bool) -> QuantizedWeight:
    """``w [E, R, C]`` quantised by ``recipe`` (no cache; `quantized_weight` caches): e4m3
    blocks of ``block x block`` (blockwise; the transpose from the same kernel, same scales)
    or rows (rowwise; the transpose quantised per row of its own)."""
    E, R, C = w.shape
    if recipe.scaling == "rowwise":
        if not transpose:
            q, s = quantize_rows(w.reshape(E * R, C), "e4m3", None)
            return QuantizedWeight(q.view(E, R, C), s.view(E, R, 1), None, None, 1)
        return _quantize_rows_and_cols(w.contiguous())
    B = recipe.block
    wc = w.contiguous()
    RB, CB = triton.cdiv(R, B), triton.cdiv(C, B)
    q = launchers.alloc(E, R, C, device=w.device, dtype=torch.float8_e4m3fn)
    qt = launchers.alloc(E, C, R, device=w.device, dtype=torch.float8_e4m3fn) if transpose else q
    s = launchers.alloc(E, RB, CB, device=w.device, dtype=torch.float32)
    quantize_blocks_kernel[(E * RB * CB,)](wc, q, qt, s, R, C, RB, CB, B=B, FMAX=FP8_MAX["e4m3"],
                                           FMAX_EXP=_FMAX_EXP["e4m3"], WRITE_T=transpose, ROUND=_round(w),
                                           num_warps=8 if w.is_cuda else 4)
    st = s.transpose(1, 2).contiguous() if transpose else None
    return QuantizedWeight(q, s, qt if transpose else None, st, B)


def _quantize_rows_and_cols(w: Tensor) -> QuantizedWeight:
    """The rowwise recipe's ``w [E, R, C]`` per row and its transpose per row of its own
    (= per column of w): the row and column amaxes in one pass, both quantisations in a
    second (`weight_amax_kernel`, `quantize_rows_and_cols_kernel`)."""
    E, R, C = w.shape
    q = launchers.alloc(E, R, C, device=w.device, dtype=torch.float8_e4m3fn)
    qt = launchers.alloc(E, C, R, device=w.device, dtype=torch.float8_e4m3fn)
    s = launchers.alloc(E, R, 1, device=w.device, dtype=torch.float32)
    st = launchers.alloc(E, C, 1, device=w.device, dtype=torch.float32)
    if w.numel():
        rmax = torch.zeros(E, R, device=w.device, dtype=torch.int32)
        cmax = torch.zeros(E, C, device=w.device, dtype=torch.int32)
        BR = BC = 64 if w.is_cuda else 16
        RB, CB = triton.cdiv(R, BR), triton.cdiv(C, BC)
        weight_amax_kernel[(E * RB * CB,)](w, rmax, cmax, R, C, RB, CB, BR=BR, BC=BC, num_warps=4)
        quantize_rows_and_cols_kernel[(E * RB * CB,)](w, q, qt, s, st, rmax, cmax, R, C, RB, CB, BR=BR, BC=BC,
                                                      FMAX=FP8_MAX["e4m3"], FMAX_EXP=_FMAX_EXP["e4m3"],
                                                      ROUND=_round(w), num_warps=4)
    return QuantizedWeight(q, s, qt, st, 1)


class _WeightCache:
    """A parameter's FP8 copies and the key they were made under (see `quantized_weight`).
    Pickling and deep copies drop the contents, so a saved or copied model never carries them
    (a copy re-quantises on first use)."""

    __slots__ = ("key", "value")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: QuantizedWeight | None = None

    def __reduce__(self):
        return (_WeightCache, ())

    def __deepcopy__(self, memo: dict) -> _WeightCache:
        return _WeightCache()


def quantized_weight(w: Tensor, recipe: FP8Recipe, transpose: bool) -> QuantizedWeight:
    """``w`` quantised by ``recipe`` (with its transpose if ``transpose``), cached on ``w``
    and rebuilt only when ``w._version`` or ``w.data_ptr()`` changes or any
    ``torch.optim.Optimizer`` has taken a step since (an optimizer step).

    In-place updates of ``w`` itself (``load_state_dict``, ``with torch.no_grad():
    w.mul_(...)``) bump its version, and optimizer steps are counted (fused optimizers write
    in place without bumping it); an update through ``w.data`` outside an optimizer does
    neither (``.data`` has a version counter of its own), so code that writes ``w.data`` in
    place must not expect the FP8 copy to follow it.

    Examples
    --------
    >>> w = torch.nn.Parameter(torch.randn(2, 256, 128, device="cuda"))  # doctest: +SKIP
    >>> quantized_weight(w, FP8Recipe(), True) is quantized_weight(w, FP8Recipe(), True)  # doctest: +SKIP
    True
    """
    key = (w._version, w.data_ptr(), _steps_taken(), tuple(w.shape), w.dtype, recipe.scaling, recipe.block)
    cache = getattr(w, _CACHE_ATTR, None)
    if cache is None:
        # On the tensor the caller passes (the parameter): the cache lives and dies with it.
        cache = _WeightCache()
        setattr(w, _CACHE_ATTR, cache)
    if cache.key == key and (cache.value.qt is not None or not transpose):
        return cache.value
    cache.key, cache.value = None, None  # the stale copies go before the new ones are made
    with torch.no_grad():
        cache.value = quantize_weight(w.detach(), recipe, transpose)
    cache.key = key
    return cache.value


def fp8_unsupported(x_TD: Tensor, w_in_EHD: Tensor, recipe: FP8Recipe) -> str | None:
    """Why the FP8 path cannot run this call, or None."""
    if x_TD.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {x_TD.dtype}"
    # Not while torch.compile traces (a host query): the eager calls before it have checked.
    if not torch.compiler.is_compiling() and x_TD.is_cuda and torch.cuda.get_device_capability(x_TD.device) < (8, 9):
        return "a GPU without FP8 tensor cores (needs compute capability >= 8.9)"
    D, H = w_in_EHD.shape[-1], w_in_EHD.shape[-2] // 2
    if recipe.scaling == "blockwise" and (D % recipe.block or H % recipe.block):
        return (f"blockwise scaling with D={D}, H={H} (both must be multiples of block={recipe.block}; "
                f"rowwise scaling takes any width)")
    return None


def _tma_operand(t: Tensor, block: list[int], cfg: KernelConfig) -> tuple[object, bool]:
    """``t`` (FP8, ``[..., K]``, K contiguous) as a TMA descriptor over its 2-D view ``[rows, K]``
    with ``block`` where the config asks for it and TMA can address it (16-byte aligned rows
    and base), else the tensor itself."""
    K = t.shape[-1]
    if cfg.tma and TensorDescriptor is not None and t.is_contiguous() and K % 16 == 0 and t.data_ptr() % 16 == 0:
        return TensorDescriptor.from_tensor(t.view(-1, K), block), True
    return t, False


def _launch_glu(xq, xs, token, wq: QuantizedWeight, h, a, a_s, counts, N, D, H, cfg, blockwise, store_h):
    E = wq.q.shape[0]
    MT = launchers.n_row_tiles(N, E, cfg.BM)
    w_arg, w_desc = _tma_operand(wq.q, [cfg.BN, cfg.BK], cfg)
    fp8_glu_fwd_kernel[(triton.cdiv(H, cfg.BN) * MT,)](
        xq, xs, token, w_arg, wq.s, h, a, a_s, counts, E, MT, D, H, xs.shape[1], wq.s.shape[1], wq.s.shape[2],
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.group_m, E_POW2=launchers.e_pow2(E), BLOCKWISE=blockwise, WB=wq.WB,
        STORE_H=store_h, QUANT_A=blockwise, FMAX=FP8_MAX["e4m3"], FMAX_EXP=_FMAX_EXP["e4m3"], ROUND=_round(xq),
        W_DESC=w_desc, num_warps=cfg.warps, num_stages=cfg.stages,
    )


def _launch_gemm(aq, a_s, b: Tensor, bs: Tensor, WB: int, c, token, weight, counts, N, K, n_cols, *, gather,
                 scale, scatter, cfg, blockwise):
    """``C[rows_e] = A[rows_e] @ b[e]^T`` with ``b [E, n_cols, K]`` (see `fp8_gemm_kernel`)."""
    E = b.shape[0]
    MT = launchers.n_row_tiles(N, E, cfg.BM)
    b_arg, b_desc = _tma_operand(b, [cfg.BN, cfg.BK], cfg)
    a_arg, a_desc = (aq, False) if gather else _tma_operand(aq, [cfg.BM, cfg.BK], cfg)
    fp8_gemm_kernel[(triton.cdiv(n_cols, cfg.BN) * MT,)](
        a_arg, a_s, b_arg, bs, c, token, weight, counts, E, MT, K, n_cols, a_s.shape[1], bs.shape[1], bs.shape[2],
        c.stride(0), GATHER_A=gather, SCALE=scale, SCATTER_C=scatter, BLOCKWISE=blockwise, WB=WB, A_DESC=a_desc,
        B_DESC=b_desc,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.group_m, E_POW2=launchers.e_pow2(E),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )


def _fp8_forward(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h, recipe, fp32_scatter, configs):
    x = x_TD.contiguous()
    T, D = x.shape
    N = token_N.numel()
    H = w_out_EDH.shape[-1]
    h = launchers.alloc(N if need_h else 0, 2 * H, device=x.device, dtype=x.dtype)
    if N == 0:
        return torch.zeros_like(x), h
    blockwise = recipe.scaling == "blockwise"
    group = recipe.block if blockwise else None
    cfgs = fp8_kernel_configs(x.device, recipe.block, recipe.scaling, configs)
    w_in = quantized_weight(w_in_EHD, recipe, need_h)
    w_out = quantized_weight(w_out_EDH, recipe, need_h)
    xq, xs = quantize_rows(x, "e4m3", group)
    if blockwise:
        aq = launchers.alloc(N, H, device=x.device, dtype=torch.float8_e4m3fn)
        a_s = launchers.alloc(N, H // recipe.block, device=x.device, dtype=torch.float32)
        _launch_glu(xq, xs, token_N, w_in, h, aq, a_s, counts_E, N, D, H, cfgs["fp8_glu_fwd"], True, need_h)
    else:
        # A row's amax is known only once all its column tiles are written: a separate pass.
        a = launchers.alloc(N, H, device=x.device, dtype=x.dtype)
        _launch_glu(xq, xs, token_N, w_in, h, a, xs, counts_E, N, D, H, cfgs["fp8_glu_fwd"], False, need_h)
        aq, a_s = quantize_rows(a, "e4m3", None)
        del a
    y = launchers.scatter_buffer(T, D, x, fp32_scatter)
    _launch_gemm(aq, a_s, w_out.q, w_out.s, w_out.WB, y, token_N, weight_N, counts_E, N, H, D, gather=False,
                 scale=True, scatter=True, cfg=cfgs["fp8_gemm"], blockwise=blockwise)
    return y.to(x.dtype), h


def _fp8_backward(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, h_box, recipe, fp32_scatter,
                  configs):
    gy = gy_TD.contiguous()
    x = x_TD.contiguous()
    T, D = x.shape
    N = token_N.numel()
    H = w_out_EDH.shape[-1]
    if N == 0:
        return (torch.zeros_like(x), weight_N.new_zeros(0), torch.zeros_like(w_in_EHD),
                torch.zeros_like(w_out_EDH))
    blockwise = recipe.scaling == "blockwise"
    group = recipe.block if blockwise else None
    fmt = recipe.grad_format
    cfg = fp8_kernel_configs(x.device, recipe.block, recipe.scaling, configs)["fp8_gemm"]
    # Few large experts: the bf16 weight gradients as one product per expert, as without FP8
    # (`config.PER_EXPERT_MIN_ROWS`); the counts' copy to the host starts now.
    host_counts = _counts_on_host(counts_E, N, x.dtype)
    w_in = quantized_weight(w_in_EHD, recipe, True)
    w_out = quantized_weight(w_out_EDH, recipe, True)
    gyq, gys = quantize_rows(gy, fmt, group)
    # ga = gy[token] @ W_out[e]: W_out^T [E, H, D] holds the rows = output columns h.
    ga = launchers.alloc(N, H, device=x.device, dtype=x.dtype)
    _launch_gemm(gyq, gys, w_out.qt, w_out.st, w_out.WB, ga, token_N, weight_N, counts_E, N, D, H, gather=True,
                 scale=False, scatter=False, cfg=cfg, blockwise=blockwise)
    del gyq, gys
    wa = ga  # written in place, as without FP8 (`ops._backward_impl`)
    if blockwise:  # dL/dh quantised in the SwiGLU backward: its chunks are the 1 x block tiles
        gh, gweight, ghq, ghs = fp8_swiglu_bwd(ga, h_box.pop(), weight_N, fmt, recipe.block)
    else:  # a row's amax needs the whole row: a separate pass
        gh = launchers.alloc(N, 2 * H, device=x.device, dtype=x.dtype)
        gweight = launchers.alloc(N, device=x.device, dtype=torch.float32)
        launchers.launch_swiglu_bwd(ga, h_box.pop(), weight_N, gh, wa, gweight, N, H)
        ghq, ghs = quantize_rows(gh, fmt, group)
    gx = launchers.scatter_buffer(T, D, x, fp32_scatter)
    # dL/dx[token] += dL/dh @ W_in[e]: W_in^T [E, D, 2H] holds the rows = output columns d.
    _launch_gemm(ghq, ghs, w_in.qt, w_in.st, w_in.WB, gx, token_N, weight_N, counts_E, N, 2 * H, D, gather=False,
                 scale=False, scatter=True, cfg=cfg, blockwise=blockwise)
    del ghq, ghs
    counts_list = host_counts() if host_counts is not None else None
    offs = torch.cumsum(counts_E, 0, dtype=torch.int32) if counts_list is None else None
    grad_w_in = launchers.weight_grad(gh, x.index_select(0, token_N), counts_E, offs, counts_list)  # [E, 2H, D]
    del gh
    grad_w_out = launchers.weight_grad(gy.index_select(0, token_N), wa, counts_E, offs, counts_list)  # [E, D, H]
    return gx.to(x.dtype), gweight.to(weight_N.dtype), grad_w_in.to(w_in_EHD.dtype), grad_w_out.to(w_out_EDH.dtype)


def fp8_swiglu_bwd(ga_NH: Tensor, h_N2H: Tensor, weight_N: Tensor, fmt: str, block: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The SwiGLU backward of the blockwise recipe with dL/dh quantised in the same pass
    (`fp8_kernels.fp8_swiglu_bwd_kernel`): ``(gh [N, 2H], gweight [N] float32, ghq [N, 2H],
    ghs [N, 2H / block])``, and ``weight * a`` written over ``ga`` (as `launchers.launch_swiglu_bwd`
    with ``wa = ga``). ``gh`` in ga's dtype; ``ghq, ghs`` equal `quantize_rows` (gh, fmt, block).
    H must be a multiple of ``block``.

    Examples
    --------
    >>> gh, gw, ghq, ghs = fp8_swiglu_bwd(ga, h, weight, "e4m3", 128)  # doctest: +SKIP
    """
    N, H = ga_NH.shape
    gh = launchers.alloc(N, 2 * H, device=ga_NH.device, dtype=ga_NH.dtype)
    gweight = launchers.alloc(N, device=ga_NH.device, dtype=torch.float32)
    ghq = launchers.alloc(N, 2 * H, device=ga_NH.device, dtype=FP8_DTYPES[fmt])
    ghs = launchers.alloc(N, 2 * H // block, device=ga_NH.device, dtype=torch.float32)
    if N:
        BM = 8 if ga_NH.is_cuda else 16
        fp8_swiglu_bwd_kernel[(triton.cdiv(N, BM),)](
            ga_NH, h_N2H, weight_N, gh, ga_NH, gweight, ghq, ghs, N, H, BM=BM, BH=block, FMAX=FP8_MAX[fmt],
            FMAX_EXP=_FMAX_EXP[fmt], ROUND=_round(ga_NH), num_warps=4 if ga_NH.is_cuda else 1)
    return gh, gweight, ghq, ghs


@torch.library.custom_op("gatedmoe::moe_glu_fp8_forward", mutates_args=())
def moe_glu_fp8_forward(
    x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor, w_out_EDH: Tensor,
    scaling: str, grad_format: str, block: int, fp32_scatter: bool = False,
    configs: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(y_TD, h_N2H)`` of the FP8 forward as a custom op (what torch.compile sees): the
    `FP8Recipe` as its fields, the config overrides as `fp8_config.fp8_configs_to_ints` ints.
    The weights are quantised by `quantized_weight` (cached on the tensors the op receives)."""
    recipe = FP8Recipe(scaling=scaling, grad_format=grad_format, block=block)
    return _fp8_forward(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, True, recipe, fp32_scatter,
                        fp8_configs_from_ints(configs))


@moe_glu_fp8_forward.register_fake
def _(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, scaling, grad_format, block, fp32_scatter=False,
      configs=None):
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(token_N.shape[0], 2 * w_out_EDH.shape[-1])


@torch.library.custom_op("gatedmoe::moe_glu_fp8_backward", mutates_args=())
def moe_glu_fp8_backward(
    gy_TD: Tensor, x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor,
    w_out_EDH: Tensor, h_N2H: Tensor, scaling: str, grad_format: str, block: int,
    fp32_scatter: bool = False, configs: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_w_in, grad_w_out)`` of `moe_glu_fp8_forward`."""
    recipe = FP8Recipe(scaling=scaling, grad_format=grad_format, block=block)
    return _fp8_backward(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, [h_N2H], recipe,
                         fp32_scatter, fp8_configs_from_ints(configs))


@moe_glu_fp8_backward.register_fake
def _(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, h_N2H, scaling, grad_format, block,
      fp32_scatter=False, configs=None):
    return (x_TD.new_empty(x_TD.shape), weight_N.new_empty(weight_N.shape), w_in_EHD.new_empty(w_in_EHD.shape),
            w_out_EDH.new_empty(w_out_EDH.shape))


def _fp8_setup_context(ctx, inputs, output):
    x, token, weight, counts, w_in, w_out, *rest = inputs
    ctx.rest = rest
    ctx.mark_non_differentiable(output[1])  # h: saved for backward only (as in `ops`)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, token, weight, counts, w_in, w_out, output[1])


def _fp8_op_backward(ctx, gy, _gh_unused):
    x, token, weight, counts, w_in, w_out, h = ctx.saved_tensors
    gx, gw, gwi, gwo = moe_glu_fp8_backward(gy, x, token, weight, counts, w_in, w_out, h, *ctx.rest)
    return gx, None, gw, None, gwi, gwo, None, None, None, None, None


moe_glu_fp8_forward.register_autograd(_fp8_op_backward, setup_context=_fp8_setup_context)


class _FP8MoEGLU(torch.autograd.Function):
    """`_fp8_forward` / `_fp8_backward` under autograd; h is kept on ctx and freed once read
    (as in `ops._EagerMoEGLU`), the weights are saved so that backward finds their cached
    FP8 copies (and autograd checks they were not modified in between)."""

    @staticmethod
    def forward(ctx, x, token, weight, counts, w_in, w_out, recipe, fp32_scatter, configs):
        y, h = _fp8_forward(x, token, weight, counts, w_in, w_out, True, recipe, fp32_scatter, configs)
        ctx.recipe, ctx.fp32_scatter, ctx.configs, ctx.h = recipe, fp32_scatter, configs, h
        ctx.save_for_backward(x, token, weight, counts, w_in, w_out)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        if ctx.h is None:
            raise RuntimeError("the FP8 triton MoE backward frees its saved activations as it goes: backward through "
                               "this graph a second time (retain_graph=True) is not supported")
        x, token, weight, counts, w_in, w_out = ctx.saved_tensors
        h_box = [ctx.h]
        ctx.h = None
        gx, gw, gwi, gwo = _fp8_backward(gy, x, token, weight, counts, w_in, w_out, h_box, ctx.recipe,
                                         ctx.fp32_scatter, ctx.configs)
        return gx, None, gw, None, gwi, gwo, None, None, None


def moe_glu_fp8(
    x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor, w_out_EDH: Tensor,
    recipe: FP8Recipe, fp32_scatter: bool = False, configs: Mapping[str, KernelConfig] | None = None,
) -> Tensor:
    """The SwiGLU MoE output ``y_TD`` (``x``'s dtype) with the expert GEMMs in FP8: the
    custom op `moe_glu_fp8_forward` while torch.compile traces, an autograd.Function over
    the same code in eager mode, that code alone without gradients.

    ``x_TD`` [T, D] bf16/fp16/fp32; ``token_N``, ``weight_N``, ``counts_E`` the expert-sorted
    routing; ``w_in_EHD`` [E, 2H, D] and ``w_out_EDH`` [E, D, H] the parameters themselves
    (any float dtype, quantised from it and cached on them; gradients come back in their
    dtype). ``fp32_scatter`` and ``configs`` (its "fp8_glu_fwd" / "fp8_gemm" entries) as
    `TritonOptions`. Raises ValueError where `fp8_unsupported` gives a reason.

    Examples
    --------
    >>> y_TD = moe_glu_fp8(x_TD, routing.token, routing.weight, routing.counts, bank.w_in, bank.w_out,
    ...                    FP8Recipe())  # doctest: +SKIP
    """
    reason = fp8_unsupported(x_TD, w_in_EHD, recipe)
    if reason is not None:
        raise ValueError(f"TritonOptions(fp8=...): the FP8 path does not support {reason}")
    if torch.compiler.is_compiling():
        return moe_glu_fp8_forward(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, recipe.scaling,
                                   recipe.grad_format, recipe.block, fp32_scatter,
                                   fp8_configs_to_ints(configs) or None)[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, weight_N, w_in_EHD, w_out_EDH))
    if not grad:
        return _fp8_forward(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, False, recipe, fp32_scatter,
                            configs)[0]
    return _FP8MoEGLU.apply(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, recipe, fp32_scatter, configs)
