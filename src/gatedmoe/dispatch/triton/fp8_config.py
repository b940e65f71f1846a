"""Kernel configs of the FP8 path (`fp8_kernels.py`): data, no code that launches anything;
importing this module never imports Triton.

Not measured yet: first choices for the H200 (sm90), to be replaced by measured ones
(the open measurements are listed in the kernels README). Blockwise kernels need ``BK`` =
the recipe's block, and the first GEMM ``BN`` = the block too (its epilogue quantises a
whole ``1 x block`` tile of each row of a).

Shape legend: D model dim, H expert hidden.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import astuple, replace
from types import MappingProxyType

import torch

from gatedmoe.dispatch.triton.config import KernelConfig, ints_to_configs

__all__ = [
    "FP8_CONFIGS",
    "FP8_CONFIG_INTERPRETER",
    "FP8_KERNELS",
    "fp8_configs_from_ints",
    "fp8_configs_to_ints",
    "fp8_kernel_configs",
]

# "fp8_glu_fwd": gathered xq @ W_in^T with the SwiGLU epilogue (two [BM, BN] float32
# accumulators, gate and up, plus the slice products of the blockwise recipe: BM=64 keeps
# them in registers with 8 warps); "fp8_gemm": every other FP8 GEMM (the forward's second,
# the backward's two data-gradient GEMMs). The weight gradients are not FP8 (kernels README,
# "FP8": tried and dropped). `fp8_configs_to_ints` names a kernel by its index here.
FP8_KERNELS = ("fp8_glu_fwd", "fp8_gemm")

# CUDA (sm90), block 128: chosen, not tuned (smem per stage: glu 8 + 32 KiB, gemm 16 + 16 KiB).
# With ``tma`` the weight operand, and the activation rows where they are read in order (the
# forward's second GEMM, the backward's dL/dx GEMM), go through TMA descriptors; gathered rows
# (the first GEMM, the backward's gy GEMM) are pointer loads (TMA cannot gather on Hopper).
FP8_CONFIGS: Mapping[str, KernelConfig] = MappingProxyType({
    "fp8_glu_fwd": KernelConfig(64, 128, 128, 8, 4),
    "fp8_gemm": KernelConfig(128, 128, 128, 8, 4),
})
# The blockwise recipe's GEMM waits for each product before scaling it (kernels README, "FP8"):
# 64-row tiles on 4 warps fit two programs per SM, one's products overlapping the other's wait
# (measured on an H200: forward+backward 1-7% faster than 128 x 128 on 8 warps).
FP8_GEMM_BLOCKWISE = KernelConfig(64, 128, 128, 4, 4)
# Triton's CPU interpreter: the smallest tiles; TMA too (the interpreter emulates it), so the
# tests run the GPU's code path.
FP8_CONFIG_INTERPRETER = KernelConfig(16, 16, 16, 4, 1)


def fp8_kernel_configs(device: torch.device, block: int, scaling: str = "blockwise",
                       overrides: Mapping[str, KernelConfig] | None = None) -> dict[str, KernelConfig]:
    """The config of each kernel of `FP8_KERNELS` on ``device`` for the recipe's ``block``:
    the table above on CUDA, the smallest tiles in Triton's CPU interpreter, with ``BK`` (and
    the first GEMM's ``BN``) set to ``block``; then ``overrides`` (`TritonOptions.configs`'
    FP8 entries) as given.

    Raises
    ------
    ValueError
        An override with ``pregather=True``, or a blockwise override whose ``BK`` (or, for
        "fp8_glu_fwd", ``BN``) is not ``block``: each step of the reduction is one scale
        block, and the first GEMM's epilogue quantises one whole ``1 x block`` tile of a.

    Examples
    --------
    >>> fp8_kernel_configs(torch.device("cpu"), 32)["fp8_glu_fwd"]
    KernelConfig(BM=16, BN=32, BK=32, warps=4, stages=1, group_m=8, tma=True, pregather=False)
    """
    base = FP8_CONFIGS if device.type == "cuda" else dict.fromkeys(FP8_KERNELS, FP8_CONFIG_INTERPRETER)
    if device.type == "cuda" and scaling == "blockwise":
        base = {**base, "fp8_gemm": FP8_GEMM_BLOCKWISE}
    cfgs = {
        "fp8_glu_fwd": replace(base["fp8_glu_fwd"], BN=block, BK=block),
        "fp8_gemm": replace(base["fp8_gemm"], BK=block),
    }
    for name, cfg in (overrides or {}).items():
        if name not in FP8_KERNELS:
            continue
        if cfg.pregather:  # measured slower than the gathered loads and removed (kernels README, "FP8")
            raise ValueError(f"configs[{name!r}]: the FP8 kernels read gathered rows directly; pregather=True "
                             "is not an FP8 option")
        if scaling == "blockwise" and (cfg.BK != block or (name == "fp8_glu_fwd" and cfg.BN != block)):
            raise ValueError(f"configs[{name!r}]: each reduction step must be one scale block: "
                             f"BK{' and BN' if name == 'fp8_glu_fwd' else ''} = block = {block}, got {cfg}")
        cfgs[name] = cfg
    return cfgs




def fp8_configs_to_ints(configs: Mapping[str, KernelConfig] | None) -> list[int]:
    """The FP8 kernels' entries of ``configs`` flattened to ints (index in `FP8_KERNELS`, then
    each field; other names skipped), the form a `torch.library` custom op takes; ``[]`` for none.

    Examples
    --------
    >>> fp8_configs_from_ints(fp8_configs_to_ints({"fp8_gemm": FP8_CONFIG_INTERPRETER}))["fp8_gemm"].BM
    16
    """
    out: list[int] = []
    for name, cfg in (configs or {}).items():
        if name in FP8_KERNELS:
            out += [FP8_KERNELS.index(name), *(int(v) for v in astuple(cfg))]
    return out


def fp8_configs_from_ints(ints: Sequence[int] | None) -> dict[str, KernelConfig]:
    """Inverse of `fp8_configs_to_ints`."""
    return ints_to_configs(ints, FP8_KERNELS, "FP8 configs as ints")
