"""`Routing`: the one data type between gates, losses, analysis and dispatch.

A routing is a list of assignments ``(token, expert, weight)`` sorted by expert, plus the
per-expert counts a grouped GEMM needs and, optionally, the gate's full distribution.

Shape legend: T tokens, E experts, K assignments per token, N routed assignments.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["Routing"]


@dataclass(frozen=True, eq=False)
class Routing:
    """Assignments of tokens to experts, sorted by expert.

    Attributes
    ----------
    token : Tensor, int64 ``[N]``
        Input row read by each assignment.
    expert : Tensor, int64 ``[N]``, non-decreasing
        Expert of each assignment.
    weight : Tensor, float ``[N]``
        Combine weight of each assignment (carries the gate's gradient).
    counts : Tensor, int64 ``[E]``
        Assignments per expert; ``counts.sum() == N``.
    n_tokens : int
        T, the number of input rows.
    probs : Tensor ``[T, E]`` or None
        The gate's full distribution over experts, for losses and analysis.
    logits : Tensor ``[T, E]`` or None
        The gate's raw scores, for the router z-loss.
    n_dropped : int
        Assignments removed by :meth:`drop_over_capacity` (0 if none was applied).
    before_capacity : Routing or None
        The routing as the gate chose it, before :meth:`drop_over_capacity` (None when no
        capacity was applied). Load-balancing losses count these assignments by default,
        as the Switch paper does (`gatedmoe.losses.expert_fractions`).
    lse : Tensor ``[T]`` or None
        ``logsumexp`` of ``logits`` over the experts, where the gate computed it anyway
        (`gatedmoe.gates.fused_topk`); the router z-loss reads it instead of recomputing.

    Build one with :meth:`from_topk` (token choice) or :meth:`from_assignments` (any list
    of pairs, e.g. expert choice or a variable number of experts per token).

    Examples
    --------
    >>> import torch
    >>> r = Routing.from_topk(torch.tensor([[0.7, 0.3]]), torch.tensor([[2, 0]]), n_experts=3)
    >>> r.expert.tolist(), r.weight.tolist(), r.counts.tolist()
    ([0, 2], [0.30000001192092896, 0.699999988079071], [1, 0, 1])
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    counts: Tensor
    n_tokens: int
    probs: Tensor | None = None
    logits: Tensor | None = None
    n_dropped: int = 0
    before_capacity: Routing | None = None
    lse: Tensor | None = None

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_topk(
        cls,
        weights_TK: Tensor,
        experts_TK: Tensor,
        n_experts: int,
        probs: Tensor | None = None,
        logits: Tensor | None = None,
        *,
        trusted_ids: bool = False,
    ) -> Routing:
        """Routing from token-choice top-k: ``weights_TK[t, j]`` for expert ``experts_TK[t, j]``.

        Within one expert, assignments keep token order (stable sort), which is the
        "position" priority of :meth:`drop_over_capacity`.

        Two paths give the same routing, bit for bit. CUDA tensors within the kernels' limits
        (`gatedmoe.gates.topk_sort.sort_topk_applies`: int32/int64 ids, Triton importable,
        E <= 4096, 1 <= K <= 16, not while torch.compile traces) are sorted by `gatedmoe.gates.topk_sort.sort_topk`,
        a counting sort in one or three Triton launches. Everything else, the CPU included,
        takes the plain path of :meth:`from_assignments` (a stable argsort), the reference.
        Expert ids out of range are a ValueError on the CPU; on CUDA neither path reads ids
        on the host, and both fail with a device-side error (the kernels' assertion, the plain
        path's index error). ``trusted_ids=True`` is for callers whose ids lie in range by
        construction (the gates' ``torch.topk`` over E scores): the kernels' path leaves out
        its device-side check (one launch per call); the CPU's check stays (it is free).
        """
        _check_tensor("weights_TK", weights_TK, floating=True)
        _check_tensor("experts_TK", experts_TK, floating=False)
        if weights_TK.dim() != 2 or experts_TK.shape != weights_TK.shape:
            raise ValueError(
                "weights_TK and experts_TK must both have shape [T, K]; got "
                f"{tuple(weights_TK.shape)} and {tuple(experts_TK.shape)}"
            )
        T, K = weights_TK.shape
        if weights_TK.is_cuda and not torch.compiler.is_compiling():
            # Imported here: the gates import this module.
            from gatedmoe.gates.topk_sort import sort_topk, sort_topk_applies

            if sort_topk_applies(weights_TK, experts_TK, n_experts):
                # The plain path checks these in `from_assignments`.
                _check_sizes(n_experts, T, probs, logits)
                token, expert, weight, counts = sort_topk(weights_TK, experts_TK, n_experts, trusted_ids=trusted_ids)
                return cls(token=token, expert=expert, weight=weight, counts=counts, n_tokens=T, probs=probs,
                           logits=logits)
        # No token ids: assignment i belongs to token i // K (see ``_per_token``).
        return cls.from_assignments(
            None,
            experts_TK.reshape(-1),
            weights_TK.reshape(-1),
            n_experts=n_experts,
            n_tokens=T,
            probs=probs,
            logits=logits,
            _per_token=K,
        )

    @classmethod
    def from_assignments(
        cls,
        token: Tensor,
        expert: Tensor,
        weight: Tensor,
        n_experts: int,
        n_tokens: int,
        probs: Tensor | None = None,
        logits: Tensor | None = None,
        *,
        _per_token: int | None = None,
    ) -> Routing:
        """Routing from unsorted assignment triples ``[N]``; sorts them stably by expert.

        ``token`` and ``expert`` are integer tensors, ``weight`` a floating one; ``n_experts``
        an int >= 1, ``n_tokens`` an int >= 0; ``probs``/``logits`` None or ``[n_tokens,
        n_experts]``. Ids out of range are a ValueError (checked on the CPU, where it is free).
        """
        _check_sizes(n_experts, n_tokens, probs, logits)
        # ``_per_token=K`` (from `from_topk`): ``token`` is None and assignment i belongs to
        # token i // K, in range by construction; the sorted ids are then ``order // K``,
        # the same values as gathering them from ``arange(T)`` repeated K times.
        if _per_token is None:
            _check_tensor("token", token, floating=False)
        _check_tensor("expert", expert, floating=False)
        _check_tensor("weight", weight, floating=True)
        token_shape = token.shape if _per_token is None else expert.shape
        if not (token_shape == expert.shape == weight.shape) or expert.dim() != 1:
            raise ValueError(
                "token, expert and weight must be 1-D of equal length; got "
                f"{tuple(token_shape)}, {tuple(expert.shape)}, {tuple(weight.shape)}"
            )
        expert = expert.long()
        # The range check reads values on the host: free on CPU, a device sync on a GPU, so
        # on accelerators it is left to `validate()` (an out-of-range id there still fails
        # loudly, as a device-side index error in the count below).
        host_check = expert.device.type == "cpu" and expert.numel() and not torch.compiler.is_compiling()
        # One min-max reduction per id tensor (none for `from_topk`'s implicit token ids).
        if host_check:
            lo, hi = torch.aminmax(expert)
            if int(lo) < 0 or int(hi) >= n_experts:
                raise ValueError(f"expert ids must lie in [0, {n_experts}); got {lo}..{hi}")
        if host_check and _per_token is None:
            lo, hi = torch.aminmax(token)
            if int(lo) < 0 or int(hi) >= n_tokens:
                raise ValueError(f"token ids must lie in [0, n_tokens={n_tokens}); got {lo}..{hi}")
        # A radix sort makes one pass per key byte: the narrowest integer type that holds the
        # expert ids gives the same (stable) order in fewer passes.
        key = expert.to(torch.int16 if n_experts <= torch.iinfo(torch.int16).max else torch.int32)
        order = torch.argsort(key, stable=True)
        expert_sorted = expert.index_select(0, order)
        # scatter_add, not bincount: bincount's output size depends on the data, which costs
        # a device sync on every routing.
        counts = torch.zeros(n_experts, dtype=torch.long, device=expert.device).scatter_add_(
            0, expert_sorted, torch.ones_like(expert_sorted)
        )
        if _per_token is None:
            token_sorted = token.long().index_select(0, order)
        else:
            # K = 0 leaves no assignments (and nothing to divide).
            token_sorted = order.div(_per_token, rounding_mode="floor") if _per_token else order
        return cls(
            token=token_sorted,
            expert=expert_sorted,
            weight=weight.index_select(0, order),
            counts=counts,
            n_tokens=int(n_tokens),
            probs=probs,
            logits=logits,
        )

    # ------------------------------------------------------------------ derived
    @property
    def n_experts(self) -> int:
        """E, the number of experts."""
        return int(self.counts.numel())

    @property
    def n_assignments(self) -> int:
        """N, the number of routed assignments."""
        return int(self.token.numel())

    @property
    def offsets(self) -> Tensor:
        """Running end of each expert's block, ``[E]`` (what a grouped GEMM takes)."""
        return torch.cumsum(self.counts, 0)

    def combine_matrix(self) -> Tensor:
        """Dense ``[T, E]`` matrix of combine weights (zeros where not routed)."""
        out = torch.zeros(self.n_tokens, self.n_experts, dtype=self.weight.dtype, device=self.weight.device)
        return out.index_put((self.token, self.expert), self.weight, accumulate=True)

    @property
    def routed(self) -> Routing:
        """The assignments the gate chose: `before_capacity` if a capacity dropped some,
        else ``self``."""
        return self if self.before_capacity is None else self.before_capacity

    def per_assignment(self, dtype: torch.dtype) -> Routing:
        """Each assignment as its own row, weight 1 in ``dtype``: row n goes to ``expert[n]``
        (``n_tokens`` = N). For layers that hand a backend rows already gathered (and
        scaled) in this routing's order and combine its outputs themselves."""
        N, device = self.token.numel(), self.token.device
        return Routing(token=torch.arange(N, device=device), expert=self.expert,
                       weight=torch.ones(N, dtype=dtype, device=device), counts=self.counts, n_tokens=N)

    def experts_per_token(self) -> Tensor:
        """Number of assignments each token received, ``[T]`` int64 (0 for dropped tokens)."""
        return torch.bincount(self.token, minlength=self.n_tokens)

    # ------------------------------------------------------------------ transforms
    def drop_over_capacity(self, capacity: int, priority: str = "position") -> Routing:
        """Keep at most ``capacity`` assignments per expert (Switch Transformer semantics).

        Assignments over an expert's capacity are dropped: they contribute nothing, so in a
        residual block the token passes through unchanged. Kept weights are not renormalised.

        Parameters
        ----------
        capacity : int
            Slots per expert, >= 1. Switch Transformers use
            ``ceil(capacity_factor * T * K / E)``.
        priority : {"position", "score"}
            "position": earlier tokens first (Fedus et al. 2021). "score": higher combine
            weight first (batch prioritized routing, Riquelme et al. 2021).

        Returns
        -------
        Routing
            With ``n_dropped`` increased by the number of assignments removed.
        """
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if priority not in ("position", "score"):
            raise ValueError(f"priority must be 'position' or 'score', got {priority!r}")
        N = self.n_assignments
        if N == 0:
            return self
        device = self.token.device
        if priority == "position":
            # Sort key expert-major, token-minor; ties (same token twice) keep order.
            key = self.expert * (self.n_tokens + 1) + self.token
        else:
            # Rank of each weight within the whole list, descending, as the minor key.
            rank = torch.empty(N, dtype=torch.long, device=device)
            rank[torch.argsort(self.weight.detach(), descending=True, stable=True)] = torch.arange(N, device=device)
            key = self.expert * (N + 1) + rank
        order = torch.argsort(key, stable=True)
        starts = self.offsets - self.counts
        slot = torch.arange(N, device=device) - starts[self.expert]
        keep = slot < capacity
        idx = order[keep]
        kept = replace(
            self,
            token=self.token[idx],
            expert=self.expert[idx],
            weight=self.weight[idx],
            counts=torch.clamp(self.counts, max=capacity),
            n_dropped=self.n_dropped + int(N - int(keep.sum())),
            before_capacity=self.routed,
        )
        return kept

    def to(self, device: torch.device | str) -> Routing:
        """Copy every tensor to ``device``."""

        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            token=self.token.to(device),
            expert=self.expert.to(device),
            weight=self.weight.to(device),
            counts=self.counts.to(device),
            probs=mv(self.probs),
            logits=mv(self.logits),
            lse=mv(self.lse),
            before_capacity=None if self.before_capacity is None else self.before_capacity.to(device),
        )

    # ------------------------------------------------------------------ checks
    def validate(self) -> Routing:
        """Check every invariant; raise ``ValueError`` naming the first broken one.

        Returns ``self`` so it can be chained.
        """
        N = self.token.numel()
        for name in ("token", "expert", "weight"):
            t = getattr(self, name)
            if t.dim() != 1 or t.numel() != N:
                raise ValueError(f"Routing.{name} must be 1-D of length N={N}, got {tuple(t.shape)}")
        if self.token.dtype != torch.int64 or self.expert.dtype != torch.int64:
            raise ValueError("Routing.token and Routing.expert must be int64")
        if not self.weight.is_floating_point():
            raise ValueError(f"Routing.weight must be floating point, got {self.weight.dtype}")
        if self.counts.dim() != 1 or self.counts.numel() < 1:
            raise ValueError(f"Routing.counts must be 1-D [E] with E >= 1, got {tuple(self.counts.shape)}")
        E = self.counts.numel()
        if int(self.counts.sum()) != N:
            raise ValueError(f"Routing.counts sums to {int(self.counts.sum())}, expected N={N}")
        if N:
            if bool((self.expert[1:] < self.expert[:-1]).any()):
                raise ValueError("Routing.expert must be non-decreasing (sorted by expert)")
            if not torch.equal(torch.bincount(self.expert, minlength=E), self.counts):
                raise ValueError("Routing.counts disagrees with Routing.expert")
            if int(self.token.min()) < 0 or int(self.token.max()) >= self.n_tokens:
                raise ValueError(f"Routing.token must lie in [0, n_tokens={self.n_tokens})")
            if not bool(torch.isfinite(self.weight).all()):
                raise ValueError("Routing.weight has NaN or inf")
        for name in ("probs", "logits"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (self.n_tokens, E):
                raise ValueError(f"Routing.{name} must have shape [T, E]=({self.n_tokens}, {E}), got {tuple(t.shape)}")
        if self.lse is not None and tuple(self.lse.shape) != (self.n_tokens,):
            raise ValueError(f"Routing.lse must have shape [T]=({self.n_tokens},), got {tuple(self.lse.shape)}")
        if self.n_dropped < 0:
            raise ValueError(f"Routing.n_dropped must be >= 0, got {self.n_dropped}")
        return self

    def __repr__(self) -> str:
        return (
            f"Routing(n_tokens={self.n_tokens}, n_experts={self.n_experts}, "
            f"n_assignments={self.n_assignments}, n_dropped={self.n_dropped}, "
            f"counts={self.counts.tolist() if self.n_experts <= 16 else '...'})"
        )


def _check_sizes(n_experts: int, n_tokens: int, probs: Tensor | None, logits: Tensor | None) -> None:
    """ValueError unless ``n_experts`` >= 1, ``n_tokens`` >= 0 and probs/logits are None or
    ``[n_tokens, n_experts]``."""
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
    # A SymInt under torch.compile with dynamic shapes.
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, torch.SymInt)) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
    for name, t in (("probs", probs), ("logits", logits)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (n_tokens, n_experts)):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be None or a tensor [n_tokens, n_experts]=({n_tokens}, {n_experts}), got {got}")


def _check_tensor(name: str, t: object, *, floating: bool) -> None:
    """TypeError unless ``t`` is a tensor of the right kind (floating, or integer)."""
    kind = "a floating-point" if floating else "an integer"
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be {kind} torch.Tensor, got {type(t).__name__}")
    ok = t.is_floating_point() if floating else not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    if not ok:
        raise TypeError(f"{name} must be {kind} tensor, got dtype {t.dtype}")
