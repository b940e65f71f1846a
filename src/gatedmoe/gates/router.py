"""The linear router ``logits = x W^T`` in float32, and its tensor-core fast path.

Shape legend: T tokens, D model dim, E experts.

Router math runs in float32 whatever the input dtype: top-k choices are sensitive to the
logits' rounding. For 16-bit inputs on CUDA, `router_logits` multiplies the 16-bit
operands on the tensor cores with float32 accumulation and a float32 result
(``torch.mm(..., out_dtype=torch.float32)``) instead of upcasting ``x`` to float32 and
running a float32 GEMM: with 16-bit inputs both compute the same exact products and differ
only in summation order, while the upcast costs a float32 copy of ``x`` and a GEMM at the
float32 rate (fine-grained shape, T=16384 D=2048 E=256 on an H200: see the kernels'
README for the measured times and top-k agreement). `router_logits_reference` is the plain
float32 form, the oracle in tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gatedmoe.autocast import outside_autocast

__all__ = ["router_logits", "router_logits_reference"]

_TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)


def router_logits_reference(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """``x W^T`` computed in float32, ``[T, E]`` float32."""
    return F.linear(x_TD.float(), weight_ED.float())


def _mixed_logits(x_TD: Tensor, w_ED: Tensor) -> Tensor:
    """``x W^T`` of 16-bit operands (w already in x's dtype), float32 accumulation and output."""
    return torch.mm(x_TD, w_ED.t(), out_dtype=torch.float32)


class _MixedRouterMatmul(torch.autograd.Function):
    """16-bit operands, float32 accumulation and output; gradients in the operands' dtypes."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_ED: Tensor) -> Tensor:
        w_ED = weight_ED.to(x_TD.dtype)
        ctx.save_for_backward(x_TD, w_ED)
        ctx.weight_dtype = weight_ED.dtype
        return _mixed_logits(x_TD, w_ED)

    @staticmethod
    def backward(ctx, g_TE: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_TD, w_ED = ctx.saved_tensors
        g16_TE = g_TE.to(x_TD.dtype)
        gx = torch.mm(g16_TE, w_ED) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = torch.mm(g16_TE.t(), x_TD, out_dtype=torch.float32).to(ctx.weight_dtype)
        return gx, gw


def router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """``x W^T`` as float32 ``[T, E]``: on the tensor cores for 16-bit ``x`` on CUDA (the
    weight rounded to ``x``'s dtype, float32 accumulation), else `router_logits_reference`.
    Under ``torch.autocast`` x is first rounded to autocast's dtype (what a linear layer
    would multiply) and the logits stay float32.

    Examples
    --------
    >>> import torch
    >>> router_logits(torch.ones(2, 3), torch.ones(4, 3)).shape
    torch.Size([2, 4])
    """
    if torch.is_autocast_enabled(x_TD.device.type):
        # An autocast linear would round the logits to 16 bits.
        return outside_autocast(router_logits, x_TD, weight_ED)
    if x_TD.is_cuda and x_TD.dtype in _TENSOR_CORE_DTYPES and x_TD.dim() == 2:
        if torch.is_grad_enabled() and (x_TD.requires_grad or weight_ED.requires_grad):
            return _MixedRouterMatmul.apply(x_TD, weight_ED)
        # Inference: the same product without the autograd Function's host cost.
        return _mixed_logits(x_TD, weight_ED.to(x_TD.dtype))
    return router_logits_reference(x_TD, weight_ED)
