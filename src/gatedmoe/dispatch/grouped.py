"""Grouped-GEMM dispatch: gather rows in expert order, one ``torch._grouped_mm`` per weight,
weighted scatter-add. Portable (CPU and CUDA); `reference.py` is its oracle.

Shape legend: T tokens, D model dim, H expert hidden (H' = 2H for GLU), E experts,
N routed assignments.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from gatedmoe.experts.bank import ExpertBank
from gatedmoe.routing import Routing

__all__ = ["grouped_dispatch", "grouped_mm", "grouped_mm_unsupported"]

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("grouped dispatch: %s; falling back to a per-expert matmul loop", reason)


def grouped_mm_unsupported(a_ND: Tensor, b_EKM: Tensor) -> str | None:
    """Why ``torch._grouped_mm`` cannot run on these operands, or None if it can."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    return _unsupported(a_ND.dtype, a_ND.device, a_ND.shape[-1], b_EKM.shape[-2], b_EKM.shape[-1])


@functools.lru_cache(maxsize=256)
def _unsupported(dtype: torch.dtype, device: torch.device, a_k: int, b_k: int, b_m: int) -> str | None:
    # The answer depends only on these (a layer asks the same question on every call).
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch._grouped_mm does not take {dtype}"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"torch._grouped_mm on CUDA takes bfloat16 only, got {dtype}"
        if torch.cuda.get_device_capability(device) < (9, 0):
            return "torch._grouped_mm on CUDA needs compute capability >= 9.0"
    elif device.type != "cpu":
        return f"torch._grouped_mm is not known to support device {device.type}"
    size = dtype.itemsize
    # Row strides of both operands must be multiples of 16 bytes.
    if (a_k * size) % 16 or (b_m * size) % 16 or (b_k * size) % 16:
        return f"widths {a_k}x{b_m} are not 16-byte aligned for {dtype}"
    return None


def grouped_mm(a_ND: Tensor, b_EKM: Tensor, offsets_E: Tensor) -> Tensor:
    """``out[rows of group e] = a[rows of group e] @ b[e]`` for contiguous row groups.

    ``offsets_E`` holds each group's running end (int). Uses ``torch._grouped_mm`` where it
    supports the dtype, device and alignment, else a per-group loop (logged once).

    Under ``torch.compile`` the product runs as the custom op ``gatedmoe::grouped_mm``
    (same computation, opaque to the compiler, with a fake implementation and autograd
    registered): ``torch._grouped_mm``'s own fake implementation accepts bfloat16 only,
    so tracing a float32 layer through it fails ("Expected inputs of BF16 type") even where
    the eager call works, and the loop's per-group sizes are data the compiler cannot see.
    """
    if torch.compiler.is_compiling():
        return _grouped_mm_op(a_ND, b_EKM, offsets_E)
    return _grouped_mm_eager(a_ND, b_EKM, offsets_E)


def _grouped_mm_eager(a_ND: Tensor, b_EKM: Tensor, offsets_E: Tensor) -> Tensor:
    reason = grouped_mm_unsupported(a_ND, b_EKM)
    if reason is None:
        return torch._grouped_mm(a_ND, b_EKM, offs=offsets_E.to(torch.int32))
    _warn_once(reason)
    out = a_ND.new_empty(a_ND.shape[0], b_EKM.shape[-1])
    start = 0
    pieces = []
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            pieces.append(a_ND[start:end] @ b_EKM[e])
        start = end
    if not pieces:
        return out.zero_()
    return torch.cat(pieces, 0)


def _lora_product(a_NK: Tensor, A_ERK: Tensor, B_EMR: Tensor, scale: float, offsets_E: Tensor) -> Tensor:
    """``s * (a A_e^T) B_e^T`` per expert group, as two grouped products (rank R in the
    middle: the ``[M, K]`` product ``B_e A_e`` is never formed)."""
    dtype = a_NK.dtype
    z_NR = grouped_mm(a_NK, A_ERK.to(dtype).transpose(-2, -1), offsets_E)
    return scale * grouped_mm(z_NR, B_EMR.to(dtype).transpose(-2, -1), offsets_E)


def _grouped_weight_grad(a_NK: Tensor, g_NM: Tensor, offsets_E: Tensor) -> Tensor:
    """``out[e] = a[rows of group e]^T @ g[rows of group e]``, ``[E, K, M]`` (zero for an
    empty group): the gradient of `grouped_mm` with respect to ``b``."""
    if grouped_mm_unsupported(a_NK.t(), g_NM) is None and a_NK.device.type == "cpu":
        return torch._grouped_mm(a_NK.t(), g_NM, offs=offsets_E.to(torch.int32))
    out = a_NK.new_zeros(offsets_E.shape[0], a_NK.shape[-1], g_NM.shape[-1])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            out[e] = a_NK[start:end].t() @ g_NM[start:end]
        start = end
    return out


