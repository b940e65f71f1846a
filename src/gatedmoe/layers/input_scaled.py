"""`InputScaledMoE`: the routing weight scales each expert's *input*, not its output
(Llama 4: Meta 2025, ``Llama4TextMoe`` in transformers and llama-models).

Formula: ``y_t = sum_{e in topk(t)} f_e(g_te * x_t) [+ shared(x_t)]``, where ``MoE`` computes
``sum_e g_te f_e(x_t)``. The two differ for any expert that is not positively homogeneous
(a SwiGLU expert is not: ``f(g x) != g f(x)``).

Shape legend: T tokens, D model dim, N routed assignments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gatedmoe.dispatch import get_backend
from gatedmoe.layers.moe import MoE, _check_dispatch_args
from gatedmoe.routing import Routing

__all__ = ["InputScaledMoE"]


class InputScaledMoE(MoE):
    """`gatedmoe.MoE` whose routing weights scale the experts' inputs (Llama 4).

    Same parameters as `MoE` (``from_config`` too); only the `dispatch` seam differs: each
    assignment ``(t, e, g)`` runs expert ``e`` on the row ``g * x_t`` (``g`` cast to ``x``'s
    dtype, as Llama 4 multiplies in the activations' dtype) with combine weight 1, through
    the layer's backend, and each token's outputs are summed in float32 and rounded once.
    The gradient of ``g`` flows through the scaled input.

    Examples
    --------
    >>> import torch
    >>> from gatedmoe.gates import SigmoidGate
    >>> layer = InputScaledMoE(8, 4, 16, gate=SigmoidGate(8, 4, k=1, normalize=False))
    >>> layer(torch.randn(2, 3, 8)).shape
    torch.Size([2, 3, 8])
    """

    def dispatch(self, x_TD: Tensor, routing: Routing) -> Tensor:
        _check_dispatch_args(x_TD, routing, self.d_model, type(self).__name__)
        dtype = x_TD.dtype
        xs_ND = x_TD.index_select(0, routing.token) * routing.weight.to(dtype).unsqueeze(-1)
        # One row per assignment, weight 1: the backend runs f_e(g x) and combines nothing.
        per_row = routing.per_assignment(dtype)
        backend = get_backend(self.backend, x_TD.device)
        o_ND = backend(xs_ND, per_row, self.experts, options=self.backend_options)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device).index_add(0, routing.token, o_ND.to(acc))
        return y_TD.to(dtype)
