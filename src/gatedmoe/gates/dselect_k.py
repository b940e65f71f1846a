"""DSelect-k: differentiable sparse selection by a smooth-step binary encoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.gates.base import Gate, check_k, routing_from_dense
from gatedmoe.gates.functional import binary_codes, dselect_k_weights
from gatedmoe.gates.registry import register
from gatedmoe.routing import Routing
from gatedmoe.validation import real_in

__all__ = ["DSelectKGate"]

# Keeps log() finite in the entropy regulariser (the official implementation's EPSILON).
_EPS = 1e-6


@register("dselect_k")
class DSelectKGate(Gate):
    """DSelect-k, per-example gating (Hazimeh et al. 2021, "DSelect-k: Differentiable
    Selection in the Mixture of Experts with Applications to Multi-Task Learning", sec. 3).

    Formula, with ``m = ceil(log2 E)`` and the cubic smooth-step ``S`` of width ``gamma``:
    k single-expert selectors, ``z_i = Z_i x + c_i`` in ``R^m``;
    ``r_i(e) = prod_j S(z_ij)^[bit_j(e)] (1 - S(z_ij))^[1 - bit_j(e)]``;
    weights ``w_e(x) = sum_i softmax(A x + a)_i r_i(e)``. Once every ``S(z_ij)`` reaches 0 or
    1 each selector picks exactly one expert and at most k weights are non-zero; exact
    zeros are not routed (their gradient is exactly zero too).

    Losses in ``gate_losses`` (training only), as in the official implementation:
    ``dselect_entropy = w_entropy * sum_{t,i} H(r_i)``, ``H(r) = -sum_e r_e log(r_e + 1e-6)``,
    which pushes selectors to binary choices; and, when E is not a power of two,
    ``dselect_reachable = sum_{t,i} (1 / sum_e r_i(e) - 1)`` which keeps mass off the
    unreachable codes (the official term without its constant 1, same gradient).

    Sparse once converged (dense early in training), differentiable selection; no
    balancing of its own. Initialisation as official: ``Z, c ~ U(-gamma/100, gamma/100)``,
    ``A, a ~ U(-0.05, 0.05)``.

    Examples
    --------
    >>> import torch
    >>> g = DSelectKGate(8, 4, k=2)
    >>> float(g(torch.randn(3, 8)).combine_matrix().sum(-1).mean().detach())  # doctest: +ELLIPSIS
    1.0...
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        k: int = 2,
        gamma: float = 1.0,
        w_entropy: float = 1e-6,
    ) -> None:
        super().__init__(d_model, n_experts)
        self.k = check_k(k, n_experts)
        self.gamma = real_in("gamma", gamma, 0.0, lo_open=True)
        self.w_entropy = real_in("w_entropy", w_entropy, 0.0)
        self.n_bits = binary_codes(n_experts).shape[1]
        self.power_of_2 = n_experts == 1 << self.n_bits
        self.z_proj = nn.Linear(d_model, k * self.n_bits)
        self.w_proj = nn.Linear(d_model, k)
        nn.init.uniform_(self.z_proj.weight, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.z_proj.bias, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.w_proj.weight, -0.05, 0.05)
        nn.init.uniform_(self.w_proj.bias, -0.05, 0.05)

    def forward(self, x_TD: Tensor) -> Routing:
        x = x_TD.float()
        T = x.shape[0]
        z_TKM = F.linear(x, self.z_proj.weight.float(), self.z_proj.bias.float()).view(T, self.k, self.n_bits)
        alpha_TK = F.linear(x, self.w_proj.weight.float(), self.w_proj.bias.float())
        weights_TE, selectors_TKE = dselect_k_weights(z_TKM, alpha_TK, self.n_experts, self.gamma)
        self._set_transient("gate_losses", {})
        if self.training:
            if self.w_entropy:
                entropy = -(selectors_TKE * torch.log(selectors_TKE + _EPS)).sum()
                self.gate_losses["dselect_entropy"] = self.w_entropy * entropy
            if not self.power_of_2:
                reachable_TK = selectors_TKE.sum(-1)
                self.gate_losses["dselect_reachable"] = (1.0 / reachable_TK - 1.0).sum()
        return routing_from_dense(weights_TE, weights_TE > 0, probs=weights_TE)

    def extra_repr(self) -> str:
        return f"k={self.k}, gamma={self.gamma}, w_entropy={self.w_entropy}"
