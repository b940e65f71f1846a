"""Layer variants built from the same parts as `gatedmoe.MoE` (gates, `Routing`,
`ExpertBank`, dispatch). One module per variant:

* `soft_moe.SoftMoE`: slots that mix every token (Puigcerver et al. 2023).
* `multi_head.MultiHeadMoE`: sub-tokens routed independently (MH-MoE, Wu et al. 2024).
* `depth.MixtureOfDepths`: a router picks which tokens a block processes (Raposo et al. 2024).
* `multi_task.MultiTaskMoE`: shared experts, one gate per task (MMoE, DSelect-k multi-task).
* `deep.DeepMoE`: stacked MoE layers, each with its own gate (Eigen et al. 2013).
* `input_scaled.InputScaledMoE`: routing weights scale the experts' inputs (Llama 4).
* `zero_compute.ZeroComputeMoE`: identity (zero-computation) experts beside the bank's
  (LongCat-Flash).

`upcycle` builds an `MoE` from a dense feed-forward (sparse and fine-grained upcycling).

The variants take the layer's settings as one `MoEConfig` (``from_config``): `DeepMoE` and
`MultiHeadMoE` build their layers with ``MoE.from_config``; `MultiTaskMoE` and `SoftMoE`
build no `MoE` and use the config fields named in their ``honoured`` attribute, refusing
(ValueError naming the field) any other setting that differs from its default.
"""

from gatedmoe.layers.deep import DeepMoE
from gatedmoe.layers.depth import MixtureOfDepths
from gatedmoe.layers.input_scaled import InputScaledMoE
from gatedmoe.layers.multi_head import MultiHeadMoE
from gatedmoe.layers.multi_task import MultiTaskMoE
from gatedmoe.layers.soft_moe import SoftMoE
from gatedmoe.layers.zero_compute import ZeroComputeMoE

__all__ = ["SoftMoE", "MultiHeadMoE", "MixtureOfDepths", "MultiTaskMoE", "DeepMoE", "InputScaledMoE", "ZeroComputeMoE"]