@torch.library.custom_op("gatedmoe::grouped_mm", mutates_args=())
def _grouped_mm_op(a_ND: Tensor, b_EKM: Tensor, offsets_E: Tensor) -> Tensor:
    # Contiguous rows: an upstream gradient may arrive expanded (stride 0), which
    # torch._grouped_mm refuses.
    return _grouped_mm_eager(a_ND.contiguous(), b_EKM, offsets_E).clone()


@_grouped_mm_op.register_fake
def _(a_ND: Tensor, b_EKM: Tensor, offsets_E: Tensor) -> Tensor:
    return a_ND.new_empty(a_ND.shape[0], b_EKM.shape[-1])


@torch.library.custom_op("gatedmoe::grouped_mm_weight_grad", mutates_args=())
def _grouped_weight_grad_op(a_NK: Tensor, g_NM: Tensor, offsets_E: Tensor) -> Tensor:
    return _grouped_weight_grad(a_NK.contiguous(), g_NM.contiguous(), offsets_E)


@_grouped_weight_grad_op.register_fake
def _(a_NK: Tensor, g_NM: Tensor, offsets_E: Tensor) -> Tensor:
    return a_NK.new_empty(offsets_E.shape[0], a_NK.shape[-1], g_NM.shape[-1])


def _grouped_mm_setup(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library signature)
    a_ND, b_EKM, offsets_E = inputs
    ctx.save_for_backward(a_ND, b_EKM, offsets_E)


def _grouped_mm_backward(ctx, g_NM: Tensor):  # noqa: ANN001, ANN202
    a_ND, b_EKM, offsets_E = ctx.saved_tensors
    ga = _grouped_mm_op(g_NM, b_EKM.transpose(-2, -1), offsets_E) if ctx.needs_input_grad[0] else None
    gb = _grouped_weight_grad_op(a_ND, g_NM, offsets_E) if ctx.needs_input_grad[1] else None
    return ga, gb, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_dispatch(x_TD: Tensor, routing: Routing, experts: ExpertBank, options: object = None) -> Tensor:
    """Execute ``routing`` over ``experts`` with grouped GEMMs; same contract as
    `gatedmoe.dispatch.reference.reference_dispatch`.

    Output dtype is ``x_TD.dtype``; expert weights are cast to it if they differ. Each
    token's weighted expert outputs are summed in float32 (float64 for float64 input).
    ``options`` is accepted for the shared backend signature and unused: options of another
    backend reach here when ``backend="auto"`` falls back to grouped. Unmerged LoRA adapters
    of the bank (`ExpertBank.add_lora`) run as grouped products beside each weight's.
    Options asking for FP8 (``TritonOptions(fp8=...)``) raise ValueError: this path has no
    FP8 GEMMs, and running without them silently would change what was asked for.
    """
    if getattr(options, "fp8", None) is not None:
        raise ValueError("TritonOptions(fp8=...): the grouped backend has no FP8 path (FP8 runs on the fused Triton "
                         "kernels, CUDA with compute capability >= 8.9); use backend='triton' on such a GPU, or drop "
                         "the fp8 option")
    dtype = x_TD.dtype
    # int32 once here: what torch._grouped_mm takes (each product's own cast is then a no-op).
    offsets_E = routing.offsets.to(torch.int32)
    lora = experts.active_lora
    xs_ND = x_TD.index_select(0, routing.token)
    h_NH = grouped_mm(xs_ND, experts.w_in.to(dtype).transpose(-2, -1), offsets_E)
    if lora is not None:
        h_NH = h_NH + _lora_product(xs_ND, lora.A_in, lora.B_in, lora.scale, offsets_E)
    if experts.b_in is not None:
        h_NH = h_NH + experts.b_in.to(dtype).index_select(0, routing.expert)
    a_NH = experts.act(h_NH)
    o_ND = grouped_mm(a_NH, experts.w_out.to(dtype).transpose(-2, -1), offsets_E)
    if lora is not None:
        o_ND = o_ND + _lora_product(a_NH, lora.A_out, lora.B_out, lora.scale, offsets_E)
    if experts.b_out is not None:
        o_ND = o_ND + experts.b_out.to(dtype).index_select(0, routing.expert)
    # Weight in the weights' dtype and sum each token's k outputs in float32, rounding once to
    # the input dtype: what transformers' default experts (grouped_mm: product, then a sum
    # over k in float32) compute, so a bf16 model converted from it is bit-identical.
    o_ND = o_ND * routing.weight.unsqueeze(-1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device).index_add_(0, routing.token, o_ND.to(acc))
    return y_TD.to(dtype)
