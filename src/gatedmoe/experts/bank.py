"""`ExpertBank`: the weights of E feed-forward experts, stacked along a leading [E] axis.

Layout follows ``nn.Linear`` (out x in) so a grouped GEMM reads ``w.transpose(-2, -1)``:
``w_in [E, H', D]`` with H' = 2H for GLU activations (gate and up halves concatenated,
one GEMM instead of two), ``w_out [E, D, H]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gatedmoe.experts.activations import Activation, ExpandedGatedActivation, resolve_activation
from gatedmoe.experts.lora import ExpertLoRA
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
        self.act = resolve_activation(activation)
        self.n_experts, self.d_model, self.d_hidden = n_experts, d_model, d_hidden
        h_in = 2 * d_hidden if self.act.glu else d_hidden
        self.w_in = nn.Parameter(torch.empty(n_experts, h_in, d_model))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.b_in = nn.Parameter(torch.zeros(n_experts, h_in)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None
        self.lora: ExpertLoRA | None = None
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

    # ------------------------------------------------------------------ LoRA
    @property
    def active_lora(self) -> ExpertLoRA | None:
        """The adapters, if attached and not merged into the weights (what dispatch adds)."""
        return None if self.lora is None or self.lora.merged else self.lora

    def add_lora(self, rank: int, alpha: float | None = None, freeze_base: bool = True) -> ExpertLoRA:
        """Attach per-expert LoRA adapters (`gatedmoe.experts.lora.ExpertLoRA`) of ``rank``
        on ``w_in`` and ``w_out``; with ``freeze_base`` (default) the bank's own weights and
        biases stop requiring gradients. Returns the adapters (``self.lora``).

        Examples
        --------
        >>> bank = ExpertBank(4, 16, 32)
        >>> lora = bank.add_lora(rank=4)
        >>> [n for n, p in bank.named_parameters() if p.requires_grad]
        ['lora.A_in', 'lora.B_in', 'lora.A_out', 'lora.B_out']
        """
        if self.lora is not None:
            raise ValueError("this bank already has LoRA adapters")
        lora = ExpertLoRA(self.n_experts, self.d_model, self.w_in.shape[1], self.d_hidden, rank, alpha)
        self.lora = lora.to(device=self.w_in.device, dtype=self.w_in.dtype)
        if freeze_base:
            for p in (self.w_in, self.w_out, self.b_in, self.b_out):
                if p is not None:
                    p.requires_grad_(False)
        return self.lora

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the adapters into ``w_in`` and ``w_out`` (``W += s B A``): dispatch then runs
        the plain bank at full speed (any backend). `unmerge_lora` undoes it."""
        if self.lora is None or self.lora.merged:
            raise ValueError("no unmerged LoRA adapters to merge")
        self.w_in += self.lora.delta_in().to(self.w_in.dtype)
        self.w_out += self.lora.delta_out().to(self.w_out.dtype)
        self.lora.merged = True

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        """Take merged adapters out of the weights again (``W -= s B A``; exact up to rounding)."""
        if self.lora is None or not self.lora.merged:
            raise ValueError("no merged LoRA adapters to unmerge")
        self.w_in -= self.lora.delta_in().to(self.w_in.dtype)
        self.w_out -= self.lora.delta_out().to(self.w_out.dtype)
        self.lora.merged = False

    def expert_forward(self, e: int, x_ND: Tensor) -> Tensor:
        """Run expert ``e`` alone on rows ``x_ND`` (plain matmuls; used by the reference),
        with its LoRA adapter's ``s B A`` added to each weight while unmerged."""
        int_in("e", e, 0, self.n_experts - 1)
        check_input(x_ND, self.d_model, "ExpertBank.expert_forward", ndims=(2,), shape_text="[N, d_model]", name="x_ND")
        w_in, w_out = self.w_in[e], self.w_out[e]
        lora = self.active_lora
        if lora is not None:
            w_in = w_in + lora.scale * (lora.B_in[e] @ lora.A_in[e])
            w_out = w_out + lora.scale * (lora.B_out[e] @ lora.A_out[e])
        h = x_ND @ w_in.transpose(0, 1)
        if self.b_in is not None:
            h = h + self.b_in[e]
        out = self.act(h) @ w_out.transpose(0, 1)
        if self.b_out is not None:
            out = out + self.b_out[e]
        return out

    def forward(self, x_ND: Tensor, routing, run):
        """``run(x_ND, routing, self)``: a dispatch function (``gatedmoe.dispatch.get_backend``)
        applied to this bank, called through the module.

        Dispatch backends read the weights directly; going through ``bank(...)`` lets
        wrappers that hook a module's forward see the bank's use. FSDP2's ``fully_shard`` on
        the bank gathers its weights before the call and reduce-scatters their gradients
        after the backward (expert parallelism composed with FSDP2,
        `gatedmoe.parallel.fully_shard_expert_parallel`).
        """
        return run(x_ND, routing, self)

    def flops_per_token(self) -> int:
        """Forward multiply-adds x2 of one expert on one token (for throughput reports)."""
        h_in = self.w_in.shape[1]
        return 2 * self.d_model * h_in + 2 * self.d_hidden * self.d_model

    def extra_repr(self) -> str:  # the adapters print as the submodule ``lora``
        return (
            f"n_experts={self.n_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.act.name!r}, bias={self.has_bias}"
        )
