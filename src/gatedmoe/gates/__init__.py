"""Gates (routers): one module per family, all reachable by name through the registry.

>>> from gatedmoe import gates
>>> "topk_softmax" in gates.names()
True
"""

from gatedmoe.gates import sigmoid, softmax, topk  # noqa: F401  (registers the gates)
from gatedmoe.gates.balancing import BiasBalancer
from gatedmoe.gates.base import Gate
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
    "build",
    "get",
    "names",
    "register",
]
