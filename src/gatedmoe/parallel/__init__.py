"""Expert parallelism over torch.distributed: experts sharded over the ranks of a process
group, tokens exchanged with all-to-all (NCCL on GPUs, gloo on CPU).

>>> from gatedmoe.parallel import shard_experts  # then, on every rank:  # doctest: +SKIP
>>> ep_moe = shard_experts(gatedmoe.MoE(64, n_experts=8, d_hidden=128))  # doctest: +SKIP

See `expert_parallel` for the semantics and ``examples/expert_parallel.py`` for a
``torchrun`` script; `checkpoint` saves and loads sharded models with
torch.distributed.checkpoint, on any number of ranks (imported on use);
`fsdp.fully_shard_expert_parallel` composes expert parallelism with FSDP2 on a 2-D mesh
(imported on use).
"""

from gatedmoe.parallel.comm import ExchangeStats, all_gather_counts, all_to_all
from gatedmoe.parallel.expert_parallel import (
    ExpertParallelMoE,
    exclude_experts_from_ddp,
    expert_parallel_dispatch,
    expert_parameters,
    local_expert_range,
    shard_experts,
)

__all__ = [
    "ExchangeStats",
    "ExpertParallelMoE",
    "all_gather_counts",
    "all_to_all",
    "exclude_experts_from_ddp",
    "expert_parallel_dispatch",
    "expert_parameters",
    "local_expert_range",
    "shard_experts",
]
