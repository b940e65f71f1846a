"""Compile every variant of the LoRA kernels (`gatedmoe.dispatch.triton.lora_kernels`, and
`kernels.wgrad_kernel` as the adapter gradients use it) for an sm90 GPU without a GPU, with
whatever Triton is importable, and report ptxas' register spills. Not a pytest module.

The interpreter (TRITON_INTERPRET=1, the CPU tests) accepts code that the GPU's compiler
rejects; this catches those cases before a GPU run, e.g. with the GPU's Triton 3.6:

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36:src python tests/dispatch/compile_lora_kernels.py

Exits non-zero if a variant fails to compile, or if the control kernel (reading a global
that is not a constexpr, which the compiler must reject) compiles.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gatedmoe.dispatch.triton import kernels, lora_kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared compile helper
from compile_sm90 import run  # noqa: E402


def variants():
    """``(name, kernel, argument types, constexprs, warps, stages)`` with the CUDA configs of
    `config.kernel_configs` (bf16: 128-row tiles, 8 warps; float32: 64 x 64 x 32, 4 warps)."""
    for dt in ("bf16", "fp32"):
        p, prec = f"*{dt}", "ieee" if dt == "fp32" else "tf32"
        BM, BN, BK, launch = (128, 128, 64, (8, 4)) if dt == "bf16" else (64, 64, 32, (4, 2))
        for w_desc, x_desc in ((False, False), (True, False), (False, True), (True, True)):
            if dt == "fp32" and (w_desc or x_desc):
                continue  # TMA descriptors: 16-bit on CUDA
            types = dict(x_ptr=p, token_ptr="*i64", w_ptr=p, z_ptr=p, lb_ptr=p, h_ptr=p, a_ptr=p, counts_ptr="*i64",
                         E="i32", n_tiles="i32", D="i32", H="i32", R="i32")
            if w_desc:
                types["w_ptr"] = f"tensordesc<{dt}[2, 128, 64]>"
            if x_desc:
                types["x_ptr"] = f"tensordesc<{dt}[128, 64]>"
            consts = dict(BM=BM, BN=BN, BK=BK, BR=16, PREC=prec, GROUP_M=8, E_POW2=16, STORE_H=True, W_DESC=w_desc,
                          X_DESC=x_desc)
            name = f"lora_glu_fwd {dt} W_DESC={w_desc} X_DESC={x_desc}"
            yield name, lora_kernels.lora_glu_fwd_kernel, types, consts, *launch
        for lora in (False, True):
            for a_desc, b_desc, gather in ((False, 0, True), (False, 0, False), (True, 1, False), (True, 2, False)):
                if (a_desc or b_desc) and (dt == "fp32" or not lora):
                    continue
                types = dict(a_ptr=p, b_ptr=p, c_ptr=p, z_ptr=p, l_ptr=p, token_ptr="*i64", weight_ptr="*fp32",
                             counts_ptr="*i64", E="i32", n_tiles="i32", K="i32", N_COLS="i32", R="i32", alpha="fp32",
                             stride_am="i32", stride_be="i32", stride_bk="i32", stride_bn="i32", stride_cm="i32",
                             stride_le="i32", stride_lr="i32", stride_ln="i32", b_rows_per_e="i32")
                if a_desc:
                    types["a_ptr"] = f"tensordesc<{dt}[128, 64]>"
                if b_desc:
                    types["b_ptr"] = f"tensordesc<{dt}[256, 64]>" if b_desc == 1 else f"tensordesc<{dt}[64, 256]>"
                for scatter in (False, True):
                    consts = dict(GATHER_A=gather, SCALE=scatter, SCATTER_C=scatter, LORA=lora, A_DESC=a_desc,
                                  B_DESC=b_desc, BM=BM, BN=(2 * BN if dt == "bf16" else BN) if lora else 16, BK=BK,
                                  BR=16, PREC=prec, GROUP_M=8, E_POW2=16)
                    name = f"lora_gemm {dt} LORA={lora} A_DESC={a_desc} B_DESC={b_desc} gather={gather} scatter={scatter}"
                    yield name, lora_kernels.lora_gemm_kernel, types, consts, *launch
        types = dict(l_ptr=p, r_ptr=p, out_ptr="*fp32", token_ptr="*i64", counts_ptr="*i64", E="i32", P="i32", Q="i32",
                     stride_l="i32", stride_r="i32")
        for gather_l, gather_r, bm, bn in ((False, True, 16, BN), (True, False, BM, 16), (False, False, BM, 16)):
            consts = dict(GATHER_L=gather_l, GATHER_R=gather_r, L_DESC=False, R_DESC=False, BM=bm, BN=bn, BK=BK,
                          PREC=prec, E_POW2=16)
            name = f"wgrad {dt} gather_l={gather_l} gather_r={gather_r} {bm}x{bn}"
            yield name, kernels.wgrad_kernel, types, consts, 4, 4 if dt == "bf16" else 2


if __name__ == "__main__":
    sys.exit(run(variants(), sys.argv[1] if len(sys.argv) > 1 else ""))
