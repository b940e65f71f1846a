"""Auxiliary-loss-free load balancing by a selection-only expert bias.

Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"
(used by DeepSeek-V3): a bias ``b_e`` is added to the routing scores *for selection
only*; after each training step ``b_e <- b_e + u * sign(mean_j c_j - c_e)`` where
``c_e`` is the number of tokens expert e received. Overloaded experts become less
likely to be picked; the combine weights never see the bias, so no gradient flows
through it and no auxiliary loss competes with the language-model loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gatedmoe.validation import positive_int, real_in

__all__ = ["BiasBalancer"]


class BiasBalancer(nn.Module):
    """Holds the selection bias ``[E]`` (a buffer, saved in checkpoints) and its update rule.

    Parameters
    ----------
    n_experts : int
        E.
    update_rate : float
        u, the step of the sign update (DeepSeek-V3 uses 0.001). Must be >= 0.
    """

    def __init__(self, n_experts: int, update_rate: float = 1e-3) -> None:
        super().__init__()
        positive_int("n_experts", n_experts)
        self.update_rate = real_in("update_rate", update_rate, 0.0)
        self.register_buffer("bias", torch.zeros(n_experts))

    @torch.no_grad()
    def update(self, counts_E: Tensor) -> None:
        """One sign step from this batch's per-expert assignment counts."""
        c = counts_E.to(self.bias.device, torch.float32)
        self.bias += self.update_rate * torch.sign(c.mean() - c)

    def extra_repr(self) -> str:
        return f"update_rate={self.update_rate}"
