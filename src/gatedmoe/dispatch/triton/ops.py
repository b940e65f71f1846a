"""The fused MoE forward and backward as `torch.library` custom ops (with fake and
autograd registrations), launching the kernels through `launchers.py`; `moe_glu` is the
entry point (the custom op under torch.compile, an autograd.Function over the same code in
eager mode).

The options of a call (`gatedmoe.dispatch.options.TritonOptions`) reach the custom ops as
plain values: ``fp32_scatter`` a bool, the config overrides as ints (`config.configs_to_ints`).

Weight gradients use `torch._grouped_mm` in its "reduce over rows" form where available
(CUDA bf16; elsewhere a per-expert loop), one cuBLAS product per expert where the experts
are few and large (`config.PER_EXPERT_MIN_ROWS`), and for the W_out gradient when gy was not
gathered into a copy `kernels.wgrad_kernel`, which reads gy rows by token.

The decode path (`moe_glu_decode`, custom op ``gatedmoe::moe_glu_decode``) is a forward
for inference at small sizes (`config.use_decode`): three launches whose grids depend on the
sizes only, no host synchronisation, a deterministic combine; it keeps nothing for backward.

Shape legend: T tokens, D model dim, H expert hidden, E experts, N routed assignments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gatedmoe.dispatch.options import TritonOptions
from gatedmoe.dispatch.triton import config, launchers
from gatedmoe.dispatch.triton.config import KernelConfig

__all__ = ["moe_glu", "moe_glu_backward", "moe_glu_decode", "moe_glu_decode_forward", "moe_glu_forward"]


def _problem(x: Tensor, token_N: Tensor, w_out_EDH: Tensor, configs: Sequence[int] | None, inference: bool = False):
    """Sizes and kernel configs shared by forward and backward; ``inference``: a forward that
    keeps no h (its products' tiles follow the rows per expert, `config.kernel_configs`)."""
    T, D = x.shape
    N = token_N.numel()
    E, _, H = w_out_EDH.shape
    rows = N / max(1, min(N, E)) if inference else None
    return T, D, N, H, config.kernel_configs(x.dtype, x.device, H, config.configs_from_ints(configs), rows)


def _pregather(cfg: KernelConfig, rows: Tensor) -> bool:
    """Whether a gathered kernel reads a gathered copy of ``rows`` through TMA (see `KernelConfig`)."""
    return cfg.pregather and cfg.tma and launchers.tma_ok(rows, rows.shape[1])


@torch.library.custom_op("gatedmoe::moe_glu_forward", mutates_args=())
def moe_glu_forward(
    x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor, w_out_EDH: Tensor,
    need_h: bool = True, fp32_scatter: bool = False, configs: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(y_TD, h_N2H)``: the SwiGLU MoE output and the first GEMM's output (for backward).

    With ``need_h=False`` (inference) h is not written and comes back with 0 rows; such an
    output cannot be differentiated. ``fp32_scatter`` and ``configs`` (kernel config
    overrides as `config.configs_to_ints` gives them) are `TritonOptions`' fields.
    """
    return _forward_impl(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h, fp32_scatter, configs)


def _forward_impl(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h, fp32_scatter, configs):
    x = x_TD.contiguous()
    T, D, N, H, cfgs = _problem(x, token_N, w_out_EDH, configs, inference=not need_h)
    h = launchers.alloc(N if need_h else 0, 2 * H, device=x.device, dtype=x.dtype)
    a = launchers.alloc(N, H, device=x.device, dtype=x.dtype)
    if N == 0:
        return torch.zeros_like(x), h
    w_in = w_in_EHD.contiguous()
    w_out = w_out_EDH.contiguous()
    prec = launchers.precision(x.dtype)
    cfg = cfgs["glu_fwd"]
    if _pregather(cfg, x):
        launchers.launch_glu_fwd(x.index_select(0, token_N), token_N, w_in, h, a, counts_E, N, D, H, cfg, prec,
                                 gathered=True, store_h=need_h)
    else:
        launchers.launch_glu_fwd(x, token_N, w_in, h, a, counts_E, N, D, H, cfg, prec, store_h=need_h)
    # Zeroed only now: the GPU runs the first GEMM while the host prepares the rest (at
    # small sizes the host's time until that launch shows in the step time).
    y = launchers.scatter_buffer(T, D, x, fp32_scatter)
    # y[token] += weight * (a @ W_out[e]^T): B[k=h, n=d] = w_out[e, d, h]
    launchers.launch_gemm(a, w_out, (D * H, 1, H), y, token_N, weight_N, counts_E, N, H, D,
                          gather=False, scale=True, scatter=True, cfg=cfgs["gemm_fwd"], prec=prec)
    return y.to(x.dtype), h


@moe_glu_forward.register_fake
def _(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h=True, fp32_scatter=False, configs=None):
    N = token_N.shape[0] if need_h else 0
    H = w_out_EDH.shape[-1]
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(N, 2 * H)


def _counts_on_host(counts_E: Tensor, N: int, dtype: torch.dtype) -> Callable[[], list[int]] | None:
    """Start copying the per-expert counts to the host if the weight gradients will be
    per-expert products (see `config.PER_EXPERT_MIN_ROWS`); returns a function that waits
    for the copy and gives the list, or None.

    The copy is queued at the start of backward and waited for only at the weight
    gradients, so the host never waits for the GPU's queued products (a plain ``tolist()``
    there would drain the queue). Not while a CUDA graph is being captured.
    """
    E = counts_E.numel()
    if not (counts_E.is_cuda and dtype == torch.bfloat16 and E <= config.PER_EXPERT_MAX_E
            and N >= config.PER_EXPERT_MIN_ROWS * E):
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


@torch.library.custom_op("gatedmoe::moe_glu_backward", mutates_args=())
def moe_glu_backward(
    gy_TD: Tensor, x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor,
    w_in_EHD: Tensor, w_out_EDH: Tensor, h_N2H: Tensor, fp32_scatter: bool = False,
    configs: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_w_in, grad_w_out)`` of `moe_glu_forward`."""
    return _backward_impl(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, [h_N2H], fp32_scatter,
                          configs)


def _backward_impl(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, h_box: list[Tensor],
                   fp32_scatter, configs):
    """``h_box`` holds h; it is emptied once h is read, so a caller that keeps no other
    reference frees its [N, 2H] before the weight gradients are allocated."""
    gy = gy_TD.contiguous()
    x = x_TD.contiguous()
    T, D, N, H, cfgs = _problem(x, token_N, w_out_EDH, configs)
    if N == 0:
        return torch.zeros_like(x), weight_N.new_zeros(0), torch.zeros_like(w_in_EHD), torch.zeros_like(w_out_EDH)
    w_in = w_in_EHD.contiguous()
    w_out = w_out_EDH.contiguous()
    prec = launchers.precision(x.dtype)
    host_counts = _counts_on_host(counts_E, N, x.dtype)
    gh = launchers.alloc(N, 2 * H, device=x.device, dtype=x.dtype)
    # ga = gy[token] @ W_out[e]: B[k=d, n=h] = w_out[e, d, h]. The W_out gradient needs the
    # gathered gy as well, so a pre-gathered copy serves both.
    ga = launchers.alloc(N, H, device=x.device, dtype=x.dtype)
    cfg = cfgs["glu_bwd"]
    gys = gy.index_select(0, token_N) if _pregather(cfg, gy) else None
    launchers.launch_gemm(gy if gys is None else gys, w_out, (D * H, H, 1), ga, token_N, weight_N, counts_E, N, D,
                          H, gather=gys is None, scale=False, scatter=False, cfg=cfg, prec=prec)
    # Allocated after the first launch, as in forward.
    gx = launchers.scatter_buffer(T, D, x, fp32_scatter)
    gweight = launchers.alloc(N, device=x.device, dtype=torch.float32)
    # The SwiGLU backward writes weight * a over ga in place (each element is read before it
    # is written, by the same program): one [N, H] buffer fewer at the peak.
    wa = ga
    launchers.launch_swiglu_bwd(ga, h_box.pop(), weight_N, gh, wa, gweight, N, H)
    del ga
    # grad_x[token] += gh @ W_in[e]: B[k=j, n=d] = w_in[e, j, d]
    launchers.launch_gemm(gh, w_in, (2 * H * D, D, 1), gx, token_N, weight_N, counts_E, N, 2 * H, D,
                          gather=False, scale=False, scatter=True, cfg=cfgs["gemm_bwd"], prec=prec)
    # Weight gradients one at a time, the larger first, each operand freed as soon as it is
    # used: the peak then holds gh [N, 2H] and grad_w_in, never both with grad_w_out.
    xs = x.index_select(0, token_N)
    counts_list = host_counts() if host_counts is not None else None
    offs = torch.cumsum(counts_E, 0, dtype=torch.int32) if counts_list is None else None
    grad_w_in = launchers.weight_grad(gh, xs, counts_E, offs, counts_list)  # [E, 2H, D]
    del xs, gh
    if gys is None:
        # No gathered copy of gy exists: a kernel reading gy by token beats copy + grouped GEMM
        # (measured on the H100, fine-grained shape: 0.66 vs 0.78 ms). Where the copy exists
        # the grouped GEMM is faster (DeepSeek 1.17 vs 1.14 ms with the copy charged to it).
        grad_w_out = launchers.alloc(*w_out.shape, device=x.device, dtype=x.dtype)  # [E, D, H]
        launchers.launch_wgrad(gy, wa, grad_w_out, token_N, counts_E, gather_l=True, gather_r=False,
                               cfg=cfgs["wgrad"], prec=prec)
    else:
        grad_w_out = launchers.weight_grad(gys, wa, counts_E, offs, counts_list)  # [E, D, H]
    del gys, wa
    return gx.to(x.dtype), gweight.to(weight_N.dtype), grad_w_in.to(w_in_EHD.dtype), grad_w_out.to(w_out_EDH.dtype)


@moe_glu_backward.register_fake
def _(gy_TD, x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, h_N2H, fp32_scatter=False, configs=None):
    return x_TD.new_empty(x_TD.shape), weight_N.new_empty(weight_N.shape), w_in_EHD.new_empty(w_in_EHD.shape), \
        w_out_EDH.new_empty(w_out_EDH.shape)


def _setup_context(ctx, inputs, output):
    x, token, weight, counts, w_in, w_out, need_h, fp32_scatter, configs = inputs
    ctx.need_h = need_h
    ctx.fp32_scatter = fp32_scatter
    ctx.configs = configs
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
    gx, gw, gwi, gwo = moe_glu_backward(gy, x, token, weight, counts, w_in, w_out, h, ctx.fp32_scatter, ctx.configs)
    return gx, None, gw, None, gwi, gwo, None, None, None


moe_glu_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerMoEGLU(torch.autograd.Function):
    """The same forward and backward as the custom ops, without the dispatcher's Python
    custom-op layer (measured on the H100 machine: ~75 us of host time per forward call,
    more with autograd; at T=8192 d=1024 the whole step is host-bound)."""

    @staticmethod
    def forward(ctx, x, token, weight, counts, w_in, w_out, need_h, fp32_scatter, configs):
        y, h = _forward_impl(x, token, weight, counts, w_in, w_out, need_h, fp32_scatter, configs)
        ctx.need_h = need_h
        ctx.fp32_scatter = fp32_scatter
        ctx.configs = configs
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
        gx, gw, gwi, gwo = _backward_impl(gy, x, token, weight, counts, w_in, w_out, h_box, ctx.fp32_scatter,
                                          ctx.configs)
        return gx, None, gw, None, gwi, gwo, None, None, None


def moe_glu(
    x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor, w_out_EDH: Tensor,
    need_h: bool = True, options: TritonOptions | None = None,
) -> tuple[Tensor, Tensor]:
    """`moe_glu_forward` with autograd: the custom op while torch.compile traces (so the
    graph sees one opaque op with its fake and autograd rules), a plain autograd.Function
    running the same code in eager mode (less host time per call), and that code alone
    when gradients are disabled.

    ``options`` (default ``TritonOptions()``): scatter precision and kernel config overrides.

    Examples
    --------
    >>> y_TD, h_N2H = moe_glu(x_TD, routing.token, routing.weight, routing.counts, w_in, w_out,
    ...                       options=TritonOptions(fp32_scatter=True))  # doctest: +SKIP
    """
    options = options if options is not None else TritonOptions()
    fp32_scatter = options.fp32_scatter
    # The FP8 kernels' entries are for the FP8 path (`fp8_ops`), not these kernels.
    configs = config.configs_to_ints({k: v for k, v in (options.configs or {}).items() if k in config.KERNELS}) or None
    if torch.compiler.is_compiling():
        return moe_glu_forward(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h, fp32_scatter, configs)
    if not torch.is_grad_enabled():  # no graph to record: skip the Function's ~20 us of host time
        return _forward_impl(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h, fp32_scatter, configs)
    return _EagerMoEGLU.apply(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, need_h, fp32_scatter, configs)


# ---------------------------------------------------------------------------------- decode
@torch.library.custom_op("gatedmoe::moe_glu_decode", mutates_args=())
def moe_glu_decode_forward(
    x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor, w_out_EDH: Tensor,
    configs: Sequence[int] | None = None,
) -> Tensor:
    """``y_TD``, the SwiGLU MoE output, by the decode kernels (inference only: its backward
    raises). ``configs``: kernel config overrides as `config.configs_to_ints` gives them
    ("decode_glu", "decode_down")."""
    return _decode_impl(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, configs)


def _decode_impl(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, configs):
    x = x_TD.contiguous()
    T, D = x.shape
    N = token_N.numel()
    E, H = w_out_EDH.shape[0], w_out_EDH.shape[-1]
    y = launchers.alloc(T, D, device=x.device, dtype=x.dtype)
    if N == 0 or T == 0:  # sizes, not data: no kernel has rows to read
        return y.zero_()
    cfgs = config.decode_configs(x.dtype, x.device, N, E, D, H, config.configs_from_ints(configs))
    prec = launchers.precision(x.dtype)
    a = launchers.alloc(N, H, device=x.device, dtype=x.dtype)
    # The weights are read through their strides: a transposed layout (some Hugging Face
    # experts) is not copied on every call, which would read and write every expert's weights.
    launchers.launch_decode_glu(x, token_N, w_in_EHD, a, counts_E, N, D, H, cfgs["decode_glu"], prec)
    o = launchers.alloc(N, D, device=x.device, dtype=torch.float32)
    launchers.launch_decode_down(a, w_out_EDH, weight_N, o, counts_E, N, H, D, cfgs["decode_down"], prec)
    launchers.launch_decode_combine(o, token_N, y, N, D)
    return y


@moe_glu_decode_forward.register_fake
def _(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, configs=None):
    return x_TD.new_empty(x_TD.shape)


def _decode_backward(ctx, gy):
    raise RuntimeError("gatedmoe::moe_glu_decode is inference-only (it keeps no activations); with gradients "
                       "enabled the triton backend runs moe_glu_forward, or pass TritonOptions(decode=False)")


moe_glu_decode_forward.register_autograd(_decode_backward, setup_context=lambda ctx, inputs, output: None)


def moe_glu_decode(
    x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor, w_out_EDH: Tensor,
    options: TritonOptions | None = None,
) -> Tensor:
    """The decode path: ``y_TD`` of the SwiGLU MoE for a few rows per expert, inference only.

    ``y[t] = sum_{n: token[n] = t} weight[n] * W_out[e_n] (silu(Wg[e_n] x_t) * (Wu[e_n] x_t))``
    over the expert-sorted assignments (``counts_E`` rows per expert), in three launches
    (`kernels.decode_glu_kernel`, `decode_down_kernel`, `decode_combine_kernel`) whose grids
    depend on T, N, E, D and H only: no host synchronisation, so a decode step can be
    captured in a CUDA graph; the per-token sum is deterministic (float32, rounded once).
    The custom op while torch.compile traces, the same code called directly in eager mode.

    ``options`` (default ``TritonOptions()``): only its kernel config overrides
    ("decode_glu", "decode_down") are read.

    Examples
    --------
    >>> with torch.no_grad():  # doctest: +SKIP
    ...     y_TD = moe_glu_decode(x_TD, routing.token, routing.weight, routing.counts, w_in, w_out)
    """
    configs = config.configs_to_ints(options.configs if options is not None else None) or None
    if torch.compiler.is_compiling():
        return moe_glu_decode_forward(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, configs)
    return _decode_impl(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, configs)
