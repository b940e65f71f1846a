"""Hugging Face interop: convert the MoE blocks of transformers models to gatedmoe and back.

* `from_hf(block)`: an `HFMoEBlock` (gatedmoe's `MoE` plus what the family needs) that
  computes what ``block`` computes, with the same call signature and return convention.
* `to_hf(moe, like=block)`: the Hugging Face block class again, with gatedmoe's weights.
* `patch_model(model)`: swap every supported MoE block of a model in place; returns the
  list of swaps. `unpatch_model(model)` swaps them back.
* `upcycle_model(model, n_experts)`: a dense model's gated MLPs become upcycled gatedmoe
  `MoE` layers in one call (`upcycle_mlp` for one MLP; see `upcycle`).

Modules: `convert` (the functions above), `families` (one converter per model family),
`adapter` (`HFMoEBlock` and the Hugging Face flavoured gate), `kernels` (gatedmoe as
transformers' ``experts_implementation="gatedmoe"``, registered on import), `peft_export`
(expert LoRA as a PEFT adapter: `save_peft_adapter`, `load_peft_adapter`). See docs/interop.md.
"""

from gatedmoe.interop.hf.adapter import HFMoEBlock, HFTopKSoftmaxGate
from gatedmoe.interop.hf.convert import (
    Swap,
    from_hf,
    patch_model,
    supported_blocks,
    to_hf,
    unpatch_model,
)
from gatedmoe.interop.hf.kernels import _register_default as _register_experts_implementation
from gatedmoe.interop.hf.kernels import gatedmoe_experts_forward, register_experts_implementation
from gatedmoe.interop.hf.peft_export import (
    load_peft_adapter,
    peft_lora_state_dict,
    save_peft_adapter,
)
from gatedmoe.interop.hf.upcycle import is_dense_mlp, upcycle_mlp, upcycle_model

# transformers' experts_implementation="gatedmoe" (see `kernels`).
_register_experts_implementation()

__all__ = [
    "from_hf",
    "to_hf",
    "patch_model",
    "unpatch_model",
    "supported_blocks",
    "Swap",
    "HFMoEBlock",
    "HFTopKSoftmaxGate",
    "is_dense_mlp",
    "upcycle_mlp",
    "upcycle_model",
    "gatedmoe_experts_forward",
    "register_experts_implementation",
    "peft_lora_state_dict",
    "load_peft_adapter",
    "save_peft_adapter",
]
