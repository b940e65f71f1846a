"""Tabular models: `TabularMoE` (feature embeddings + an MoE layer) and `TabularMLP`, the
dense baseline sized to the same parameter count."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gatedmoe.layers.config import MoEConfig
from gatedmoe.layers.moe import MoE
from gatedmoe.models.params import count_params

__all__ = ["FeatureEmbedding", "TabularMoE", "TabularMLP"]


class FeatureEmbedding(nn.Module):
    """One learned linear embedding per numeric feature: ``e_j = relu(x_j w_j + b_j)``.

    ``x [B, F] -> [B, F, d_embed]`` (Gorishniy et al. 2022, "On Embeddings for Numerical
    Features in Tabular Deep Learning", the linear-ReLU form).
    """

    def __init__(self, n_features: int, d_embed: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_features, d_embed) * d_embed**-0.5)
        self.bias = nn.Parameter(torch.zeros(n_features, d_embed))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x.unsqueeze(-1) * self.weight + self.bias)


class TabularMoE(nn.Module):
    """Embedding + MoE for tables, after GG MoE (Chernov 2025, "(GG) MoE vs. MLP on
    Tabular Data"): per-feature embeddings, a linear map to ``moe.d_model``, one MoE layer
    (default: the dense Gumbel-softmax gate of GG MoE) with a residual connection, and a
    linear head.

    ``forward(x [B, F]) -> [B, n_outputs]`` (class logits, or one value for regression).

    Parameters
    ----------
    n_features, n_outputs : int
    d_embed : int
        Width of each feature's embedding (default 8).
    moe : MoEConfig, optional
        Settings of the MoE layer, carried whole (``self.moe.config == moe``); its
        ``d_model`` is the width the layer works in. Default `default_moe`: d_model 64,
        4 experts of hidden width 64, gate "gumbel_softmax", k 2, GELU, no input check.
    dropout : float
        Before the head (default 0.1).
    **moe_settings
        The flat spelling: any `MoEConfig` field (``d_model=16, n_experts=8, gate="softmax",
        gate_kwargs=...``), applied to `default_moe`. Not together with ``moe``.

    Examples
    --------
    >>> import torch
    >>> m = TabularMoE(10, 3)
    >>> m(torch.randn(5, 10)).shape
    torch.Size([5, 3])
    >>> TabularMoE(10, 3, moe=TabularMoE.default_moe.replace(gate="softmax")).moe.config.gate
    'softmax'
    """

    default_moe: ClassVar[MoEConfig] = MoEConfig(
        d_model=64, n_experts=4, d_hidden=64, gate="gumbel_softmax", k=2, activation="gelu", check_inputs=False
    )

    def __init__(
        self,
        n_features: int,
        n_outputs: int,
        *,
        d_embed: int = 8,
        moe: MoEConfig | None = None,
        dropout: float = 0.1,
        **moe_settings: Any,
    ) -> None:
        super().__init__()
        for name, v in (("n_features", n_features), ("n_outputs", n_outputs), ("d_embed", d_embed)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if moe is None:
            moe = self.default_moe.replace(**moe_settings)
        elif moe_settings:
            raise ValueError(f"pass moe or the flat MoE settings, not both (got moe and {sorted(moe_settings)})")
        elif not isinstance(moe, MoEConfig):
            raise TypeError(f"moe must be a MoEConfig, got {type(moe).__name__}")
        self.n_features, self.n_outputs = n_features, n_outputs
        self.embed = FeatureEmbedding(n_features, d_embed)
        self.proj = nn.Linear(n_features * d_embed, moe.d_model)
        self.norm = nn.LayerNorm(moe.d_model)
        self.moe = MoE.from_config(moe)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(moe.d_model, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"x must have shape [B, n_features={self.n_features}], got {tuple(x.shape)}")
        h = self.proj(self.embed(x).flatten(1))
        h = h + self.moe(self.norm(h))
        return self.head(self.dropout(torch.relu(h)))

    def n_params(self, experts_per_token: Mapping[str, float] | None = None) -> tuple[int, int]:
        """``(total, active per row)``; see `gatedmoe.models.params.count_params`."""
        return count_params(self, experts_per_token)


def _mlp_params(n_features: int, n_outputs: int, width: int, n_layers: int) -> int:
    return n_features * width + width + (n_layers - 1) * (width * width + width) + width * n_outputs + n_outputs


class TabularMLP(nn.Module):
    """The dense baseline: ``n_layers`` hidden layers of ``width`` with ReLU and dropout.

    `matching` builds one whose parameter count is as close as possible to a target (the
    `TabularMoE` it is compared with).

    Examples
    --------
    >>> m = TabularMLP.matching(10, 3, n_params=5000)
    >>> abs(m.n_params()[0] - 5000) < 100
    True
    """

    def __init__(self, n_features: int, n_outputs: int, *, width: int = 128, n_layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.n_features, self.n_outputs, self.width = n_features, n_outputs, width
        layers: list[nn.Module] = []
        d = n_features
        for _ in range(n_layers):
            layers += [nn.Linear(d, width), nn.ReLU(), nn.Dropout(dropout)]
            d = width
        layers.append(nn.Linear(d, n_outputs))
        self.net = nn.Sequential(*layers)

    @classmethod
    def matching(cls, n_features: int, n_outputs: int, n_params: int, *, n_layers: int = 2, dropout: float = 0.1) -> TabularMLP:
        """The MLP of ``n_layers`` hidden layers whose width gives the parameter count
        closest to ``n_params``."""
        if n_params < 1:
            raise ValueError(f"n_params must be >= 1, got {n_params}")
        lo, hi = 1, 1
        while _mlp_params(n_features, n_outputs, hi, n_layers) < n_params:
            hi *= 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _mlp_params(n_features, n_outputs, mid, n_layers) < n_params:
                lo = mid
            else:
                hi = mid
        width = min((lo, hi), key=lambda w: abs(_mlp_params(n_features, n_outputs, w, n_layers) - n_params))
        return cls(n_features, n_outputs, width=width, n_layers=n_layers, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"x must have shape [B, n_features={self.n_features}], got {tuple(x.shape)}")
        return self.net(x)

    def n_params(self, experts_per_token: Mapping[str, float] | None = None) -> tuple[int, int]:
        """``(total, active)``: equal, every weight is used for every row."""
        n = sum(p.numel() for p in self.parameters())
        return n, n
