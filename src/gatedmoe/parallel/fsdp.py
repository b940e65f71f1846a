"""Expert parallelism composed with FSDP2 on a two-dimensional ``DeviceMesh``.

A mesh ``(ep, dp)`` of ``W = ep * dp`` ranks; every rank holds its own tokens (data
parallel over all W ranks).

* Experts: sharded over the ``ep`` axis by `ExpertParallelMoE` (rank ``(i, j)`` owns the
  i-th block of E / ep experts; tokens reach them by all-to-all over its ``ep`` group),
  and each block sharded again with ``fully_shard`` over the ``dp`` axis (the ranks that
  hold the same experts) on its expert dim: ``E / (ep * dp)`` experts' weights at rest
  per rank, gathered for the bank's call (`ExpertBank.forward`).
* Everything else (gate, shared experts, the rest of the model): ``fully_shard`` over
  both axes as HSDP, sharded over ``dp`` and replicated over ``ep``.

Gradients are those of the mean of the W ranks' losses: HSDP averages the replicated
parameters over all W ranks; an expert's gradient already sums the tokens of its ``ep``
group (the all-to-all backward), FSDP sums it over ``dp`` and divides by W
(``set_gradient_divide_factor``). This is torchtitan's layout (experts' FSDP over the
data-parallel ranks that share experts, its gradient divide factor) with the non-expert
parameters as HSDP.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from gatedmoe.parallel.expert_parallel import ExpertParallelMoE

__all__ = ["fully_shard_expert_parallel"]


def _ranks(group: dist.ProcessGroup | None) -> list[int]:
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def fully_shard_expert_parallel(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    ep_dim: str = "ep",
    dp_dim: str = "dp",
    blocks: Iterable[nn.Module] = (),
    **fsdp_kwargs,
) -> nn.Module:
    """Apply FSDP2 to ``model`` whose `ExpertParallelMoE` layers shard their experts over
    ``mesh[ep_dim]``. Returns ``model`` (its class now also an ``FSDPModule``).

    Parameters
    ----------
    model : nn.Module
        Built on every rank with each `ExpertParallelMoE` on the group
        ``mesh[ep_dim].get_group()`` and ``expert_grad_scale=1`` (the default; the gradient
        scale is FSDP's divide factor here).
    mesh : DeviceMesh
        Two dimensions named ``ep_dim`` and ``dp_dim``, in that order (HSDP reads the first
        dim as the replicate dim), e.g. ``init_device_mesh("cuda", (ep, dp),
        mesh_dim_names=("ep", "dp"))``.
    blocks : iterable of nn.Module
        Submodules of ``model`` that get their own HSDP unit (e.g. each transformer block,
        as torchtitan wraps them), so their parameters are gathered one block at a time;
        the rest of ``model`` forms the root unit. Default: the root unit only.
    **fsdp_kwargs
        Passed to every ``fully_shard`` call (``mp_policy``, ``reshard_after_forward``, ...).

    Examples
    --------
    On 4 ranks (2 x 2), under ``torchrun --nproc_per_node 4``:

    >>> mesh = init_device_mesh("cuda", (2, 2), mesh_dim_names=("ep", "dp"))  # doctest: +SKIP
    >>> for block in model.layers:  # doctest: +SKIP
    ...     block.moe = shard_experts(block.moe, mesh["ep"].get_group())
    >>> fully_shard_expert_parallel(model, mesh, blocks=model.layers)  # doctest: +SKIP
    >>> loss = task_loss(model(my_tokens)); loss.backward(); optimizer.step()  # doctest: +SKIP
    """
    from torch.distributed.fsdp import fully_shard

    if mesh.ndim != 2 or mesh.mesh_dim_names != (ep_dim, dp_dim):
        raise ValueError(
            f"mesh must have the two dims ({ep_dim!r}, {dp_dim!r}) in that order, got "
            f"{mesh.mesh_dim_names} of shape {tuple(mesh.shape)}"
        )
    ep_ranks = _ranks(mesh[ep_dim].get_group())
    layers = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    if not layers:
        raise ValueError("model has no ExpertParallelMoE layer (shard_experts first)")
    for layer in layers:
        if _ranks(layer.group) != ep_ranks:
            raise ValueError(
                f"an ExpertParallelMoE shards its experts over ranks {_ranks(layer.group)}, "
                f"the mesh's {ep_dim!r} group on this rank is {ep_ranks}"
            )
        if layer.expert_grad_scale != 1.0:
            raise ValueError(
                f"expert_grad_scale must be 1 under fully_shard_expert_parallel, got {layer.expert_grad_scale}"
            )
        fully_shard(layer.experts, mesh=mesh[dp_dim], **fsdp_kwargs)
        # Where the expert blocks live, for checkpoints (`gatedmoe.parallel.checkpoint`).
        layer.expert_mesh = mesh
        # Reduce-scatter sums over dp; the all-to-all backward summed over ep: the mean over W.
        layer.experts.set_gradient_divide_factor(float(mesh.size()))
        if dist.get_backend(mesh[dp_dim].get_group()) == "gloo":
            # A divide factor other than the dp size makes FSDP reduce with NCCL's
            # PREMUL_SUM, which gloo lacks: sum, then divide.
            layer.experts.set_force_sum_reduction_for_comms(True)
    for block in blocks:
        fully_shard(block, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model
