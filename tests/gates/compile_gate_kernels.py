"""Compile every variant of the top-k sort kernels (`gatedmoe.gates.topk_sort_kernels`) and of
the fused gate's forward and backward (`gatedmoe.gates.fused_topk_kernels`) for an sm90 GPU
without a GPU, with whatever Triton is importable, and report ptxas' register spills.
Not a pytest module.

The interpreter (TRITON_INTERPRET=1, the CPU tests) accepts code that the GPU's compiler
rejects; this catches those cases before a GPU run, e.g. with the GPU's Triton 3.6:

    PYTHONPATH=/tmp/t36:src python tests/gates/compile_gate_kernels.py [NAME_PART]

Exits non-zero if a variant fails to compile, or if the control kernel compiles.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gatedmoe.gates import fused_topk, fused_topk_kernels, topk_sort, topk_sort_kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared compile helper
from compile_sm90 import run  # noqa: E402


def variants():
    """``(name, kernel, argument types, constexprs, warps, stages)`` over the blocks `topk_sort`
    launches (E = 1, 8, 256, 4096), K in {1, 3, 8, 16}, int32/int64 ids and three weight dtypes."""
    tiles = dict(BN=topk_sort._BN, S=topk_sort._RANK_TILE)
    for E in (1, 8, 256, 4096):
        BE = topk_sort._pow2(E)
        for ids in ("*i32", "*i64"):
            types = dict(experts_ptr=ids, hist_ptr="*i32", N="i32", E="i32")
            consts = dict(BN=topk_sort._BN, BE=BE)
            yield f"topk_hist E={E} ids={ids}", topk_sort_kernels.topk_hist_kernel, types, consts, topk_sort._WARPS, 1
            for K in (1, 3, 8, 16):
                for w in ("*fp32", "*bf16", "*fp16"):
                    for one in (True, False):
                        types = dict(experts_ptr=ids, weights_ptr=w, prefix_ptr="*i64" if one else "*i32",
                                     counts_ptr="*i64", token_ptr="*i64", expert_ptr="*i64", weight_ptr=w,
                                     pos_ptr="*i64", ok_ptr="*i32", N="i32", E="i32")
                        consts = dict(K=K, **tiles, BE=BE, ONE_PROGRAM=one)
                        name = f"topk_sort E={E} K={K} ids={ids} w={w} one={one}"
                        yield name, topk_sort_kernels.topk_sort_kernel, types, consts, topk_sort._WARPS, 1
    for CH in (1, 8, 1024):
        types = dict(hist_ptr="*i32", prefix_ptr="*i32", counts_ptr="*i64", ok_ptr="*i32", NB="i32", E="i32")
        yield f"topk_scan CH={CH}", topk_sort_kernels.topk_scan_kernel, types, dict(CH=CH), 4, 1
    # The fused gate's kernels over its tiles (`fused_topk._blocks`), as `fused_topk` launches them.
    for E, k, n_group, topk_group in ((8, 2, 1, 1), (64, 6, 1, 1), (256, 8, 8, 4), (4096, 16, 1, 1)):
        BT, BE = fused_topk._blocks(E)
        e_type = "i32:16" if E % 16 == 0 else "i32"  # as the JIT specialises E
        for score in (0, 1):
            for bias, sort, w in ((False, False, "*fp32"), (True, False, "*fp32"), (False, True, "*fp32"),
                                  (True, True, "*bf16"), (False, True, "*fp16"), (False, True, "*fp64")):
                # Without SORT its six pointers are lse's (float32), as `fused_topk._route` passes them.
                s = ("*i64", "*i64", "*i64", w, "*i64", "*i32") if sort else ("*fp32",) * 6
                types = dict(logits_ptr="*fp32", bias_ptr="*fp32", probs_ptr="*fp32", lse_ptr="*fp32",
                             weights_ptr="*fp32", experts_ptr="*i32",
                             **dict(zip(("counts_ptr", "token_ptr", "sorted_expert_ptr", "sorted_weight_ptr", "pos_ptr",
                                         "ok_ptr"), s, strict=True)),
                             T="i32", E=e_type, scale="fp32", mask_value="fp32")
                consts = dict(K=k, BK=topk_sort._pow2(k), BT=BT, BE=BE, SCORE=score, HAS_BIAS=bias, NORMALIZE=True,
                              N_GROUP=n_group, TOPK_GROUP=topk_group, SORT=sort, SORT_BN=topk_sort._ONE_PROGRAM_N,
                              SORT_S=topk_sort._RANK_TILE)
                name = f"route_fwd E={E} k={k} groups={n_group} score={score} bias={bias} sort={sort} w={w}"
                yield name, fused_topk_kernels.route_fwd_kernel, types, consts, 4, 1
            types = dict(saved_ptr="*fp32", lse_ptr="*fp32", weights_ptr="*fp32", experts_ptr="*i32", pos_ptr="*i64",
                         g_weight_ptr="*fp32", g_probs_ptr="*fp32", g_lse_ptr="*fp32", g_logits_ptr="*fp32", T="i32",
                         E=e_type, scale="fp32")
            consts = dict(K=k, BT=BT, BE=BE, SCORE=score, NORMALIZE=True, HAS_GW=True, HAS_GP=True, HAS_GLSE=True)
            name = f"route_bwd E={E} k={k} score={score}"
            yield name, fused_topk_kernels.route_bwd_kernel, types, consts, 4, 1


if __name__ == "__main__":
    sys.exit(run(variants(), sys.argv[1] if len(sys.argv) > 1 else ""))  # [NAME_PART]: only names containing it
