"""Soft MoE: every slot is a weighted mix of all tokens of a sequence.

Shape legend: B sequences, T tokens, D model dim, E experts, S slots per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.dispatch import get_backend
from gatedmoe.dispatch.options import TritonOptions
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.layers._settings import honoured_settings
from gatedmoe.layers.config import MoEConfig
from gatedmoe.routing import Routing
from gatedmoe.transient import TransientState
from gatedmoe.validation import boolean, check_finite, check_input, positive_int

__all__ = ["SoftMoE"]


class SoftMoE(TransientState, nn.Module):
    """Soft mixture of experts (Puigcerver, Riquelme, Mustafa & Houlsby 2023, "From Sparse
    to Soft Mixtures of Experts", sec. 2).

    Formula, per sequence ``X [T, D]``, slot parameters ``Phi [D, E*S]``:
    ``L = X Phi``; dispatch weights ``Dw = softmax over tokens (columns) of L``; combine
    weights ``Cw = softmax over slots (rows) of L``; slot inputs ``X~ = Dw^T X [E*S, D]``;
    expert e processes its S slots, ``Y~_s = f_e(X~_s)``; output ``Y = Cw Y~ [T, D]``.
    With ``normalize`` (the paper's sec. 2.3 for large D): ``L = scale * l2(X) l2(Phi)``
    with a learned scalar ``scale`` (init 1). No token is dropped, nothing is sparse in
    the mixing, so no auxiliary loss; the expert computation runs as a `Routing` of the
    B*E*S slot rows (weight 1) through the dispatch backend.

    Parameters
    ----------
    d_model, n_experts, d_hidden : int
        D, E, and each expert's hidden width.
    slots_per_expert : int
        S (default 1).
    activation, bias, backend, backend_options :
        As in `gatedmoe.MoEConfig`.
    normalize : bool
        l2-normalise tokens and slot parameters (default False).
    check_inputs : bool
        Fail on NaN/inf in the input (default True), as `gatedmoe.MoE` does (see
        `MoEConfig`).

    These are the `MoEConfig` fields it honours (``self.config`` holds them); `from_config`
    builds one from a config and refuses, naming the field, one whose other settings differ
    from their defaults: Soft MoE has no gate, top-k, auxiliary loss, capacity or shared
    experts.

    Input ``[B, T, D]`` or ``[T, D]`` (one sequence), any floating dtype (computed in it,
    as `gatedmoe.MoE`; slot logits in float32); anything else is a TypeError/ValueError
    naming ``x``. Zero tokens or zero sequences give an empty output. Tokens mix within a
    sequence, so a causal model cannot use it as is (the paper notes the same).
    ``torch.compile`` works as for `gatedmoe.MoE`.

    Examples
    --------
    >>> import torch
    >>> m = SoftMoE(16, n_experts=4, d_hidden=32, slots_per_expert=2)
    >>> m(torch.randn(3, 10, 16)).shape
    torch.Size([3, 10, 16])
    >>> from gatedmoe import MoEConfig
    >>> cfg = MoEConfig(d_model=16, n_experts=4, d_hidden=32, activation="gelu")
    >>> SoftMoE.from_config(cfg, slots_per_expert=2).config == cfg
    True
    """

    _transient = {"aux_losses": {}}
    # The MoEConfig fields this variant uses; the others must keep their defaults.
    honoured = ("d_model", "n_experts", "d_hidden", "activation", "bias", "backend", "backend_options", "check_inputs")

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        d_hidden: int,
        *,
        slots_per_expert: int = 1,
        activation: str = "swiglu",
        bias: bool = False,
        normalize: bool = False,
        backend: str = "auto",
        backend_options: TritonOptions | None = None,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        positive_int("slots_per_expert", slots_per_expert)
        boolean("normalize", normalize)
        self.config = MoEConfig(
            d_model=d_model, n_experts=n_experts, d_hidden=d_hidden, activation=activation, bias=bias, backend=backend,
            backend_options=backend_options, check_inputs=check_inputs,
        )
        self.experts = ExpertBank(n_experts, d_model, d_hidden, activation, bias)
        self.d_model, self.n_experts, self.slots_per_expert = d_model, n_experts, slots_per_expert
        self.phi = nn.Parameter(torch.randn(d_model, n_experts * slots_per_expert) * d_model**-0.5)
        self.normalize = normalize
        self.scale = nn.Parameter(torch.ones(())) if normalize else None
        self.aux_losses: dict[str, Tensor] = {}
        self.last_dispatch: Tensor | None = None
        self.last_combine: Tensor | None = None

    @classmethod
    def from_config(cls, config: MoEConfig, *, slots_per_expert: int = 1, normalize: bool = False) -> SoftMoE:
        """The Soft MoE whose experts and dispatch ``config`` describes (``self.config == config``).

        ValueError, naming the field, if a setting outside `honoured` differs from its default.
        """
        settings = honoured_settings(config, cls.honoured, cls.__name__)
        d_model, n_experts, d_hidden = settings.pop("d_model"), settings.pop("n_experts"), settings.pop("d_hidden")
        return cls(d_model, n_experts, d_hidden, slots_per_expert=slots_per_expert, normalize=normalize, **settings)

    @property
    def backend(self) -> str:
        return self.config.backend

    def slot_logits(self, x_BTD: Tensor) -> Tensor:
        """``L [B, T, E*S]`` in float32."""
        x, phi = x_BTD.float(), self.phi.float()
        if self.normalize:
            return self.scale * (F.normalize(x, dim=-1) @ F.normalize(phi, dim=0))
        return x @ phi

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D]`` (or ``[T, D]``) to the same shape."""
        check_input(x, self.d_model, "SoftMoE", ndims=(2, 3), shape_text="[B, T, d_model] or [T, d_model]")
        if self.config.check_inputs:
            check_finite(x, "SoftMoE")
        x_BTD = x.unsqueeze(0) if x.dim() == 2 else x
        B, T, D = x_BTD.shape
        ES = self.n_experts * self.slots_per_expert
        logits_BTN = self.slot_logits(x_BTD)
        dispatch_BTN = torch.softmax(logits_BTN, dim=1)
        combine_BTN = torch.softmax(logits_BTN, dim=2)
        self.last_dispatch, self.last_combine = dispatch_BTN.detach(), combine_BTN.detach()
        slots_BND = (dispatch_BTN.transpose(1, 2) @ x_BTD.float()).to(x.dtype)
        # Slot row b*ES + e*S + s belongs to expert e: already sorted by expert within a
        # sequence; Routing.from_assignments sorts across sequences.
        rows = torch.arange(B * ES, device=x.device)
        expert_of_row = (rows % ES) // self.slots_per_expert
        routing = Routing.from_assignments(
            rows, expert_of_row, torch.ones(B * ES, device=x.device), n_experts=self.n_experts, n_tokens=B * ES
        )
        dispatch = get_backend(self.config.backend, x.device)
        out_ND = dispatch(slots_BND.reshape(B * ES, D), routing, self.experts, options=self.config.backend_options)
        y_BTD = combine_BTN @ out_ND.reshape(B, ES, D).float()
        y_BTD = y_BTD.to(x.dtype)
        return y_BTD.squeeze(0) if x.dim() == 2 else y_BTD
