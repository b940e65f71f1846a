"""`ExpertParallelMoE` on 2 and 4 gloo processes against the single-process `MoE`.

One spawn per world size runs every case (spawning costs seconds); each test then
compares one case. ``ref_*`` is the single-process layer on the concatenation of all
ranks' tokens, ``fast_*`` the sharded layer's results gathered from the ranks.
"""

from __future__ import annotations

import pytest
import torch
from ep_cases import (
    CASES,
    E,
    balance_inputs,
    build_balance_moe,
    ckpt_input,
    ckpt_moe,
    ddp_reference,
    fsdp2d_reference,
    reference,
    run_balance,
)
from torch.distributed.tensor import Replicate, Shard

from gatedmoe import MoE
from gatedmoe.parallel import shard_experts
from helpers import assert_close


@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_single_process(runs, case_name):
    W, per_rank = runs
    case = CASES[case_name]
    ref = reference(case, W)
    fast = [r[case_name] for r in per_rank]
    # Gates compute in float32 whatever the input dtype, and the router's matmul rounds
    # differently for different batch sizes (one rank's tokens vs all of them), so a
    # float64 case is float32-accurate wherever the combine weights enter: everywhere.
    dtype = torch.float32 if case.dtype == torch.float64 else case.dtype
    for r in range(W):
        assert_close(f"y rank {r}", ref["y"][r], fast[r]["y"], dtype)
        assert_close(f"x.grad rank {r}", ref["x_grad"][r], fast[r]["x_grad"], dtype)
        for k, v in ref["aux"][r].items():
            assert_close(f"aux {k} rank {r}", v, fast[r]["aux"][k], dtype)
        assert sorted(ref["aux"][r]) == sorted(fast[r]["aux"])
        assert_close(f"counts rank {r}", ref["counts"], fast[r]["counts"])
        for n, b in ref["buffers"].items():
            assert_close(f"buffer {n} rank {r}", b, fast[r]["buffers"][n], dtype)
    for n, ref_g in ref["param_grads"].items():
        if n.startswith("experts."):
            # Each rank holds a contiguous block of E/W experts: concatenate the shards.
            assert fast[0]["param_grads"][n].shape[0] == E // W
            fast_g = torch.cat([f["param_grads"][n] for f in fast])
        else:
            # Replicated parameters: per-rank gradients, summed as DDP would (times W).
            fast_g = torch.stack([f["param_grads"][n] for f in fast]).sum(0)
        assert_close(f"grad {n}", ref_g, fast_g, dtype)


