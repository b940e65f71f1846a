"""Expert activations: plain ones and the GLU family (Shazeer 2020, "GLU Variants
Improve Transformer").

A GLU activation takes the first layer's output ``h = [a | b]`` of width 2H and returns
``act(a) * b`` of width H; a plain activation maps width H to H.

Most activations are stateless `Activation` values. The expanded-gating-range family
(xSiLU, xGELU, xATLU and their GLU forms) has a trainable ``alpha``: `get_activation`
returns a fresh `ExpandedGatedActivation` module for those, so each `ExpertBank` (and
each shared-expert block) registers and trains its own alpha.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Activation",
    "ExpandedGatedActivation",
    "ClampedSwiGLU",
    "LimitedSwiGLU",
    "Float32SwiGLU",
    "SoftcappedSwiGLU",
    "get_activation",
    "resolve_activation",
    "activation_names",
]


@dataclass(frozen=True)
class Activation:
    """An elementwise function and whether it is used in GLU form."""

    name: str
    fn: Callable[[Tensor], Tensor]
    glu: bool

    def __call__(self, h: Tensor) -> Tensor:
        """Apply to the first layer's output ``h [N, H]`` (``[N, 2H]`` for GLU)."""
        if not self.glu:
            return self.fn(h)
        a, b = h.chunk(2, dim=-1)
        return self.fn(a) * b


def _identity(x: Tensor) -> Tensor:
    return x


def _relu_squared(x: Tensor) -> Tensor:
    return torch.square(torch.relu(x))


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation("relu", torch.relu, glu=False),
        # Squared ReLU (So et al. 2021, "Primer"), Nemotron-H's experts.
        Activation("relu2", _relu_squared, glu=False),
        Activation("gelu", _gelu_tanh, glu=False),
        Activation("silu", F.silu, glu=False),
        Activation("swiglu", F.silu, glu=True),
        Activation("geglu", _gelu_tanh, glu=True),
        Activation("reglu", torch.relu, glu=True),
        Activation("bilinear", _identity, glu=True),
    ]
}


