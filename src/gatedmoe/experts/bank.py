"""`ExpertBank`: the weights of E feed-forward experts, stacked along a leading [E] axis.

Layout follows ``nn.Linear`` (out x in) so a grouped GEMM reads ``w.transpose(-2, -1)``:
``w_in [E, H', D]`` with H' = 2H for GLU activations (gate and up halves concatenated,
one GEMM instead of two), ``w_out [E, D, H]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gatedmoe.experts.activations import Activation, ExpandedGatedActivation, get_activation
from gatedmoe.validation import boolean, check_input, int_in, positive_int

__all__ = ["ExpertBank"]


class ExpertBank(nn.Module):
    """E two-layer feed-forward experts ``f_e(x) = W_out,e act(W_in,e x + b_in,e) + b_out,e``.

    Parameters
    ----------
    n_experts : int
        E >= 1.
    d_model : int
        D, input and output width.
    d_hidden : int
        H, hidden width of each expert.
    activation : str or Activation
        One of ``gatedmoe.experts.activation_names()`` (default "swiglu"), or a built
        activation (`Activation`, `ExpandedGatedActivation`); the
        expanded-range family (xsilu, xgelu, xatlu, xswiglu, xgeglu, xatglu) adds one
        trainable ``act.alpha`` shared by the bank's experts.
    bias : bool
        Add biases ``b_in [E, H']`` and ``b_out [E, D]`` (default False).

    Examples
    --------
    >>> import torch
    >>> bank = ExpertBank(4, 16, 32)
    >>> bank.expert_forward(1, torch.randn(3, 16)).shape
    torch.Size([3, 16])
    """

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str | Activation | ExpandedGatedActivation = "swiglu",
        bias: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("n_experts", n_experts), ("d_model", d_model), ("d_hidden", d_hidden)):
            positive_int(name, v)
        boolean("bias", bias)
        if not isinstance(activation, str) and not (
            callable(activation) and hasattr(activation, "glu") and hasattr(activation, "name")
        ):
            raise TypeError(f"activation must be an activation name or an Activation, got {type(activation).__name__}")
        self.act = get_activation(activation) if isinstance(activation, str) else activation
        self.n_experts, self.d_model, self.d_hidden = n_experts, d_model, d_hidden
        h_in = 2 * d_hidden if self.act.glu else d_hidden
        self.w_in = nn.Parameter(torch.empty(n_experts, h_in, d_model))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.b_in = nn.Parameter(torch.zeros(n_experts, h_in)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform init with the fan-in bound of ``nn.Linear`` for each expert."""
        bound_in, bound_out = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_hidden)
        nn.init.uniform_(self.w_in, -bound_in, bound_in)
        nn.init.uniform_(self.w_out, -bound_out, bound_out)
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.b_out)

    @property
    def has_bias(self) -> bool:
        return self.b_in is not None

    def expert_forward(self, e: int, x_ND: Tensor) -> Tensor:
        """Run expert ``e`` alone on rows ``x_ND`` (plain matmuls; used by the reference)."""
        int_in("e", e, 0, self.n_experts - 1)
        check_input(x_ND, self.d_model, "ExpertBank.expert_forward", ndims=(2,), shape_text="[N, d_model]", name="x_ND")
        h = x_ND @ self.w_in[e].transpose(0, 1)
        if self.b_in is not None:
            h = h + self.b_in[e]
        out = self.act(h) @ self.w_out[e].transpose(0, 1)
        if self.b_out is not None:
            out = out + self.b_out[e]
        return out

    def flops_per_token(self) -> int:
        """Forward multiply-adds x2 of one expert on one token (for throughput reports)."""
        h_in = self.w_in.shape[1]
        return 2 * self.d_model * h_in + 2 * self.d_hidden * self.d_model

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.act.name!r}, bias={self.has_bias}"
        )
