"""Deep mixture of experts: MoE layers stacked, each with its own gate."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gatedmoe.layers.config import MoEConfig
from gatedmoe.layers.moe import MoE
from gatedmoe.validation import boolean, check_input, one_of, positive_int

__all__ = ["DeepMoE"]


class DeepMoE(nn.Module):
    """Deep mixture of experts (Eigen, Ranzato & Sutskever 2013, "Learning Factored
    Representations in a Deep Mixture of Experts").

    Formula: ``z^0 = x``; ``z^l = sum_e g^l_e(z^{l-1}) f^l_e(z^{l-1})`` for l = 1..L, with a
    nonlinearity between layers (``relu`` as in the paper; None for none) and, with
    ``residual``, ``z^l = z^{l-1} + ...`` instead. Each layer is a `gatedmoe.MoE` with its
    own gate and experts, so the number of effective expert combinations grows as
    ``E^L`` while the parameters grow as ``L * E``.

    Parameters
    ----------
    d_model, n_experts, d_hidden : int
        As in `gatedmoe.MoE` (the same for every layer).
    n_layers : int
        L >= 1 (default 2, as in the paper).
    nonlinearity : {"relu", None}
        Between layers (not after the last).
    residual : bool
        Add each layer's input to its output (default False).
    **moe_kwargs
        The other `gatedmoe.MoEConfig` fields (gate, k, gate_kwargs, ...). They make one
        config, ``self.config``, and every layer is ``MoE.from_config(self.config)``;
        `from_config` takes a config directly.

    ``aux_loss(model)`` sums every layer's auxiliary losses. Inputs follow the contract of
    `gatedmoe.MoE` (checked on entry; NaN/inf by the first layer's ``check_inputs``).

    Examples
    --------
    >>> import torch
    >>> m = DeepMoE(8, n_experts=4, d_hidden=16, n_layers=2, gate="softmax")
    >>> m(torch.randn(3, 8)).shape
    torch.Size([3, 8])
    >>> all(layer.config == m.config for layer in m.layers)
    True
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        d_hidden: int,
        *,
        n_layers: int = 2,
        nonlinearity: str | None = "relu",
        residual: bool = False,
        **moe_kwargs: Any,
    ) -> None:
        super().__init__()
        positive_int("n_layers", n_layers)
        one_of("nonlinearity", nonlinearity, ("relu", None))
        boolean("residual", residual)
        self.config = MoEConfig(d_model=d_model, n_experts=n_experts, d_hidden=d_hidden, **moe_kwargs)
        self.layers = nn.ModuleList(MoE.from_config(self.config) for _ in range(n_layers))
        self.nonlinearity, self.residual = nonlinearity, residual

    @classmethod
    def from_config(
        cls, config: MoEConfig, *, n_layers: int = 2, nonlinearity: str | None = "relu", residual: bool = False
    ) -> DeepMoE:
        """``n_layers`` MoE layers, each ``MoE.from_config(config)`` (``self.config == config``)."""
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        settings = config.to_dict()
        d_model, n_experts, d_hidden = settings.pop("d_model"), settings.pop("n_experts"), settings.pop("d_hidden")
        return cls(d_model, n_experts, d_hidden, n_layers=n_layers, nonlinearity=nonlinearity, residual=residual,
                   **settings)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """``x [..., D] -> [..., D]``; ``token_ids`` reach every layer."""
        check_input(x, self.config.d_model, "DeepMoE")
        z = x
        for i, layer in enumerate(self.layers):
            out = layer(z, token_ids=token_ids)
            z = z + out if self.residual else out
            if self.nonlinearity == "relu" and i < len(self.layers) - 1:
                z = torch.relu(z)
        return z
