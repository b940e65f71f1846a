"""Expert banks (stacked expert weights) and their activations."""

from gatedmoe.experts.activations import (
    Activation,
    ClampedSwiGLU,
    ExpandedGatedActivation,
    Float32SwiGLU,
    LimitedSwiGLU,
    SoftcappedSwiGLU,
    activation_names,
    get_activation,
)
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.experts.lora import ExpertLoRA

__all__ = [
    "ExpertBank",
    "ExpertLoRA",
    "Activation",
    "ExpandedGatedActivation",
    "ClampedSwiGLU",
    "LimitedSwiGLU",
    "Float32SwiGLU",
    "SoftcappedSwiGLU",
    "get_activation",
    "activation_names",
]