def _gelu_gate(x: Tensor) -> Tensor:
    """Phi(x), the standard normal CDF: GELU(x) = x Phi(x)."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _arctan_gate(x: Tensor) -> Tensor:
    """arctan(x) / pi + 1/2 in (0, 1): ATLU(x) = x (arctan(x) / pi + 1/2)."""
    return torch.atan(x) / math.pi + 0.5


class ExpandedGatedActivation(nn.Module):
    """Gated activation with an expanded, trainable gating range (Huang 2024, "Expanded
    Gating Ranges Improve Activation Functions").

    A self-gated activation ``x * g(x)`` with gate ``g`` in ``(0, 1)`` becomes
    ``x * ((1 + 2 alpha) g(x) - alpha)``: the gate's range widens to ``(-alpha, 1 + alpha)``.
    ``alpha`` is trainable, initialised at ``alpha_init`` (0 recovers SiLU / GELU / ATLU).
    Gates: sigmoid (xSiLU), the normal CDF (xGELU), ``arctan(x)/pi + 1/2`` (xATLU).
    In GLU form (``glu=True``, Shazeer 2020) ``h = [a | b] -> act(a) * b``.

    Examples
    --------
    >>> import torch
    >>> act = ExpandedGatedActivation("xsilu", torch.sigmoid, glu=False)
    >>> float(act(torch.tensor([1.0])))  # alpha = 0: SiLU(1)  # doctest: +ELLIPSIS
    0.731...
    """

    def __init__(self, name: str, gate: Callable[[Tensor], Tensor], glu: bool, alpha_init: float = 0.0) -> None:
        super().__init__()
        self.name, self.gate, self.glu = name, gate, bool(glu)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def fn(self, x: Tensor) -> Tensor:
        """``x * ((1 + 2 alpha) g(x) - alpha)`` elementwise."""
        a = self.alpha.to(x.dtype)
        return x * ((1 + 2 * a) * self.gate(x) - a)

    def forward(self, h: Tensor) -> Tensor:
        """Apply to the first layer's output ``h [N, H]`` (``[N, 2H]`` for GLU)."""
        if not self.glu:
            return self.fn(h)
        a, b = h.chunk(2, dim=-1)
        return self.fn(a) * b

    def extra_repr(self) -> str:
        return f"name={self.name!r}, glu={self.glu}"


class ClampedSwiGLU(nn.Module):
    """GPT-OSS's SwiGLU (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"), in the GLU
    form of this module: ``h = [a | b]`` of width 2H maps to

    ``a' = min(a, limit)``, ``b' = clamp(b, -limit, limit)``,
    ``(b' + 1) * (a' * sigmoid(a' * alpha))``,

    multiplied in that order, as transformers' ``GptOssExperts`` does (in bf16 another
    order rounds differently). Defaults are GPT-OSS's ``swiglu_alpha = 1.702`` and
    ``swiglu_limit = 7.0``; registered as "clamped_swiglu" with those defaults (a
    checkpoint's own constants come from its config: build ``ClampedSwiGLU(alpha, limit)``).

    Examples
    --------
    >>> import torch
    >>> act = ClampedSwiGLU()
    >>> act(torch.tensor([[100.0, 0.0]])).item() == 7.0 * torch.sigmoid(torch.tensor(7.0 * 1.702)).item()
    True
    """

    glu = True
    name = "clamped_swiglu"

    def __init__(self, alpha: float = 1.702, limit: float = 7.0) -> None:
        super().__init__()
        if not limit > 0:
            raise ValueError(f"limit must be > 0, got {limit}")
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, h: Tensor) -> Tensor:
        """Apply to the first layer's output ``h [N, 2H]``; ``[N, H]``."""
        a, b = h.chunk(2, dim=-1)
        a = a.clamp(max=self.limit)
        b = b.clamp(min=-self.limit, max=self.limit)
        return (b + 1) * (a * torch.sigmoid(a * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


def _at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32, or as it is when wider (float64)."""
    return t if t.dtype == torch.float64 else t.float()


class LimitedSwiGLU(nn.Module):
    """SwiGLU with clamped inputs (DeepSeek-AI 2026, DeepSeek-V4, ``swiglu_limit``;
    transformers ``DeepseekV4Experts._apply_gate``, also GLM-5-Next's and HY-V4's experts),
    in the GLU form of this module: ``h = [a | b]`` of width 2H maps to

    ``clamp="input"`` (default): ``silu(min(a, limit)) * clamp(b, -limit, limit)``;
    ``clamp="output"`` (StepFun's Step-3.7-Flash, ``Step3p7Experts._apply_gate``):
    ``min(silu(a), limit) * clamp(b, -limit, limit)``.

    Unlike GPT-OSS's `ClampedSwiGLU` there is no ``alpha`` and no ``+ 1``. ``limit`` may be
    ``inf`` (no clamp: plain SwiGLU). Registered as "limited_swiglu" with DeepSeek-V4's
    default ``limit = 10.0``; a checkpoint's own limit comes from its config.

    Examples
    --------
    >>> import torch
    >>> act = LimitedSwiGLU(limit=2.0)
    >>> act(torch.tensor([[5.0, 5.0]])).item() == torch.nn.functional.silu(torch.tensor(2.0)).item() * 2.0
    True
    """

    glu = True
    name = "limited_swiglu"

    def __init__(self, limit: float = 10.0, clamp: str = "input") -> None:
        super().__init__()
        if not limit > 0:
            raise ValueError(f"limit must be > 0, got {limit}")
        if clamp not in ("input", "output"):
            raise ValueError(f"clamp must be 'input' or 'output', got {clamp!r}")
        self.limit, self.clamp = float(limit), clamp

    def forward(self, h: Tensor) -> Tensor:
        """Apply to the first layer's output ``h [N, 2H]``; ``[N, H]``."""
        a, b = h.chunk(2, dim=-1)
        b = b.clamp(min=-self.limit, max=self.limit)
        if self.clamp == "input":
            return F.silu(a.clamp(max=self.limit)) * b
        return F.silu(a).clamp(max=self.limit) * b

    def extra_repr(self) -> str:
        return f"limit={self.limit}, clamp={self.clamp!r}"


class Float32SwiGLU(nn.Module):
    """SwiGLU computed in float32 (float64 inputs in float64) and rounded back to the input's dtype:
    ``(silu(float32(a)) * float32(b)).to(h.dtype)`` for ``h = [a | b]`` (transformers
    ``BeamExperts._apply_gate``). The same function as "swiglu" in float32; in bf16 it rounds
    once instead of after each operation. Registered as "swiglu_float32".

    Examples
    --------
    >>> import torch
    >>> Float32SwiGLU()(torch.ones(2, 4, dtype=torch.bfloat16)).dtype
    torch.bfloat16
    """

    glu = True
    name = "swiglu_float32"

    def forward(self, h: Tensor) -> Tensor:
        """Apply to the first layer's output ``h [N, 2H]``; ``[N, H]``."""
        a, b = _at_least_float32(h).chunk(2, dim=-1)
        return (F.silu(a) * b).to(h.dtype)


class SoftcappedSwiGLU(nn.Module):
    """SwiGLU whose linear gate factor and up projection are soft-capped, computed in float32
    and rounded back to the input's dtype (Thinking Machines' Inkling-2; transformers
    ``Inkling2SoftcappedSwiGLU``): for ``h = [a | b]``,

    ``cap(a, c_g) * sigmoid(a) * cap(b, c_u)``, ``cap(x, c) = c * tanh(x / c)``,

    where the sigmoid sees the raw gate ``a`` (float64 inputs are computed in float64). Registered as "softcapped_swiglu" with
    Inkling-2's defaults ``gate_cap = 4.0``, ``up_cap = 25.0``.

    Examples
    --------
    >>> import torch
    >>> act = SoftcappedSwiGLU(gate_cap=1.0, up_cap=1.0)
    >>> round(act(torch.tensor([[100.0, 100.0]])).item(), 4)  # both caps reached: 1 * 1 * 1
    1.0
    """

    glu = True
    name = "softcapped_swiglu"

    def __init__(self, gate_cap: float = 4.0, up_cap: float = 25.0) -> None:
        super().__init__()
        for arg, v in (("gate_cap", gate_cap), ("up_cap", up_cap)):
            if not v > 0:
                raise ValueError(f"{arg} must be > 0, got {v}")
        self.gate_cap, self.up_cap = float(gate_cap), float(up_cap)

    def forward(self, h: Tensor) -> Tensor:
        """Apply to the first layer's output ``h [N, 2H]``; ``[N, H]``."""
        a, b = _at_least_float32(h).chunk(2, dim=-1)
        capped_a = torch.tanh(a / self.gate_cap) * self.gate_cap
        capped_b = torch.tanh(b / self.up_cap) * self.up_cap
        return (capped_a * torch.sigmoid(a) * capped_b).to(h.dtype)

    def extra_repr(self) -> str:
        return f"gate_cap={self.gate_cap}, up_cap={self.up_cap}"


# Activations that are modules with constants of their own: name -> class (built with its defaults).
_MODULES: dict[str, type[nn.Module]] = {c.name: c for c in (ClampedSwiGLU, LimitedSwiGLU, Float32SwiGLU, SoftcappedSwiGLU)}

# name -> (gate, glu): the trainable expanded-range family.
_EXPANDED: dict[str, tuple[Callable[[Tensor], Tensor], bool]] = {
    "xsilu": (torch.sigmoid, False),
    "xgelu": (_gelu_gate, False),
    "xatlu": (_arctan_gate, False),
    "xswiglu": (torch.sigmoid, True),
    "xgeglu": (_gelu_gate, True),
    "xatglu": (_arctan_gate, True),
}


def activation_names() -> list[str]:
    """Known activation names."""
    return sorted([*_ACTIVATIONS, *_EXPANDED, *_MODULES])


def resolve_activation(activation: object) -> Activation | ExpandedGatedActivation | nn.Module:
    """``activation`` as a built activation: a name goes through `get_activation`; a built one
    (callable, with ``name`` and ``glu``) is returned as it is; anything else is a TypeError."""
    if isinstance(activation, str):
        return get_activation(activation)
    if not (callable(activation) and hasattr(activation, "glu") and hasattr(activation, "name")):
        raise TypeError(f"activation must be an activation name or an Activation, got {type(activation).__name__}")
    return activation


def get_activation(name: str) -> Activation | ExpandedGatedActivation:
    """The activation called ``name``; ValueError listing the known ones otherwise.

    Names of the expanded family ("xsilu", "xgelu", "xatlu", "xswiglu", "xgeglu",
    "xatglu") return a new module with its own trainable alpha on every call;
    "clamped_swiglu", "limited_swiglu", "swiglu_float32" and "softcapped_swiglu" return a
    new `ClampedSwiGLU` (GPT-OSS's constants), `LimitedSwiGLU` (DeepSeek-V4's limit),
    `Float32SwiGLU` or `SoftcappedSwiGLU` (Inkling-2's caps).
    """
    if name in _MODULES:
        return _MODULES[name]()
    if name in _EXPANDED:
        gate, glu = _EXPANDED[name]
        return ExpandedGatedActivation(name, gate, glu)
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known activations: {', '.join(activation_names())}")
    return _ACTIVATIONS[name]
