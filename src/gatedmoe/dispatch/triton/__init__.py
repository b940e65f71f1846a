"""Fused Triton backend ("triton"): the row gather inside the first GEMM's loads (or one
copy read through TMA, for wide experts), SwiGLU in its epilogue, routing weight and
scatter-add in the second GEMM's epilogue; backward: a gathered GEMM, one elementwise pass
for the SwiGLU derivative and the routing-weight gradient, a GEMM with the scatter-add of
dL/dx in its epilogue, and grouped GEMMs for the weight gradients (for narrow experts the
W_out gradient is a Triton kernel reading gy by token, with no gathered copy).

The scatter-adds accumulate in the input dtype (as the grouped backend's ``index_add``
does); `set_fp32_scatter` makes them accumulate in float32, a little more accurate and
slower where tokens pick many experts.

Eager calls go through `ops.moe_glu` (an autograd.Function, or the bare forward with
gradients off); torch.compile sees the custom ops `gatedmoe::moe_glu_forward` /
`moe_glu_backward`. The backward frees h as it goes, so a second backward through a retained
graph raises.

Covers SwiGLU experts without biases in bf16/fp16/fp32; anything else falls back to the
grouped backend (logged once). `gatedmoe.dispatch.reference.reference_dispatch` is its oracle.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from gatedmoe.dispatch.grouped import grouped_dispatch
from gatedmoe.dispatch.triton import interpret_compat
from gatedmoe.dispatch.triton.ops import (
    fp32_scatter,
    moe_glu,
    moe_glu_forward,
    set_fp32_scatter,
    tile_schedule,
)
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.routing import Routing

interpret_compat.apply()

__all__ = ["triton_dispatch", "moe_glu", "moe_glu_forward", "tile_schedule", "set_fp32_scatter", "fp32_scatter"]

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _unsupported(x_TD: Tensor, experts: ExpertBank) -> str | None:
    if x_TD.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"device {x_TD.device.type} (Triton kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
    if experts.act.name != "swiglu":
        return f"activation {experts.act.name!r} (the Triton backend fuses swiglu only)"
    if experts.has_bias:
        return "expert biases"
    if x_TD.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {x_TD.dtype}"
    return None


def triton_dispatch(x_TD: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
    """Same contract as `gatedmoe.dispatch.reference.reference_dispatch`, fused kernels."""
    reason = _unsupported(x_TD, experts)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            log.warning("triton dispatch: %s not supported; using the grouped backend", reason)
        return grouped_dispatch(x_TD, routing, experts)
    dtype = x_TD.dtype
    w_in, w_out = experts.w_in.to(dtype), experts.w_out.to(dtype)
    # Without autograd (inference) the first GEMM's output need not be kept for backward.
    need_h = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, routing.weight, w_in, w_out))
    y, _ = moe_glu(x_TD, routing.token, routing.weight, routing.counts, w_in, w_out, need_h)
    return y
