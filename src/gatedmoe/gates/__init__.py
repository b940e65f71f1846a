"""Gates (routers): one module per family, all reachable by name through the registry.

>>> from gatedmoe import gates
>>> "topk_softmax" in gates.names()
True
"""

from gatedmoe.gates import (  # noqa: F401  (registers the gates)
    group_limited,
    sigmoid,
    softmax,
    topk,
)
from gatedmoe.gates.balancing import BiasBalancer
from gatedmoe.gates.base import Gate
from gatedmoe.gates.group_limited import GroupLimitedGate
from gatedmoe.gates.registry import build, get, names, register
from gatedmoe.gates.sigmoid import SigmoidGate
from gatedmoe.gates.softmax import SoftmaxGate
from gatedmoe.gates.topk import TopKSoftmaxGate

__all__ = [
    "Gate",
    "BiasBalancer",
    "SoftmaxGate",
    "TopKSoftmaxGate",
    "SigmoidGate",
    "GroupLimitedGate",
    "build",
    "get",
    "names",
    "register",
]
