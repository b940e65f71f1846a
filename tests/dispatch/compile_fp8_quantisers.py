"""Offline sm90 compile check of the FP8 quantisation kernels (`fp8_kernels.py`), as the JIT
specialises them: float32 and bf16 sources, widths divisible by 16 and not. Not a pytest
module; run with the GPU's Triton (``tests/compile_sm90.py``)::

    PYTHONPATH=/tmp/t36:src python tests/dispatch/compile_fp8_quantisers.py
"""

import sys
from pathlib import Path

from gatedmoe.dispatch.options import FP8_MAX
from gatedmoe.dispatch.triton import fp8_kernels
from gatedmoe.dispatch.triton.fp8_ops import _FMAX_EXP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared compile helper
from compile_sm90 import run  # noqa: E402


def variants():
    """``(name, kernel, argument types, constexprs, warps, stages)`` as `fp8_ops` launches them."""
    fmt = dict(FMAX=FP8_MAX["e4m3"], FMAX_EXP=_FMAX_EXP["e4m3"], ROUND=False)
    for src in ("*fp32", "*bf16"):
        for width in ("i32", "i32:16"):
            tag = f"w={src} widths={width}"
            types = dict(w_ptr=src, rmax_ptr="*i32", cmax_ptr="*i32", R=width, C=width, RB="i32", CB="i32")
            yield f"weight_amax {tag}", fp8_kernels.weight_amax_kernel, types, dict(BR=64, BC=64), 4, 1
            types = dict(types, q_ptr="*fp8e4nv", qt_ptr="*fp8e4nv", s_ptr="*fp32", st_ptr="*fp32")
            yield (f"quantize_rows_and_cols {tag}", fp8_kernels.quantize_rows_and_cols_kernel, types,
                   dict(BR=64, BC=64, **fmt), 4, 1)
            types = dict(w_ptr=src, q_ptr="*fp8e4nv", qt_ptr="*fp8e4nv", s_ptr="*fp32", R=width, C=width, RB="i32",
                         CB="i32")
            yield (f"quantize_blocks {tag}", fp8_kernels.quantize_blocks_kernel, types,
                   dict(B=128, WRITE_T=True, **fmt), 8, 1)
            types = dict(x_ptr=src, q_ptr="*fp8e4nv", s_ptr="*fp32", R="i32", C=width, stride_x=width, KB="i32",
                         G=width)
            yield (f"quantize_rows {tag}", fp8_kernels.quantize_rows_kernel, types, dict(BR=32, BC=128, **fmt), 4, 1)


if __name__ == "__main__":
    sys.exit(run(variants(), sys.argv[1] if len(sys.argv) > 1 else ""))
