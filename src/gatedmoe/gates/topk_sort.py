"""The expert-sorted routing of given top-k choices in one or three Triton kernels, and its
plain-PyTorch reference.

`Routing.from_topk` sorts T*K (weight, expert) choices stably by expert. Its plain path is a
chain of PyTorch kernels: a radix argsort (several launches), two gathers, a zeroed histogram
by scatter_add and a division for the token ids, ~20 us per call at decode sizes on an H200.
`sort_topk` is a counting sort with the same result, bit for bit. It works on blocks of
``_BN`` consecutive assignments (in (token, choice) order, whatever E and K): an assignment's
slot is its expert's base (start + earlier blocks' share, read by expert id) plus its rank
among the block's earlier assignments to that expert ([S, S] comparisons of the block's keys;
`gatedmoe.gates.topk_sort_kernels`), so a block's work does not grow with E beyond its
histogram and one prefix over the experts:

* one block (at most ``_BN`` assignments, decode sizes): one launch, one program;
* more: ``topk_hist_kernel`` (per-block histograms), ``topk_scan_kernel`` (their exclusive
  prefix over the blocks, and the counts) and ``topk_sort_kernel`` (scatter).

The fused gate (`gatedmoe.gates.fused_topk`) sorts its top-k with the same launches.

Measured on an H200 (`benchmarks/topk_sort.py`, BENCHMARKS.md "The expert sort of given
top-k"): faster than the plain path in GPU time at every size measured (E = 8-256,
T = 1-16384: 1.17-4.0x), so `Routing.from_topk` takes it wherever it applies.

Nothing is read on the host, so CUDA graphs capture it. An id outside ``[0, E)`` writes
nothing out of bounds: it is counted in an extra bucket that sorts after every expert and is
left out of ``counts`` (so ``counts.sum() < N``, which `Routing.validate` reports); on CUDA a
device-side assertion on a flag the kernels set from that bucket then stops the program, as the plain path's index error
does (left out for ``trusted_ids``, the gates' own top-k, in range by construction).

Shape legend: T tokens, E experts, K choices per token, N = T*K assignments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gatedmoe.routing import Routing

__all__ = ["sort_topk", "sort_topk_applies", "sort_topk_reference"]

# Beyond E or K the plain path is used. The fused gate (`fused_topk`) shares the limits.
_MAX_E = 4096
_MAX_K = 16
_ID_DTYPES = (torch.int32, torch.int64)
# The weight dtypes the kernels are compile-checked for (tests/gates/compile_gate_kernels.py).
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCAN_CHUNK = 1024
# The sort's blocks: _BN consecutive assignments each, ranked in [_RANK_TILE, _RANK_TILE] tiles
# (16 comparisons per thread at _WARPS = 8; not tuned further).
_BN = 256
_RANK_TILE = 64
# Up to one block one program sorts everything: one launch instead of three (decode batches;
# E=256, K=8: T <= 32). One program walking 2-4 blocks was slower than the three launches in GPU
# time, measured on an H200 (CUDA-graph replays, 2026-12-02; kernels README, "Given top-k"):
# 512 assignments 30.4-31.7 vs 22.8-23.5 us, 1,024 (GPT-OSS-20B T=256) 52.7 vs 25.4 us.
# The kernel's one-program branch sorts a single block: never more than _BN.
_ONE_PROGRAM_N = _BN
# With 4 warps ptxas spills registers at E=4096, K=16 (tests/gates/compile_gate_kernels.py).
_WARPS = 8


def sort_topk_applies(weights_TK: Tensor, experts_TK: Tensor, n_experts: int) -> bool:
    """Whether `Routing.from_topk` sorts with `sort_topk`: both tensors ``[T, K]`` on the same
    CUDA device, int32 or int64 ids, float32, bf16 or fp16 weights, Triton importable,
    1 <= E <= 4096, 1 <= K <= 16 and N < 2**31; not while torch.compile traces (it compiles
    the plain path)."""
    if not (weights_TK.is_cuda and experts_TK.device == weights_TK.device and weights_TK.dim() == 2):
        return False
    if experts_TK.dtype not in _ID_DTYPES or weights_TK.dtype not in _WEIGHT_DTYPES:
        return False
    if torch.compiler.is_compiling():  # the compiler fuses the plain path itself
        return False
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or not 1 <= n_experts <= _MAX_E:
        return False
    T, K = weights_TK.shape
    if not 1 <= K <= _MAX_K or T * K >= 2**31:
        return False
    return _has_triton()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _empty(*shape: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Every buffer the kernels fill comes from here (tests poison it to catch unwritten entries).
    return torch.empty(*shape, device=device, dtype=dtype)


def _sort_buffers(T: int, K: int, E: int, device: torch.device, weight_dtype: torch.dtype) -> tuple[Tensor, ...]:
    """The sort's outputs, unwritten: ``(token, expert, weight [N], counts [E + 1], pos [T, K],
    ok [1])``."""
    N = T * K
    return (_empty(N, device=device, dtype=torch.int64), _empty(N, device=device, dtype=torch.int64),
            _empty(N, device=device, dtype=weight_dtype), _empty(E + 1, device=device, dtype=torch.int64),
            _empty(T, K, device=device, dtype=torch.int64), _empty(1, device=device, dtype=torch.int32))


def _launch_sort(
    weights: Tensor, experts: Tensor, E: int, weight_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The counting sort's launches on contiguous ``weights, experts [T, K]``: ``(token,
    expert, weight, counts [E + 1], pos [T, K], ok [1])``, counts' entry E the bad ids (see the
    module docstring), ok int32 1 where there are none (what the id check asserts on, so the
    check is one launch). The sorted weights in ``weight_dtype`` (default: the weights'),
    rounded as they are stored. Also the second half of the fused gate (`fused_topk`), after
    its top-k, where one program does not route every token itself."""
    from gatedmoe.gates import topk_sort_kernels as kn

    T, K = weights.shape
    N, dev = T * K, weights.device
    BE = _pow2(E)
    token, expert, weight, counts, pos, ok = _sort_buffers(T, K, E, dev, weight_dtype or weights.dtype)
    tiles = dict(K=K, BN=_BN, S=_RANK_TILE, BE=BE)
    if N <= _ONE_PROGRAM_N:
        kn.topk_sort_kernel[(1,)](
            experts, weights, counts, counts, token, expert, weight, pos, ok, N, E,
            **tiles, ONE_PROGRAM=True, num_warps=_WARPS,
        )
    else:
        NB = -(-N // _BN)
        hist = _empty(NB, E + 1, device=dev, dtype=torch.int32)
        kn.topk_hist_kernel[(NB,)](experts, hist, N, E, BN=_BN, BE=BE, num_warps=_WARPS)
        prefix = _empty(NB, E + 1, device=dev, dtype=torch.int32)
        kn.topk_scan_kernel[(E + 1,)](hist, prefix, counts, ok, NB, E + 1, CH=min(_SCAN_CHUNK, _pow2(NB)), num_warps=4)
        kn.topk_sort_kernel[(NB,)](
            experts, weights, prefix, counts, token, expert, weight, pos, ok, N, E,
            **tiles, ONE_PROGRAM=False, num_warps=_WARPS,
        )
    return token, expert, weight, counts, pos, ok


def _assert_ids_in_range(ok: Tensor) -> None:
    """Ids outside [0, E) fail loudly, as the plain path's scatter_add does: a device-side
    assertion on ``ok``, which the sort's kernels set from the bad-id bucket ``counts[E]``
    (one launch, no host sync; comparing the bucket here took a second). CUDA only (the
    interpreter's tests read the bucket instead)."""
    if ok.device.type == "cuda":
        torch._assert_async(ok, "experts_TK: expert ids must lie in [0, n_experts)")


def _sort(
    weights_TK: Tensor, experts_TK: Tensor, E: int, trusted_ids: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_launch_sort` on the inputs, checked unless ``trusted_ids``: ``(token, expert, weight,
    counts [E], pos)``."""
    token, expert, weight, counts, pos, ok = _launch_sort(weights_TK.contiguous(), experts_TK.contiguous(), E)
    # Trusted ids (a torch.topk over E scores) are in range by construction: the check's
    # launch (the assertion) is left out of every routing of the gates.
    if not trusted_ids:
        _assert_ids_in_range(ok)
    return token, expert, weight, counts[:E], pos


class _SortTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights_TK, experts_TK, n_experts, trusted_ids):
        token, expert, weight, counts, pos = _sort(weights_TK, experts_TK, n_experts, trusted_ids)
        ctx.mark_non_differentiable(token, expert, counts)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(pos)
        return token, expert, weight, counts

    @staticmethod
    def backward(ctx, _g_token, _g_expert, g_weight, _g_counts):
        if g_weight is None:
            return None, None, None, None
        (pos,) = ctx.saved_tensors
        # The sort is a permutation: each choice's gradient is its sorted slot's.
        return g_weight.index_select(0, pos.reshape(-1)).reshape(pos.shape), None, None, None


def _check_args(weights_TK: Tensor, experts_TK: Tensor, n_experts: int) -> None:
    if not isinstance(weights_TK, Tensor) or weights_TK.dim() != 2 or not weights_TK.is_floating_point():
        raise ValueError("weights_TK must be a floating-point tensor [T, K]")
    if not isinstance(experts_TK, Tensor) or experts_TK.shape != weights_TK.shape or experts_TK.dtype not in _ID_DTYPES:
        raise ValueError("experts_TK must be an int32 or int64 tensor of weights_TK's shape [T, K]")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or not 1 <= n_experts <= _MAX_E:
        raise ValueError(f"n_experts must be an int in [1, {_MAX_E}], got {n_experts!r}")
    if not 1 <= weights_TK.shape[1] <= _MAX_K:
        raise ValueError(f"K must lie in [1, {_MAX_K}], got {weights_TK.shape[1]}")


def sort_topk(
    weights_TK: Tensor, experts_TK: Tensor, n_experts: int, *, trusted_ids: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort the choices ``weights_TK [T, K]`` (float, may require grad) for experts
    ``experts_TK [T, K]`` (int32 or int64) by expert, by the Triton kernels (CUDA, or Triton's
    interpreter on the CPU with ``TRITON_INTERPRET=1``).

    Returns ``(token, expert, weight, counts)``: token and expert int64 ``[N]``, weight
    ``[N]`` in weights_TK's dtype (differentiable), counts int64 ``[E]``; bit for bit those of
    `sort_topk_reference`. Within an expert, assignments keep (token, choice) order. Ids
    outside ``[0, E)`` come last, with their own values, and are not counted (see the module
    docstring); on CUDA they then stop the program with a device-side assertion, unless
    ``trusted_ids`` (default False): the caller's ids lie in ``[0, E)`` by construction (a
    ``torch.topk`` over E scores, as the gates' own), and the check's launch is left
    out. Ids a user hands in keep the check. Without gradients (weights not requiring grad,
    or grad mode off) the launches run outside the autograd Function, which saves its host
    time on every decode step.

    Examples
    --------
    >>> import torch
    >>> w, e = torch.tensor([[0.7, 0.3], [0.6, 0.4]]), torch.tensor([[2, 0], [0, 1]])
    >>> token, expert, weight, counts = sort_topk(w, e, 3)  # doctest: +SKIP
    >>> token.tolist(), expert.tolist(), counts.tolist()  # doctest: +SKIP
    ([0, 1, 1, 0], [0, 0, 1, 2], [2, 1, 1])
    """
    _check_args(weights_TK, experts_TK, n_experts)
    if weights_TK.requires_grad and torch.is_grad_enabled():
        return _SortTopK.apply(weights_TK, experts_TK, n_experts, bool(trusted_ids))
    # Inference (a decode step): the same launches without the autograd Function's host cost.
    return _sort(weights_TK, experts_TK, n_experts, bool(trusted_ids))[:4]


def sort_topk_reference(weights_TK: Tensor, experts_TK: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`sort_topk` in plain PyTorch: the stable argsort path of `Routing.from_topk`
    (`Routing.from_assignments`, which never takes the kernels)."""
    T, K = weights_TK.shape
    r = Routing.from_assignments(None, experts_TK.reshape(-1), weights_TK.reshape(-1), n_experts=n_experts,
                                 n_tokens=T, _per_token=K)
    return r.token, r.expert, r.weight, r.counts
