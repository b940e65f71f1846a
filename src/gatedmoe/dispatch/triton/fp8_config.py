"""Kernel configs of the FP8 path (`fp8_kernels.py`): data, no code that launches anything;
importing this module never imports Triton.

Not measured yet: first choices for the H200 (sm90), to be replaced by measured ones
(the open measurements are listed in the kernels README). Blockwise kernels need ``BK`` =
the recipe's block, and the first GEMM ``BN`` = the block too (its epilogue quantises a
whole ``1 x block`` tile of each row of a).

Shape legend: D model dim, H expert hidden.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType

import torch

from gatedmoe.dispatch.triton.config import KernelConfig

__all__ = ["FP8_CONFIGS", "FP8_KERNELS", "fp8_kernel_configs"]

# "fp8_glu_fwd": gathered xq @ W_in^T with the SwiGLU epilogue (two [BM, BN] float32
# accumulators, gate and up, plus the slice products of the blockwise recipe: BM=64 keeps
# them in registers with 8 warps); "fp8_gemm": every other FP8 GEMM (the forward's second,
# the backward's two data-gradient GEMMs).
FP8_KERNELS = ("fp8_glu_fwd", "fp8_gemm")

# CUDA (sm90), block 128: chosen, not tuned (smem per stage: glu 8 + 32 KiB, gemm 16 + 16 KiB).
FP8_CONFIGS: Mapping[str, KernelConfig] = MappingProxyType({
    "fp8_glu_fwd": KernelConfig(64, 128, 128, 8, 4, tma=False),
    "fp8_gemm": KernelConfig(128, 128, 128, 8, 4, tma=False),
})


def fp8_kernel_configs(device: torch.device, block: int) -> dict[str, KernelConfig]:
    """The config of each kernel of `FP8_KERNELS` on ``device`` for the recipe's ``block``:
    the table above on CUDA (``BK`` and the first GEMM's ``BN`` set to ``block``), the
    smallest tiles in Triton's CPU interpreter.

    Examples
    --------
    >>> fp8_kernel_configs(torch.device("cpu"), 32)["fp8_glu_fwd"]
    KernelConfig(BM=16, BN=32, BK=32, warps=4, stages=1, group_m=8, tma=False, pregather=False)
    """
    if device.type != "cuda":
        cfgs = dict.fromkeys(FP8_KERNELS, KernelConfig(16, 16, 16, 4, 1, tma=False))
    else:
        cfgs = dict(FP8_CONFIGS)
    return {
        "fp8_glu_fwd": replace(cfgs["fp8_glu_fwd"], BN=block, BK=block),
        "fp8_gemm": replace(cfgs["fp8_gemm"], BK=block),
    }
