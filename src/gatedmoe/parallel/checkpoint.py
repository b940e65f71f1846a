"""Checkpoints of expert-parallel models with ``torch.distributed.checkpoint`` (DCP),
reloadable on a different number of ranks.

Each `ExpertParallelMoE` holds a contiguous block of E / W experts; in the state dict these
functions hand to DCP, every sharded expert tensor (``experts.w_in`` ... and LoRA adapters)
is a ``DTensor`` sharded on its expert dim over the layer's group (``Shard(0)``), so DCP
records the global ``[E, ...]`` tensor and each rank's block of it. Loading on M ranks
asks for the blocks of the M-rank layout and DCP reads them from wherever they were
saved: N -> M resharding without a conversion step. Replicated tensors (gate, shared
experts, the rest of the model) are plain tensors: DCP writes one copy and every rank
reads it. A model under `gatedmoe.parallel.fsdp.fully_shard_expert_parallel` works the
same way: its FSDP2 parameters are DTensors already, and its expert tensors become the
global ``[E, ...]`` tensor sharded over both axes of the ``(ep, dp)`` mesh, so a checkpoint
moves between the two-dimensional layout and plain expert parallelism on any number of
ranks.

>>> save_expert_parallel(model, "ckpt/step100")  # on every rank  # doctest: +SKIP
>>> load_expert_parallel(model_on_m_ranks, "ckpt/step100")  # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from gatedmoe.parallel.expert_parallel import ExpertParallelMoE

__all__ = ["expert_parallel_state_dict", "load_expert_parallel", "save_expert_parallel"]


def _mesh(layer: ExpertParallelMoE, cache: dict) -> DeviceMesh:
    key = id(layer.group)
    if key not in cache:
        group = layer.group if layer.group is not None else dist.group.WORLD
        device = layer.experts.w_in.device.type
        cache[key] = DeviceMesh.from_group(group, device)
    return cache[key]


def _sharded_names(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, ExpertParallelMoE):
            for name, _ in m.experts.named_parameters():
                out[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = m
    return out


def _global_experts(t: DTensor, layer: ExpertParallelMoE) -> DTensor:
    """An expert tensor of a layer under `fully_shard_expert_parallel` (a DTensor over the
    ``dp`` axis holding this rank's ``ep`` block) as the global ``[E, ...]`` tensor,
    ``(Shard(0), Shard(0))`` over the ``(ep, dp)`` mesh: the ep blocks in order, each cut
    over dp as FSDP2 cut it (``torch.chunk``)."""
    shape = (t.shape[0] * layer.world_size, *t.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    mesh = layer.expert_mesh
    if mesh is None:
        raise ValueError("expert weights are DTensors but the layer was not sharded by fully_shard_expert_parallel")
    return DTensor.from_local(t.to_local(), mesh, [Shard(0), Shard(0)], run_check=False, shape=shape, stride=stride)


def expert_parallel_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every sharded expert tensor as a ``DTensor`` (``Shard(0)``
    over its layer's group; over both axes of the mesh after `fully_shard_expert_parallel`)
    that shares storage with the parameter."""
    sharded = _sharded_names(model)
    meshes: dict = {}
    sd = model.state_dict()
    for name, layer in sharded.items():
        t = sd[name]
        if isinstance(t, DTensor):
            sd[name] = _global_experts(t, layer)
        else:
            sd[name] = DTensor.from_local(t.detach(), _mesh(layer, meshes), [Shard(0)], run_check=False)
    return sd


def save_expert_parallel(model: nn.Module, path: str | os.PathLike, process_group: dist.ProcessGroup | None = None) -> None:
    """Save ``model`` with DCP under the directory ``path``; every rank of ``process_group``
    (default: the world) calls it."""
    dcp.save(expert_parallel_state_dict(model), checkpoint_id=os.fspath(path), process_group=process_group)


@torch.no_grad()
def load_expert_parallel(model: nn.Module, path: str | os.PathLike, process_group: dist.ProcessGroup | None = None) -> None:
    """Load a checkpoint of `save_expert_parallel` into ``model``, in place, whatever the
    number of ranks it was saved from (the experts' count E must match)."""
    sd = expert_parallel_state_dict(model)
    dcp.load(sd, checkpoint_id=os.fspath(path), process_group=process_group)
    own = model.state_dict()
    for name, value in sd.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        target = own[name].to_local() if isinstance(own[name], DTensor) else own[name]
        if target.data_ptr() != local.data_ptr():
            target.copy_(local)
