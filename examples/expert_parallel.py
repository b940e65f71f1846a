"""Expert parallelism with torchrun: experts sharded over the ranks, the rest under DDP,
or (``--ep``) with FSDP2 on a two-dimensional mesh.

    torchrun --nproc_per_node 2 examples/expert_parallel.py            # CPU, gloo
    torchrun --nproc_per_node 4 examples/expert_parallel.py --cuda     # GPUs, NCCL
    torchrun --nproc_per_node 4 examples/expert_parallel.py --ep 2     # 2 x 2 mesh, FSDP2

Each rank trains on its own batches. The MoE's 8 experts are split over the ranks (4 each
with 2 ranks); its gate and the dense layers around it are replicated and averaged by
DDP. Tokens travel to the rank that owns their experts with all-to-all and come back.
With ``--ep N`` the ranks form an ``(ep=N, dp=W/N)`` mesh: experts split over ep (by
all-to-all) and each block over dp by ``fully_shard``, the rest HSDP
(`gatedmoe.parallel.fsdp.fully_shard_expert_parallel`).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from gatedmoe import MoE, aux_loss
from gatedmoe.parallel import exclude_experts_from_ddp, shard_experts
from gatedmoe.parallel.fsdp import fully_shard_expert_parallel


class Block(nn.Module):
    """Pre-norm residual MoE block on top of a linear embedding, with a linear head."""

    def __init__(self, d_in: int, d_model: int, n_experts: int, d_out: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.moe = MoE(d_model, n_experts, d_hidden=2 * d_model, k=2)
        self.head = nn.Linear(d_model, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.moe(self.norm(h))
        return self.head(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="NCCL on cuda:LOCAL_RANK")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ep", type=int, default=0, help="expert-parallel size of a 2-D (ep, dp) mesh with FSDP2")
    args = parser.parse_args()

    if args.cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # Same seed everywhere: every rank builds the full model, then keeps its own experts.
    torch.manual_seed(0)
    model = Block(d_in=32, d_model=64, n_experts=8, d_out=1).to(device)
    if args.ep:
        if world % args.ep:
            parser.error(f"--ep {args.ep} must divide the {world} ranks")
        mesh = init_device_mesh(device.type, (args.ep, world // args.ep), mesh_dim_names=("ep", "dp"))
        model.moe = shard_experts(model.moe, mesh["ep"].get_group())
        net = fully_shard_expert_parallel(model, mesh)
    else:
        # Its own group, so the all-to-alls never interleave with DDP's all-reduces; expert
        # gradients scaled by 1/W like the replicated ones DDP averages.
        ep_group = dist.new_group()
        model.moe = shard_experts(model.moe, ep_group, expert_grad_scale=1 / world)
        net = DistributedDataParallel(exclude_experts_from_ddp(model))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if rank == 0:
        print(f"{world} ranks, {model.moe.experts.n_experts} of {model.moe.n_experts} experts per rank")

    # A regression task with different data on every rank.
    g = torch.Generator(device=device).manual_seed(1 + rank)
    w_true = torch.randn(32, 1, generator=torch.Generator().manual_seed(0)).to(device)
    for step in range(args.steps):
        x = torch.randn(256, 32, generator=g, device=device)
        target = torch.sin(x @ w_true)
        loss = nn.functional.mse_loss(net(x), target)
        opt.zero_grad(set_to_none=True)
        (loss + aux_loss(model)).backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            stats = torch.stack([loss.detach(), torch.tensor(model.moe.load_imbalance(), device=device)])
            dist.all_reduce(stats)
            if rank == 0:
                print(
                    f"step {step:3d}  loss {stats[0].item() / world:.4f}  "
                    f"load imbalance across ranks {stats[1].item() / world:.3f}"
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
