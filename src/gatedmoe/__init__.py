"""gatedmoe: gated mixture-of-experts for PyTorch.

Start with `gatedmoe.dispatch.reference` for the whole layer in plain PyTorch.

>>> import torch, gatedmoe
>>> moe = gatedmoe.MoE(d_model=32, n_experts=8, d_hidden=64, k=2)
>>> y = moe(torch.randn(4, 10, 32))
>>> loss = y.pow(2).mean() + gatedmoe.aux_loss(moe)

The top-level names load on first use (PEP 562), so ``import gatedmoe.stats`` does not
pay for the deep-learning layer it does not use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "MoE": "gatedmoe.layers.moe",
    "MoEConfig": "gatedmoe.layers.config",
    "SharedExperts": "gatedmoe.layers.moe",
    "aux_loss": "gatedmoe.layers.moe",
    "balance_step": "gatedmoe.layers.moe",
    "ExpertBank": "gatedmoe.experts.bank",
    "Routing": "gatedmoe.routing",
    "RouterReplay": "gatedmoe.replay",
    "TritonOptions": "gatedmoe.dispatch.options",
    "FP8Recipe": "gatedmoe.dispatch.options",
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:
    from gatedmoe.dispatch.options import FP8Recipe as FP8Recipe
    from gatedmoe.dispatch.options import TritonOptions as TritonOptions
    from gatedmoe.experts.bank import ExpertBank as ExpertBank
    from gatedmoe.layers.config import MoEConfig as MoEConfig
    from gatedmoe.layers.moe import MoE as MoE
    from gatedmoe.layers.moe import SharedExperts as SharedExperts
    from gatedmoe.layers.moe import aux_loss as aux_loss
    from gatedmoe.layers.moe import balance_step as balance_step
    from gatedmoe.replay import RouterReplay as RouterReplay
    from gatedmoe.routing import Routing as Routing


# Subpackages reachable as attributes after a bare ``import gatedmoe`` (``gatedmoe.gates.names()``),
# imported on first access like the names above.
_SUBPACKAGES = frozenset({
    "analysis", "arena", "autocast", "bench", "cli", "data", "dispatch", "experts", "gates", "interop", "layers",
    "losses", "models", "parallel", "replay", "routing", "stats", "transient", "validation",
})


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"gatedmoe.{name}")  # the import binds it in this module
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gatedmoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})
