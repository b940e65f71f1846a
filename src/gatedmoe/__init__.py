"""gatedmoe: gated mixture-of-experts for PyTorch.

Start with `gatedmoe.dispatch.reference` for the whole layer in plain PyTorch.

>>> import torch, gatedmoe
>>> moe = gatedmoe.MoE(d_model=32, n_experts=8, d_hidden=64, k=2)
>>> y = moe(torch.randn(4, 10, 32))
>>> loss = y.pow(2).mean() + gatedmoe.aux_loss(moe)
"""

from gatedmoe.experts import ExpertBank
from gatedmoe.layer import MoE, SharedExperts, aux_loss
from gatedmoe.routing import Routing

__version__ = "0.1.0"

__all__ = ["MoE", "Routing", "ExpertBank", "SharedExperts", "aux_loss", "__version__"]
