"""Fused Triton backend ("triton"): the row gather inside the first GEMM's loads (or one
copy read through TMA, for wide experts), SwiGLU in its epilogue, routing weight and
scatter-add in the second GEMM's epilogue; backward: a gathered GEMM, one elementwise pass
for the SwiGLU derivative and the routing-weight gradient, a GEMM with the scatter-add of
dL/dx in its epilogue, and grouped GEMMs for the weight gradients (for narrow experts the
W_out gradient is a Triton kernel reading gy by token, with no gathered copy).

The scatter-adds accumulate in the input dtype (as the grouped backend's ``index_add``
does); ``TritonOptions(fp32_scatter=True)`` (`gatedmoe.dispatch.options`), passed per layer
or per call, makes them accumulate in float32, a little more accurate and slower where
tokens pick many experts. ``TritonOptions(configs=...)`` overrides the measured kernel
configs.

Inference calls with few rows per expert (`config.use_decode`; ``TritonOptions(decode=...)``
forces the choice) take the decode path, `ops.moe_glu_decode`: three launches with grids
from the sizes alone (no host synchronisation, capturable in a CUDA graph) that stream each
routed expert's weights once, and a deterministic per-token sum (README.md, "Decode path").

Eager calls go through `ops.moe_glu` (an autograd.Function, or the bare forward with
gradients off); torch.compile sees the custom ops `gatedmoe::moe_glu_forward` /
`moe_glu_backward`. The backward frees h as it goes, so a second backward through a retained
graph raises.

Covers SwiGLU experts without biases in bf16/fp16/fp32, with or without unmerged LoRA
adapters (`lora_ops.moe_glu_lora`: the adapter products fused into the kernels, README.md
"LoRA on the experts"); anything else falls back to the grouped backend (logged once), except with ``TritonOptions(fp8=FP8Recipe(...))``: the FP8
path (`fp8_ops.moe_glu_fp8`; design and open measurements in README.md, "FP8") refuses what
it cannot run instead. `gatedmoe.dispatch.reference.reference_dispatch` is its oracle
for the whole backend, `reference.py` here for each kernel.

Modules: `config` (kernel configs and measured thresholds; imports no Triton), `kernels`
(the Triton kernels), `launchers` (their host side), `ops` (custom ops, autograd,
`moe_glu`), `backend` (`triton_dispatch`), `reference` (plain PyTorch per kernel); the FP8
path's `fp8_config`, `fp8_kernels`, `fp8_ops` and `fp8_reference` likewise, and the LoRA
path's `lora_kernels`, `lora_ops` and `lora_reference`.
Importing this package imports none of the Triton modules; the names below load them on
first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "moe_glu", "moe_glu_backward", "moe_glu_decode", "moe_glu_forward", "moe_glu_fp8", "moe_glu_lora",
    "tile_schedule", "triton_dispatch",
]

# Public name -> the module defining it, imported on first access (PEP 562), so that
# `config` (and `gatedmoe.dispatch.options`, which uses it) never imports Triton.
_LAZY = {
    "triton_dispatch": "backend",
    "moe_glu": "ops",
    "moe_glu_forward": "ops",
    "moe_glu_backward": "ops",
    "moe_glu_decode": "ops",
    "moe_glu_fp8": "fp8_ops",
    "moe_glu_lora": "lora_ops",
    "tile_schedule": "launchers",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
