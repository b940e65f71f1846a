"""Upcycling: an `MoE` built from a trained dense feed-forward block.

Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts
from Dense Checkpoints") copies the dense MLP into every expert and trains on; the
fine-grained variant (as in Qwen1.5-MoE and He et al. 2024, "Upcycling Large Language
Models into Mixture of Experts") first splits the dense hidden dimension into G segments,
each a smaller expert, and replicates the segments to reach E experts.

Step-0 equivalence. With G = 1 every expert is the dense block, so the layer's output is
``(sum of the token's combine weights) * dense(x)``: the dense output whenever the gate's
weights sum to 1 per token (top-k softmax with renormalisation, i.e. k >= 2 by default;
sigmoid with ``normalize=True``), whatever the router, so the router keeps its random
initialisation and breaks the symmetry between the copies. With G > 1, expert
``e = r * G + g`` is replica r of segment g (its ``w_out`` scaled by G); the router rows of
the G segments of one replica are equal, so a token's top-k (k a multiple of G) takes
whole replicas, every segment with total weight 1/G, and the sum is the dense output.
`upcycle` checks this on a probe batch and raises ValueError for a gate that breaks it.
``noise > 0`` perturbs every expert (``w += noise * std(w) * N(0, 1)``) to diversify the
copies; the output then differs from the dense one by that much.

Shape legend: D model dim, H dense hidden dim, E experts, G segments, R = E / G replicas.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gatedmoe.experts.activations import get_activation
from gatedmoe.layers.moe import MoE, SharedExperts

__all__ = ["upcycle", "upcycle_weights"]


def _segments(w_in_HD: Tensor, glu: bool, G: int) -> list[Tensor]:
    """Rows of ``w_in`` (``[H', D]``, GLU halves ``[gate; up]``) for each of G segments."""
    if not glu:
        return list(w_in_HD.chunk(G, 0))
    gate, up = w_in_HD.chunk(2, 0)
    return [torch.cat([a, b]) for a, b in zip(gate.chunk(G, 0), up.chunk(G, 0), strict=True)]


@torch.no_grad()
def upcycle_weights(
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    n_experts: int,
    *,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    granularity: int = 1,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    **moe_kwargs: Any,
) -> MoE:
    """An `MoE` upcycled from dense weights (module docstring).

    Parameters
    ----------
    w_in : Tensor ``[H', D]``
        Dense input projection, ``nn.Linear`` layout; H' = 2H for a GLU activation, rows
        ``[gate; up]`` (the order `ExpertBank` uses).
    w_out : Tensor ``[D, H]``
        Dense output projection.
    activation : str
        The dense block's activation (``gatedmoe.experts.activation_names()``).
    n_experts : int
        E, a multiple of ``granularity``.
    b_in, b_out : Tensor, optional
        Dense biases ``[H']`` and ``[D]`` (both or neither).
    granularity : int
        G, segments the dense hidden dim is split into (H must be divisible by G); each
        expert has hidden width H / G. Default 1: every expert a full copy.
    noise : float
        Relative std of the Gaussian noise added to each expert's weights (default 0).
    generator : torch.Generator, optional
        For the noise and the router initialisation.
    **moe_kwargs
        Other `MoE` settings (``k``, ``gate``, ``capacity_factor``, ...). ``k`` must be a
        multiple of G.

    Examples
    --------
    >>> import torch
    >>> dense = SharedExperts(8, 32)  # a SwiGLU feed-forward, D=8, H=32
    >>> moe = upcycle(dense, n_experts=8, k=2, granularity=2)
    >>> moe.experts.d_hidden, moe.n_experts
    (16, 8)
    >>> x = torch.randn(5, 8)
    >>> bool(torch.allclose(moe(x), dense(x), atol=1e-5))
    True
    """
    act = get_activation(activation)
    G = granularity
    if isinstance(G, bool) or not isinstance(G, int) or G < 1:
        raise ValueError(f"granularity must be a positive int, got {G!r}")
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise ValueError(f"noise must be a float >= 0, got {noise!r}")
    if w_in.dim() != 2 or w_out.dim() != 2 or w_in.shape[1] != w_out.shape[0]:
        raise ValueError(f"w_in [H', D] and w_out [D, H] do not match: {tuple(w_in.shape)}, {tuple(w_out.shape)}")
    D, H = w_out.shape
    if w_in.shape[0] != (2 * H if act.glu else H):
        raise ValueError(f"w_in has {w_in.shape[0]} rows; activation {activation!r} with H={H} needs {2 * H if act.glu else H}")
    if H % G:
        raise ValueError(f"the dense hidden dim H={H} is not divisible by granularity={G}")
    if n_experts % G:
        raise ValueError(f"n_experts={n_experts} is not a multiple of granularity={G}")
    if (b_in is None) != (b_out is None):
        raise ValueError("pass both b_in and b_out, or neither")
    k = moe_kwargs.get("k", 2)
    if isinstance(k, int) and k % G:
        raise ValueError(f"k={k} must be a multiple of granularity={G} (a token takes whole replicas)")
    moe = MoE(D, n_experts, H // G, activation=activation, bias=b_in is not None, **moe_kwargs)
    moe = moe.to(device=w_in.device, dtype=w_in.dtype)
    w_in_G = _segments(w_in, act.glu, G)
    w_out_G = [w * G for w in w_out.chunk(G, 1)]
    b_in_G = None if b_in is None else _segments(b_in.unsqueeze(-1), act.glu, G)
    bank = moe.experts
    for e in range(n_experts):
        g = e % G
        bank.w_in[e].copy_(w_in_G[g])
        bank.w_out[e].copy_(w_out_G[g])
        if b_in_G is not None:
            bank.b_in[e].copy_(b_in_G[g].squeeze(-1))
            bank.b_out[e].copy_(b_out)
    if noise > 0:
        for p in bank.parameters():
            if p.dim() >= 2:
                std = p[0].float().std()
                p.add_(noise * std * torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p))
    if G > 1:
        weight = getattr(moe.gate, "weight", None)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (n_experts, D):
            raise ValueError(f"granularity > 1 needs a linear router (gate.weight [E, D]); gate {moe.config.gate!r} has none")
        rows_RD = torch.randn(n_experts // G, D, generator=generator, dtype=torch.float32) * D**-0.5
        weight.copy_(rows_RD.repeat_interleave(G, 0).to(weight))
    if noise == 0:
        _check_step0(moe, w_in, w_out, b_in, b_out, act)
    return moe


def _check_step0(moe: MoE, w_in: Tensor, w_out: Tensor, b_in: Tensor | None, b_out: Tensor | None, act) -> None:
    """ValueError unless the layer reproduces the dense block on a probe batch."""
    probe = torch.randn(16, moe.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dense = nn.functional.linear(probe, w_in.double(), None if b_in is None else b_in.double())
    dense = nn.functional.linear(act(dense), w_out.double(), None if b_out is None else b_out.double())
    was_training = moe.training
    moe.eval()
    try:
        got = moe(probe.to(moe.experts.w_in.dtype)).double()
    finally:
        moe.train(was_training)
        moe.last_routing, moe.aux_losses = None, {}
    tol = 1e-3 if moe.experts.w_in.dtype in (torch.float16, torch.bfloat16) else 1e-4
    err = float((got - dense).norm() / dense.norm().clamp_min(1e-12))
    if err > tol:
        raise ValueError(
            f"gate {moe.config.gate!r} (k={moe.k}) does not reproduce the dense output at step 0 "
            f"(relative error {err:.1e}): its combine weights must sum to 1 per token (e.g. "
            "topk_softmax with k >= 2 or gate_kwargs={'renormalize': True}; sigmoid with normalize=True)"
        )


def upcycle(dense: SharedExperts, n_experts: int, **kwargs: Any) -> MoE:
    """An `MoE` upcycled from our dense feed-forward block (`SharedExperts`: ``w_in`` and
    ``w_out`` ``nn.Linear``); keywords as for `upcycle_weights`. Hugging Face dense MLPs
    (``gate_proj``/``up_proj``/``down_proj``): ``gatedmoe.interop.hf.upcycle_mlp``."""
    if not isinstance(dense, SharedExperts):
        raise TypeError(f"dense must be a gatedmoe SharedExperts block, got {type(dense).__name__}")
    return upcycle_weights(
        dense.w_in.weight, dense.w_out.weight, dense.act.name, n_experts,
        b_in=dense.w_in.bias, b_out=dense.w_out.bias, **kwargs,
    )
