"""Gates (routers): one module per family, all reachable by name through the registry.

>>> from gatedmoe import gates
>>> "topk_softmax" in gates.names()
True
"""

from gatedmoe.gates import (  # noqa: F401  (registers the gates)
    cosine,
    dselect_k,
    expert_choice,
    group_limited,
    gumbel,
    hash,
    modified_softmax,
    sigmoid,
    softmax,
    switch,
    temperature,
    threshold,
    top_p,
    topk,
)
from gatedmoe.gates.balancing import BiasBalancer
from gatedmoe.gates.base import Gate, routing_from_dense
from gatedmoe.gates.cosine import CosineGate
from gatedmoe.gates.dselect_k import DSelectKGate
from gatedmoe.gates.expert_choice import ExpertChoiceGate
from gatedmoe.gates.group_limited import GroupLimitedGate
from gatedmoe.gates.gumbel import GumbelSoftmaxGate
from gatedmoe.gates.hash import HashGate
from gatedmoe.gates.modified_softmax import ModifiedSoftmaxGate
from gatedmoe.gates.registry import build, get, names, register
from gatedmoe.gates.sigmoid import SigmoidGate
from gatedmoe.gates.softmax import SoftmaxGate
from gatedmoe.gates.switch import SwitchGate
from gatedmoe.gates.temperature import TemperatureSoftmaxGate
from gatedmoe.gates.threshold import ThresholdGate
from gatedmoe.gates.top_p import TopPGate
from gatedmoe.gates.topk import TopKSoftmaxGate

__all__ = [
    "Gate",
    "BiasBalancer",
    "SoftmaxGate",
    "TopKSoftmaxGate",
    "SigmoidGate",
    "GroupLimitedGate",
    "SwitchGate",
    "TemperatureSoftmaxGate",
    "ModifiedSoftmaxGate",
    "GumbelSoftmaxGate",
    "HashGate",
    "ExpertChoiceGate",
    "DSelectKGate",
    "TopPGate",
    "ThresholdGate",
    "CosineGate",
    "routing_from_dense",
    "build",
    "get",
    "names",
    "register",
]
