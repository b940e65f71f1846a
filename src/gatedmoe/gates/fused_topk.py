"""Token-choice top-k routing in Triton kernels, and its plain-PyTorch reference.

The unfused route of a top-k gate is a chain of PyTorch kernels: softmax (or sigmoid), top-k,
gather and renormalisation, a stable argsort of the T*K expert ids, gathers by that order, a
histogram, and a logsumexp for the router z-loss (fine-grained shape T=16384 E=256 K=8 on an
H200: ~0.96 ms, see the kernels' README). `fused_topk` computes the same `Routing` in two
steps:

1. ``route_fwd_kernel``, each program owning whole rows of the logits: scores, lse, the
   (group-limited) top-k with bias selection and renormalisation;
2. the counting sort of given top-k choices (`gatedmoe.gates.topk_sort`, one launch up to
   256 assignments, three after), which writes the sorted token, expert and weight (stable
   in token order, as `Routing.from_topk`'s stable argsort) and its inverse. Where one
   program routes every token and the sort is one block (decode sizes: T <= BT, T*K <=
   256), the routing kernel runs the sort itself (one launch instead of two).

No step reads a value on the host, so a training step stays capturable in a CUDA graph. The
backward (``route_bwd_kernel``) is one pass over ``[T, E]``. `fused_topk_reference` is the
same computation from the gates' plain functions, the oracle in tests.

Shape legend: T tokens, E experts, K experts per token, N = T*K assignments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gatedmoe.gates.functional import _group_limited_select
from gatedmoe.gates.topk_sort import (
    _MAX_E,
    _MAX_K,
    _ONE_PROGRAM_N,
    _RANK_TILE,
    _has_triton,
    _launch_sort,
    _pow2,
    _sort_buffers,
    sort_topk_reference,
)
from gatedmoe.gates.topk_sort import _WEIGHT_DTYPES as _SORT_WEIGHT_DTYPES
from gatedmoe.routing import Routing

__all__ = ["SCORES", "fused_topk", "fused_topk_applies", "fused_topk_reference"]

SCORES = ("softmax", "sigmoid")
# One program holds BT x BE float32 scores (rows by all experts, _TILE elements); beyond the
# counting sort's limits (E <= _MAX_E, k <= _MAX_K, shared with `topk_sort`) the unfused path
# is used.
_TILE = 4096


def _blocks(E: int) -> tuple[int, int]:
    BE = _pow2(E)
    return max(1, min(64, _TILE // BE)), BE


def fused_topk_applies(logits_TE: Tensor, k: int, n_group: int = 1) -> bool:
    """Whether the gates route ``logits_TE`` with `fused_topk`: float32 logits on CUDA, with
    Triton importable, E <= 4096, k <= 16, T*k < 2**31 and, with groups, E a power of two;
    not while torch.compile traces (it compiles the plain path)."""
    if not (logits_TE.is_cuda and logits_TE.dtype == torch.float32 and logits_TE.dim() == 2):
        return False
    if torch.compiler.is_compiling():  # the compiler fuses the plain path itself
        return False
    T, E = logits_TE.shape
    if E > _MAX_E or k > _MAX_K or T == 0 or T * k >= 2**31:  # the sort's int32 positions
        return False
    if n_group > 1 and E & (E - 1):
        return False
    return _has_triton()


def _empty(*shape: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Every buffer the kernels fill comes from here (tests poison it to catch unwritten entries).
    return torch.empty(*shape, device=device, dtype=dtype)


def _route(logits_TE, bias_E, k, score, normalize, scale, n_group, topk_group, mask_value, weight_dtype):
    """The forward's launches: ``(weight, probs, lse, token, expert, counts)`` and what the
    backward needs, ``(saved, weights_TK, experts_TK, pos, BT, BE)``."""
    from gatedmoe.gates import fused_topk_kernels as kn

    logits = logits_TE.contiguous()
    T, E = logits.shape
    BT, BE = _blocks(E)
    dev = logits.device
    probs = _empty(T, E, device=dev, dtype=torch.float32)
    lse = _empty(T, device=dev, dtype=torch.float32)
    weights_TK = _empty(T, k, device=dev, dtype=torch.float32)
    experts_TK = _empty(T, k, device=dev, dtype=torch.int32)
    has_bias = bias_E is not None
    bias = bias_E.detach().float().contiguous() if has_bias else lse
    code = SCORES.index(score)
    # Decode sizes (one program holds every token, the sort one block): the routing program
    # sorts too, one launch instead of two (host time, in eager decoding, mostly).
    sort_here = T <= BT and T * k <= _ONE_PROGRAM_N
    sorted_ = _sort_buffers(T, k, E, dev, weight_dtype) if sort_here else (lse,) * 6
    token, expert, weight, counts, pos, ok = sorted_
    kn.route_fwd_kernel[(-(-T // BT),)](
        logits, bias, probs, lse, weights_TK, experts_TK, counts, token, expert, weight, pos, ok,
        T, E, float(scale), float(mask_value),
        K=k, BK=_pow2(k), BT=BT, BE=BE, SCORE=code, HAS_BIAS=has_bias, NORMALIZE=normalize,
        N_GROUP=n_group, TOPK_GROUP=topk_group, SORT=sort_here, SORT_BN=_ONE_PROGRAM_N, SORT_S=_RANK_TILE,
        num_warps=4,
    )
    if not sort_here:
        # Ids are always in [0, E) (the kernel clamps a NaN row's choice), so the sort's extra
        # bucket stays empty.
        token, expert, weight, counts, pos, _ = _launch_sort(weights_TK, experts_TK, E, weight_dtype)
    outputs = (weight, probs, lse, token, expert, counts[:E])
    return outputs, (probs if code == 0 else logits, weights_TK, experts_TK, pos, BT, BE)


class _FusedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, k, score, normalize, scale, n_group, topk_group, mask_value, weight_dtype):
        outputs, (saved, weights_TK, experts_TK, pos, BT, BE) = _route(
            logits_TE, bias_E, k, score, normalize, scale, n_group, topk_group, mask_value, weight_dtype)
        weight, probs, lse, token, expert, counts = outputs
        ctx.mark_non_differentiable(token, expert, counts)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(saved, lse, weights_TK, experts_TK, pos)
        ctx.meta = (k, SCORES.index(score), normalize, float(scale), BT, BE)
        return outputs

    @staticmethod
    def backward(ctx, g_weight, g_probs, g_lse, _gt, _ge, _gc):
        from gatedmoe.gates import fused_topk_kernels as kn

        saved, lse, weights_TK, experts_TK, pos = ctx.saved_tensors
        k, code, normalize, scale, BT, BE = ctx.meta
        T, E = saved.shape
        if g_weight is None and g_probs is None and g_lse is None:
            return (None,) * 10
        g_logits = _empty(T, E, device=saved.device, dtype=torch.float32)
        dummy = lse
        kn.route_bwd_kernel[(-(-T // BT),)](
            saved, lse, weights_TK, experts_TK, pos,
            dummy if g_weight is None else g_weight.float().contiguous(),
            dummy if g_probs is None else g_probs.float().contiguous(),
            dummy if g_lse is None else g_lse.float().contiguous(),
            g_logits, T, E, scale,
            K=k, BT=BT, BE=BE, SCORE=code, NORMALIZE=normalize,
            HAS_GW=g_weight is not None, HAS_GP=g_probs is not None, HAS_GLSE=g_lse is not None, num_warps=4,
        )
        return g_logits, None, None, None, None, None, None, None, None, None


# The sort's weight dtypes, and float64: the routing kernel's float32 weights are stored cast
# to any of them (a float64 model's router weighs in float64).
_OUT_WEIGHT_DTYPES = (*_SORT_WEIGHT_DTYPES, torch.float64)


def _check_args(logits_TE, k, score, n_group, topk_group, mask_value, weight_dtype) -> None:
    if not isinstance(logits_TE, Tensor) or logits_TE.dim() != 2 or not logits_TE.is_floating_point():
        raise ValueError("logits_TE must be a floating-point tensor [T, E]")
    E = logits_TE.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, E={E}], got {k!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group or k > topk_group * (E // n_group):
        raise ValueError(f"n_group={n_group}, topk_group={topk_group} and k={k} do not fit E={E} experts")
    if mask_value not in (0.0, float("-inf")):
        raise ValueError(f"mask_value must be 0.0 or -inf, got {mask_value}")
    if weight_dtype not in _OUT_WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {_OUT_WEIGHT_DTYPES}, got {weight_dtype!r}")


def fused_topk(
    logits_TE: Tensor,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    bias_E: Tensor | None = None,
    scale: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    mask_value: float = float("-inf"),
    weight_dtype: torch.dtype = torch.float32,
) -> Routing:
    """Top-k routing of float32 ``logits_TE [T, E]`` by the Triton kernels (CUDA, or Triton's
    interpreter on the CPU with ``TRITON_INTERPRET=1``); the `Routing` of
    `fused_topk_reference` with the same arguments.

    ``score``: "softmax" (``p = softmax(l)``, `topk_softmax`) or "sigmoid" (``s = sigmoid(l)``,
    `sigmoid_topk`; ``Routing.probs`` is ``s / sum_e s``). Experts are selected by the score
    plus ``bias_E`` (selection only), within the ``topk_group`` best of ``n_group`` groups
    (`group_limited_topk`, other experts scored ``mask_value``); the kept scores are divided by
    their sum when ``normalize`` and multiplied by ``scale``. ``Routing.lse`` holds
    ``logsumexp(l)`` for the router z-loss. Ties go to the lowest expert id (the reference's
    `torch.topk` leaves their order unspecified). ``weight_dtype``: the dtype of
    ``Routing.weight`` (a floating dtype; default float32), the float32 weights rounded once as
    they are stored (a router that returns its weights in the input's dtype).
    """
    _check_args(logits_TE, k, score, n_group, topk_group, mask_value, weight_dtype)
    T, E = logits_TE.shape
    args = (logits_TE.float(), bias_E, k, score, bool(normalize), float(scale), int(n_group), int(topk_group),
            float(mask_value), weight_dtype)
    if logits_TE.requires_grad and torch.is_grad_enabled():
        weight, probs, lse, token, expert, counts = _FusedTopK.apply(*args)
    else:  # inference: the same launches without the autograd Function's host cost
        weight, probs, lse, token, expert, counts = _route(*args)[0]
    return Routing(token=token, expert=expert, weight=weight, counts=counts, n_tokens=T, probs=probs,
                   logits=logits_TE, lse=lse)


def fused_topk_reference(
    logits_TE: Tensor,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    bias_E: Tensor | None = None,
    scale: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    mask_value: float = float("-inf"),
    weight_dtype: torch.dtype = torch.float32,
) -> Routing:
    """`fused_topk` in plain PyTorch (float32): scores, top-k by `torch.topk`, a stable
    argsort by expert (`gatedmoe.gates.topk_sort.sort_topk_reference`, the plain path of
    `Routing.from_topk`) and ``torch.logsumexp``; the weights rounded to ``weight_dtype`` last."""
    _check_args(logits_TE, k, score, n_group, topk_group, mask_value, weight_dtype)
    logits = logits_TE.float()
    s_TE = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    with torch.no_grad():
        c_TE = s_TE if bias_E is None else s_TE + bias_E
        if n_group > 1:
            experts_TK = _group_limited_select(c_TE, k, n_group, topk_group, mask_value)
        else:
            experts_TK = torch.topk(c_TE, k, dim=-1).indices
    weights_TK = s_TE.gather(-1, experts_TK)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    probs = s_TE if score == "softmax" else s_TE / s_TE.sum(-1, keepdim=True)
    # The plain stable argsort, even on CUDA (where `Routing.from_topk` takes `sort_topk`).
    token, expert, weight, counts = sort_topk_reference(weights_TK * scale, experts_TK, logits.shape[1])
    return Routing(token=token, expert=expert, weight=weight.to(weight_dtype), counts=counts, n_tokens=logits.shape[0],
                   probs=probs, logits=logits_TE, lse=torch.logsumexp(logits, -1))
