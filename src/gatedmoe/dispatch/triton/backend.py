"""`triton_dispatch`: the "triton" dispatch backend, with its fallback to the grouped
backend (logged once per reason) where the fused kernels do not apply.

Shape legend: T tokens, D model dim, N routed assignments, E experts.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from torch import Tensor

from gatedmoe.dispatch.grouped import grouped_dispatch
from gatedmoe.dispatch.options import TritonOptions
from gatedmoe.dispatch.triton.config import use_decode
from gatedmoe.dispatch.triton.ops import moe_glu, moe_glu_decode
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.routing import Routing

__all__ = ["triton_dispatch"]

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


def triton_dispatch(
    x_TD: Tensor, routing: Routing, experts: ExpertBank, options: TritonOptions | None = None
) -> Tensor:
    """Same contract as `gatedmoe.dispatch.reference.reference_dispatch`, fused kernels.

    ``options`` (default ``TritonOptions()``): scatter precision, kernel config overrides and
    the decode path's choice; unused when the call falls back to the grouped backend.

    Calls that need no gradient and are small (`config.use_decode`: at most
    `config.DECODE_MAX_TOKENS` tokens, at most `config.DECODE_MAX_ROWS_PER_EXPERT` rows per
    routed expert, experts narrower than `config.DECODE_MAX_EXPERT_ELEMENTS` or too few hit for
    the large-batch kernels to fill the GPU) run the decode path (`ops.moe_glu_decode`), unless ``options.decode`` says
    otherwise; the others run `ops.moe_glu`. Unmerged LoRA adapters of the bank
    (`ExpertBank.add_lora`) run fused into the kernels (`lora_ops.moe_glu_lora`, any size).
    With ``options.fp8`` the expert GEMMs run in FP8 (`fp8_ops.moe_glu_fp8`); a call the
    fused kernels cannot take then raises ValueError instead of falling back.

    Examples
    --------
    >>> y_TD = triton_dispatch(x_TD, routing, experts, options=TritonOptions(fp32_scatter=True))  # doctest: +SKIP
    """
    fp8 = options.fp8 if options is not None else None
    reason = _unsupported(x_TD, experts)
    if reason is not None and fp8 is not None:
        raise ValueError(f"TritonOptions(fp8=...) runs on the fused Triton kernels only, which do not support {reason}; "
                         f"drop the fp8 option to use the grouped backend")
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            log.warning("triton dispatch: %s not supported; using the grouped backend", reason)
        return grouped_dispatch(x_TD, routing, experts)
    if fp8 is not None:
        if x_TD.is_cuda and "fp8-experimental" not in _warned:
            _warned.add("fp8-experimental")
            warnings.warn(
                "TritonOptions(fp8=...) is experimental: on an H200 (Triton 3.6) it is no faster than bf16 "
                "(rowwise 0.95-1.06x, blockwise 0.91-0.95x, before the per-step weight quantisation), and seven "
                "2,000-step training runs per arm cannot tell its loss from bf16's (dispatch/triton/README.md, 'FP8')",
                UserWarning,
                stacklevel=2,
            )
        # The parameters themselves, not casts: their FP8 copies are cached on them per step.
        from gatedmoe.dispatch.triton.fp8_ops import moe_glu_fp8

        return moe_glu_fp8(x_TD, routing.token, routing.weight, routing.counts, experts.w_in, experts.w_out, fp8,
                           options.fp32_scatter, options.configs)
    dtype = x_TD.dtype
    w_in, w_out = experts.w_in.to(dtype), experts.w_out.to(dtype)
    lora = experts.active_lora
    if lora is not None:
        # Unmerged adapters: their products fused into the kernels (`lora_ops`; no decode path).
        from gatedmoe.dispatch.triton.lora_ops import moe_glu_lora

        adapters = [t.to(dtype) for t in (lora.A_in, lora.B_in, lora.A_out, lora.B_out)]
        need_h = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, routing.weight, w_in, w_out, *adapters))
        return moe_glu_lora(x_TD, routing.token, routing.weight, routing.counts, w_in, w_out, *adapters, lora.scale,
                            need_h, options)
    # Without autograd (inference) the first GEMM's output need not be kept for backward.
    need_h = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, routing.weight, w_in, w_out))
    if not need_h and _decode(x_TD.shape[0], routing.token.numel(), routing.counts.numel(), *w_out.shape[1:], options):
        return moe_glu_decode(x_TD, routing.token, routing.weight, routing.counts, w_in, w_out, options)
    y, _ = moe_glu(x_TD, routing.token, routing.weight, routing.counts, w_in, w_out, need_h, options)
    return y


def _decode(T: int, N: int, E: int, D: int, H: int, options: TritonOptions | None) -> bool:
    """Whether an inference call takes the decode path: ``options.decode`` if set, else by
    size (`config.use_decode`; sizes only, so a captured step always takes the same path)."""
    choice = options.decode if options is not None else None
    return use_decode(T, N, E, D, H) if choice is None else choice
