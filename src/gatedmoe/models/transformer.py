"""A small decoder-only transformer language model with MoE feed-forward layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gatedmoe.layers.config import MoEConfig
from gatedmoe.layers.moe import MoE
from gatedmoe.models.params import count_params

__all__ = ["LMConfig", "MoETransformerLM"]


_MOE_FIELDS = frozenset(f.name for f in fields(MoEConfig))


@dataclass(frozen=True, init=False)
class LMConfig:
    """Hyper-parameters of `MoETransformerLM` (defaults: a char-level model that trains in
    minutes on two CPU cores).

    Parameters
    ----------
    vocab_size : int
    seq_len, d_model, n_layers, n_heads : int
        Context length (default 128), model width (default: ``moe.d_model``, else 128),
        blocks (default 4) and attention heads (default 4; must divide ``d_model``).
    moe : MoEConfig, optional
        Settings of every MoE feed-forward layer, carried whole (``blocks[i].ffn.config ==
        cfg.moe``); its ``d_model`` must equal ``d_model``. Default: `default_moe` at
        ``d_model``, i.e. 8 experts of hidden width 128, top-2 softmax, SwiGLU, no input
        check (the layers see hidden states, not user input).
    moe_every : int
        Every ``moe_every``-th block has an MoE layer, the others a dense SwiGLU of the same
        active width ``moe.k * moe.d_hidden`` (default 1).
    dropout : float
        Attention dropout (default 0).
    gated_attention : bool
        Add the output gate of Qiu et al. 2025 ("Gated Attention for Large Language Models")
        to every attention block (default False, see `CausalSelfAttention`).
    **moe_settings
        The flat spelling of configs written before ``moe`` existed: any `MoEConfig` field
        but ``d_model`` (``n_experts=4, k=1, gate="hash", ...``), applied to `default_moe`.
        Not together with ``moe``.

    `to_dict` gives the nested JSON-able form that checkpoints store; `from_dict` reads it
    and the flat form of older checkpoints.

    Examples
    --------
    >>> from gatedmoe import MoEConfig
    >>> cfg = LMConfig(vocab_size=20, n_heads=2, moe=MoEConfig(d_model=32, n_experts=4, d_hidden=64, k=1))
    >>> cfg.d_model, cfg.moe.k
    (32, 1)
    >>> flat = LMConfig(vocab_size=20, d_model=32, n_heads=2, n_experts=4, d_hidden=64, k=1)
    >>> flat.moe == LMConfig.default_moe.replace(d_model=32, n_experts=4, d_hidden=64, k=1)
    True
    >>> LMConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    vocab_size: int
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    moe: MoEConfig
    moe_every: int
    dropout: float
    gated_attention: bool

    default_moe: ClassVar[MoEConfig] = MoEConfig(d_model=128, n_experts=8, d_hidden=128, check_inputs=False)

    def __init__(
        self,
        vocab_size: int,
        seq_len: int = 128,
        d_model: int | None = None,
        n_layers: int = 4,
        n_heads: int = 4,
        *,
        moe: MoEConfig | None = None,
        moe_every: int = 1,
        dropout: float = 0.0,
        gated_attention: bool = False,
        **moe_settings: Any,
    ) -> None:
        unknown = sorted(set(moe_settings) - _MOE_FIELDS)
        if unknown:
            raise TypeError(f"LMConfig got unexpected keyword arguments {unknown}")
        if moe is None:
            moe = self.default_moe.replace(d_model=128 if d_model is None else d_model, **moe_settings)
        elif moe_settings:
            raise ValueError(f"pass moe or the flat MoE settings, not both (got moe and {sorted(moe_settings)})")
        elif not isinstance(moe, MoEConfig):
            raise TypeError(f"moe must be a MoEConfig (LMConfig.from_dict reads dicts), got {type(moe).__name__}")
        if d_model is None:
            d_model = moe.d_model
        elif d_model != moe.d_model:
            raise ValueError(f"d_model={d_model} differs from moe.d_model={moe.d_model}; the MoE layers work at the model width")
        values = dict(vocab_size=vocab_size, seq_len=seq_len, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      moe=moe, moe_every=moe_every, dropout=dropout, gated_attention=gated_attention)
        for name, value in values.items():
            object.__setattr__(self, name, value)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {self.moe_every}")

    def replace(self, **changes: Any) -> LMConfig:
        """A copy with ``changes`` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able nested dict (``moe`` as a dict, its ``backend_options`` too), read by `from_dict`."""
        d = asdict(self)
        d["moe"] = self.moe.to_dict(plain=True)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LMConfig:
        """Inverse of `to_dict`; also reads the flat dicts (``n_experts``, ``k``, ``gate``,
        ... beside ``d_model``) that checkpoints written before ``moe`` existed store."""
        d = dict(d)
        moe = d.pop("moe", None)
        if isinstance(moe, Mapping):
            moe = MoEConfig.from_dict(moe)
        return cls(**d, moe=moe)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, optionally with an output gate.

    Gated attention (Qiu et al. 2025, "Gated Attention for Large Language Models:
    Non-linearity, Sparsity, and Attention-Sink-Free", position G1, elementwise and
    head-specific): ``Y' = Y * sigmoid(X W_g)``, where ``Y [B, S, D]`` is the attention
    output (heads concatenated, before the output projection) and ``X`` the block's
    normalized input; then ``out = Y' W_o``.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.gate = nn.Linear(cfg.d_model, cfg.d_model, bias=False) if cfg.gated_attention else None
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(B, S, D)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        return self.proj(y)


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w_in(x).chunk(2, -1)
        return self.w_out(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))`` (MoE or dense)."""

    def __init__(self, cfg: LMConfig, use_moe: bool) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.ffn: nn.Module
        if use_moe:
            self.ffn = MoE.from_config(cfg.moe)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.moe.d_hidden * cfg.moe.k)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        # Gates that route by vocabulary id (hash layers) need the input tokens.
        if isinstance(self.ffn, MoE) and self.ffn.gate.uses_token_ids:
            return x + self.ffn(h, token_ids=token_ids)
        return x + self.ffn(h)


class MoETransformerLM(nn.Module):
    """Decoder-only LM; every ``moe_every``-th block has an MoE feed-forward layer
    (the others a dense SwiGLU of the same active width).

    ``forward(idx [B, S]) -> logits [B, S, vocab]``; `loss` adds the cross-entropy.

    Examples
    --------
    >>> import torch
    >>> lm = MoETransformerLM(LMConfig(vocab_size=20, seq_len=16, d_model=32, n_layers=2, n_heads=2))
    >>> lm(torch.randint(0, 20, (2, 16))).shape
    torch.Size([2, 16, 20])
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, use_moe=(i % cfg.moe_every == cfg.moe_every - 1)) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        B, S = idx.shape
        if S > self.cfg.seq_len:
            raise ValueError(f"sequence length {S} exceeds seq_len={self.cfg.seq_len}")
        x = self.embed(idx) + self.pos(torch.arange(S, device=idx.device))
        for block in self.blocks:
            x = block(x, idx)
        return self.head(self.norm(x))

    def loss(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(cross_entropy, logits)``."""
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), logits

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def n_params(self, experts_per_token: Mapping[str, float] | None = None) -> tuple[int, int]:
        """``(total, active per token)`` parameter counts (embeddings included).

        Active counts the routed experts a token uses (see `count_params`; pass the
        measured ``experts_per_token`` of `RoutingStats` for gates without a fixed k).
        """
        return count_params(self, experts_per_token)

    @torch.no_grad()
    def generate(self, idx: Tensor, n_new: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Sample ``n_new`` tokens after ``idx [B, S0]``."""
        for _ in range(n_new):
            logits = self(idx[:, -self.cfg.seq_len :])[:, -1] / temperature
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], 1)
        return idx