def test_load_report(runs):
    W, per_rank = runs
    for case_name in CASES:
        counts_WE = per_rank[0][case_name]["counts"]
        load = per_rank[0][case_name]["rank_load"]
        assert load.tolist() == counts_WE.sum(0).view(W, -1).sum(-1).tolist()
        for r in range(W):
            assert per_rank[r][case_name]["expert_range"] == (r * E // W, (r + 1) * E // W)
            assert torch.equal(per_rank[r][case_name]["rank_load"], load)


def test_idle_ranks(runs):
    """The zero-experts case leaves whole ranks without work (W=2: rank 1); they still run
    the exchanges and get zero expert gradients."""
    W, per_rank = runs
    load = per_rank[0]["zero_experts"]["rank_load"]
    assert (load == 0).any()
    for r in range(W):
        if load[r] == 0:
            for n, g in per_rank[r]["zero_experts"]["param_grads"].items():
                if n.startswith("experts."):
                    assert g is not None and not g.any(), n


def test_bad_arguments_raise(runs):
    W, per_rank = runs
    errors = per_rank[0]["errors"]
    assert "n_experts=5 must be divisible" in errors["n_experts"]
    assert "send_splits sums to" in errors["splits"]
    assert "expert_grad_scale" in errors["expert_grad_scale"]


def test_ranks_may_differ_in_input_requires_grad(runs):
    """Only rank 0's input requires grad: the backward exchanges still run on every rank
    (no deadlock) and the gradients are those of the all-inputs run."""
    W, per_rank = runs
    for r in range(W):
        full, mixed = per_rank[r]["topk2"], per_rank[r]["mixed_input_grad"]
        assert (mixed["x_grad"] is None) == (r != 0)
        for n, g in full["param_grads"].items():
            assert torch.equal(g, mixed["param_grads"][n]), n
    assert torch.equal(per_rank[0]["topk2"]["x_grad"], per_rank[0]["mixed_input_grad"]["x_grad"])


def test_direct_constructor_equals_shard_experts(runs):
    W, per_rank = runs
    for r in range(W):
        direct, sharded = per_rank[r]["direct"]["direct"], per_rank[r]["direct"]["sharded"]
        assert sorted(direct) == sorted(sharded)
        for n in direct:
            assert torch.equal(direct[n], sharded[n]), n
        assert direct["experts.w_in"].shape[0] == E // W


def test_needs_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_experts(MoE(16, 4, 8))


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_composes_with_data_parallel(runs_w2, wrapper):
    """DDP or FSDP2 over the replicated parameters, experts excluded: every gradient is
    the single-process one divided by W (the mean of the ranks' losses)."""
    W, per_rank = runs_w2
    ref = ddp_reference(W)
    fast = [r[wrapper] for r in per_rank]
    for r in range(W):
        assert_close(f"y rank {r}", ref["y"][r], fast[r]["y"])
        assert_close(f"x.grad rank {r}", ref["x_grad"][r], fast[r]["x_grad"])
    for n, ref_g in ref["param_grads"].items():
        if ".experts." in n:
            fast_g = torch.cat([f["param_grads"][n] for f in fast])
        else:
            # Averaged over the ranks: every rank holds the same gradient.
            for f in fast[1:]:
                assert_close(f"DDP-synced grad {n}", fast[0]["param_grads"][n], f["param_grads"][n])
            fast_g = fast[0]["param_grads"][n]
        assert_close(f"grad {n}", ref_g, fast_g)


def test_global_batch_balance_sees_global_counts(runs):
    """``load_balance_scope="global_batch"`` and ``bias_update_every="step"`` under expert
    parallelism: each rank's loss takes f from the counts of every rank and of the step's
    micro-batches so far, P from its own tokens; the mean over ranks is the one-process
    loss on all ranks' tokens, and the bias after `balance_step` is the one-process bias."""
    W, per_rank = runs
    fast = [r["balance"] for r in per_rank]
    ref = run_balance(build_balance_moe().train(), list(balance_inputs(W).flatten(1, 2)))
    step_counts = torch.zeros(E, dtype=torch.long)
    for j in range(3):
        if j == 2:  # balance_step after micro-batch 1 started a new step
            step_counts.zero_()
        step_counts += ref["counts"][j]
        assert_close(f"counts {j}", ref["counts"][j], sum(f["counts"][j] for f in fast))
        f_E = step_counts.double() / step_counts.sum()
        for r in range(W):
            P_E = ref["probs"][j].double().unflatten(0, (W, -1))[r].mean(0)
            assert_close(f"loss {j} rank {r} by hand", E * (f_E * P_E).sum(), fast[r]["loss"][j].double(), torch.float32)
        assert_close(f"mean loss {j}", ref["loss"][j], torch.stack([f["loss"][j] for f in fast]).mean())
    for r in range(W):
        assert_close(f"bias rank {r}", ref["bias"], fast[r]["bias"])
    assert ref["bias"].abs().sum() > 0


def test_checkpoint_reshards_between_world_sizes(runs_w4):
    """torch.distributed.checkpoint: saved on 4 ranks and loaded on 2, saved on 2 and loaded
    on 4 (into layers built from other weights): the outputs are the saved model's."""
    W, per_rank = runs_w4
    for r in range(W):
        x = ckpt_input(r)
        fast = per_rank[r]["checkpoint"]
        if r < 2:
            assert_close(f"4->2 y rank {r}", ckpt_moe(20)(x).detach(), fast["4to2"])
        assert_close(f"2->4 y rank {r}", ckpt_moe(21)(x).detach(), fast["2to4"])


def test_composes_with_fsdp2_on_a_2d_mesh(runs_w4):
    """4 gloo ranks, mesh ("ep", "dp") = (2, 2): experts sharded over ep (all-to-all) and
    each block over dp by FSDP2, the rest HSDP (`fully_shard_expert_parallel`). Against
    one process on all ranks' tokens: outputs, input gradients, every parameter gradient
    (of the mean of the ranks' losses), the parameters after one SGD step and the outputs
    after it, also after a DCP checkpoint of the stepped model is loaded into another 2-D
    model and into plain expert parallelism on 2 ranks."""
    W, per_rank = runs_w4
    ref = fsdp2d_reference(W)
    fast = [r["fsdp2d"] for r in per_rank]
    for r in range(W):
        assert "no ExpertParallelMoE" in fast[r]["refused"]
        assert fast[r]["expert_local_shape"][0] == E // W
        assert fast[r]["gate_placements"] == [str(Replicate()), str(Shard(0))]
        assert_close(f"y rank {r}", ref["y"][r], fast[r]["y"])
        assert_close(f"x.grad rank {r}", ref["x_grad"][r], fast[r]["x_grad"])
        assert_close(f"y after the step rank {r}", ref["y_after"][r], fast[r]["y_after"])
        # The stepped model through a checkpoint: into the 2-D layout again (4 ranks) and
        # into plain expert parallelism on 2 ranks, from other weights.
        assert_close(f"loaded 2-D rank {r}", ref["y_after"][r], fast[r]["loaded_2d"])
        if r < 2:
            assert_close(f"loaded on 2 EP ranks, rank {r}", ref["y_after"][r], fast[r]["loaded_plain_w2"])
    for key in ("param_grads", "params"):
        for n, ref_t in ref[key].items():
            if ".experts." in n:
                # Ranks with the same ep rank hold the same block (gathered over dp).
                blocks = {}
                for f in fast:
                    if f["ep_rank"] in blocks:
                        assert torch.equal(blocks[f["ep_rank"]], f[key][n]), n
                    blocks[f["ep_rank"]] = f[key][n]
                fast_t = torch.cat([blocks[i] for i in range(len(blocks))])
            else:
                for f in fast[1:]:
                    assert torch.equal(fast[0][key][n], f[key][n]), n
                fast_t = fast[0][key][n]
            assert_close(f"{key} {n}", ref_t, fast_t)

