"""`ZeroComputeMoE`: some experts are the identity, so a token routed to one costs no
compute (the zero-computation experts of LongCat-Flash: Meituan LongCat Team 2025,
"LongCat-Flash Technical Report", arXiv:2509.01322, section 2.1; transformers
``models/longcat_flash/modeling_longcat_flash.py``, ``LongcatFlashExperts``).

Formula: with ``E = E_f + Z`` experts, the first ``E_f`` feed-forward experts ``f_e`` of
the `ExpertBank` and the last ``Z`` identity experts,
``y_t = sum_{e in topk(t), e < E_f} g_te f_e(x_t) + (sum_{e in topk(t), e >= E_f} g_te) x_t
[+ shared(x_t)]``. The gate routes over all E experts, so a token's compute (how many of
its k choices are feed-forward experts) varies with the token.

Shape legend: T tokens, D model dim, E experts, N routed assignments.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gatedmoe.dispatch import get_backend
from gatedmoe.layers.config import MoEConfig
from gatedmoe.layers.moe import MoE, _check_dispatch_args
from gatedmoe.routing import Routing

__all__ = ["ZeroComputeMoE"]


class ZeroComputeMoE(MoE):
    """`gatedmoe.MoE` whose last ``n_zero_experts`` experts return their input (LongCat-Flash).

    Same parameters as `MoE` (``from_config`` too), plus ``n_zero_experts`` (Z, an int in
    ``[0, n_experts)``): the gate routes over ``n_experts`` experts, the `ExpertBank` holds
    the first ``n_experts - Z`` and expert ``e >= n_experts - Z`` computes ``f_e(x) = x``.
    Only the `dispatch` seam differs: the routing (sorted by expert) splits into the
    assignments of the bank's experts, run through the layer's backend as usual, and those
    of the identity experts, whose weighted inputs ``g x`` are added to the tokens' outputs
    in float32 (float64 for float64 inputs) and rounded once. The gradient of ``g`` flows
    through both parts.

    Examples
    --------
    >>> import torch
    >>> layer = ZeroComputeMoE(8, 6, 16, n_zero_experts=2, k=2)
    >>> layer.experts.n_experts, layer(torch.randn(2, 3, 8)).shape
    (4, torch.Size([2, 3, 8]))
    """

    def __init__(self, d_model: int, n_experts: int, d_hidden: int, *, n_zero_experts: int, **settings: Any) -> None:
        if isinstance(n_zero_experts, bool) or not isinstance(n_zero_experts, int) or not 0 <= n_zero_experts < n_experts:
            raise ValueError(f"n_zero_experts must be an int in [0, n_experts={n_experts}), got {n_zero_experts!r}")
        # Read by `_bank_size` while MoE.__init__ builds the parts.
        self.n_zero_experts = n_zero_experts
        super().__init__(d_model, n_experts, d_hidden, **settings)

    def _bank_size(self, config: MoEConfig) -> tuple[int, int]:
        return config.n_experts - self.n_zero_experts, config.d_model

    def dispatch(self, x_TD: Tensor, routing: Routing) -> Tensor:
        _check_dispatch_args(x_TD, routing, self.d_model, type(self).__name__)
        E_f = self.experts.n_experts
        # Sorted by expert: the bank's assignments come first, the identity experts' after.
        n_f = int(routing.counts[:E_f].sum())
        computed = Routing(
            token=routing.token[:n_f],
            expert=routing.expert[:n_f],
            weight=routing.weight[:n_f],
            counts=routing.counts[:E_f],
            n_tokens=routing.n_tokens,
        )
        backend = get_backend(self.backend, x_TD.device)
        y_TD = backend(x_TD, computed, self.experts, options=self.backend_options)
        if n_f == routing.token.numel():
            return y_TD
        dtype = x_TD.dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        token_Z = routing.token[n_f:]
        scaled_ZD = x_TD.index_select(0, token_Z).to(acc) * routing.weight[n_f:].to(acc).unsqueeze(-1)
        return y_TD.to(acc).index_add(0, token_Z, scaled_ZD).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_zero_experts={self.n_zero_experts}"
