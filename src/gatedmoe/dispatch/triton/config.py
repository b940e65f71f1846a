"""Kernel configs of the fused Triton backend and the measured thresholds that choose
among its code paths: data, no code that launches anything.

Importing this module never imports Triton, so `gatedmoe.dispatch.options.TritonOptions`
can hold `KernelConfig` values on machines without it.

Every number below, except the decode path's (measured on an H200, or marked as first
guesses where the config sweep has not run yet), was measured on an H100 (80 GB, SXM) with bf16
inputs on the four GPU shapes of `gatedmoe.bench.SHAPES` (Mixtral, DeepSeek, small, fine-grained);
`benchmarks/triton_tune.py` measures the config alternatives and prints the fastest, and
BENCHMARKS.md holds the tables. To try other numbers, pass them as a value
(``TritonOptions(configs={...})``); these tables are not patched at run time.

Shape legend: T tokens, N routed assignments, D model dim, H expert hidden, E experts.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields, replace
from types import MappingProxyType

import torch

__all__ = [
    "CONFIGS_BF16",
    "CONFIG_FP32",
    "CONFIG_INTERPRETER",
    "DECODE_BK",
    "DECODE_COMBINE_BLOCK",
    "DECODE_MAX_PROGRAM_BYTES",
    "DECODE_MAX_EXPERT_ELEMENTS",
    "DECODE_MAX_ROWS_PER_EXPERT",
    "DECODE_MAX_TOKENS",
    "DECODE_MIN_PROGRAMS",
    "DECODE_WIDE_MIN_LARGE_PROGRAMS",
    "FEW_ROWS_CONFIGS_BF16",
    "FEW_ROWS_MAX_ROWS_PER_EXPERT",
    "KERNELS",
    "KernelConfig",
    "PER_EXPERT_MAX_E",
    "PER_EXPERT_MIN_ROWS",
    "PREGATHER_MIN_H",
    "configs_from_ints",
    "configs_to_ints",
    "ints_to_configs",
    "decode_configs",
    "decode_row_tiles",
    "kernel_configs",
    "use_decode",
]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel.

    ``BM`` rows, ``BN`` columns and ``BK`` reduction depth of a tile (for "glu_fwd" ``BN``
    counts gate/up column pairs: its accumulator holds ``[BM, 2 BN]``); ``warps`` and
    ``stages`` are Triton's ``num_warps`` / ``num_stages``; ``group_m`` row tiles share a
    column block in the program order (weight blocks stay in L2).

    Examples
    --------
    >>> KernelConfig(128, 256, 64, 8, 4)
    KernelConfig(BM=128, BN=256, BK=64, warps=8, stages=4, group_m=8, tma=True, pregather=False)
    """

    BM: int
    BN: int
    BK: int
    warps: int
    stages: int
    group_m: int = 8
    tma: bool = True  # weight (and ungathered row) tiles through TMA descriptors where possible
    # Gathered kernels only ("glu_fwd", "glu_bwd"): gather the rows into expert order with one
    # copy first, so the GEMM reads them through TMA instead of gathering inside its loads.
    pregather: bool = False


# Kernel names, in the order `configs_to_ints` numbers them. "glu_fwd": gathered x @ W_in^T
# with the SwiGLU epilogue; "gemm_fwd": a @ W_out^T with weight and scatter-add; "glu_bwd":
# the gathered gy @ W_out product feeding the SwiGLU backward; "gemm_bwd": dL/dh @ W_in with
# the dL/dx scatter-add; "wgrad": the W_out gradient read by token (`kernels.wgrad_kernel`).
# "decode_glu" / "decode_down": the two products of the decode path (`kernels.decode_glu_kernel`,
# `kernels.decode_down_kernel`), chosen by `decode_configs` rather than `kernel_configs`.
KERNELS = ("glu_fwd", "gemm_fwd", "glu_bwd", "gemm_bwd", "wgrad", "decode_glu", "decode_down")
_LARGE_KERNELS = KERNELS[:5]

# bf16/fp16 on CUDA: the fastest configs of `benchmarks/triton_tune.py` on the H100
# (`benchmarks/results_triton_tune_h100.json`, the TMA tuning run of the second session:
# one glu_fwd config won on all four shapes; the pre-gathered glu configs from the third
# session's rules below). The scatter GEMMs' (128, 256, 64, 8 warps, 4 stages) was checked
# again in the fourth session against 11 other configs on 3 shapes: fastest on every one
# (BENCHMARKS.md, "tried and dropped").
CONFIGS_BF16: Mapping[str, KernelConfig] = MappingProxyType({
    "glu_fwd": KernelConfig(128, 128, 64, 8, 4, group_m=16, pregather=True),
    "gemm_fwd": KernelConfig(128, 256, 64, 8, 4),
    "glu_bwd": KernelConfig(128, 256, 64, 8, 4, pregather=True),
    "gemm_bwd": KernelConfig(128, 256, 64, 8, 4),
    "wgrad": KernelConfig(128, 128, 64, 4, 4),
})
# The two forward products of an inference call with few rows per routed expert (the large-batch
# kernels past the decode path's range, e.g. T = 64-256 tokens at decode time): 64-row tiles
# instead of 128, so a tile of an expert's 16-32 rows computes half the padding. Measured on an
# H200 (Triton 3.6, 2026-12-02, layer forward as CUDA-graph replays from given top-k, nine model
# shapes; `benchmarks/results_decode_configs_h200.json`): at 16-32 rows per expert 4-8% faster on every shape (Qwen3-30B
# T=256 365 -> 342 us, GPT-OSS-20B T=256 472 -> 435, Qwen3-235B T=256 1219 -> 1173), at 64 rows
# slower (Mixtral T=256 767 -> 799, Mixtral-8x22B 1272 -> 1355). Calls that keep h for backward
# keep `CONFIGS_BF16` (not measured with these).
FEW_ROWS_MAX_ROWS_PER_EXPERT = 32
FEW_ROWS_CONFIGS_BF16: Mapping[str, KernelConfig] = MappingProxyType({
    "glu_fwd": KernelConfig(64, 128, 64, 4, 4),
    "gemm_fwd": KernelConfig(64, 256, 64, 4, 4),
})
# float32 on CUDA: one config for every kernel; not tuned (float32 is the test dtype, the
# speed paths are bf16).
CONFIG_FP32 = KernelConfig(64, 64, 32, 4, 2)
# Triton's CPU interpreter (TRITON_INTERPRET=1, tests): the smallest legal tl.dot tile.
CONFIG_INTERPRETER = KernelConfig(16, 16, 16, 4, 1)

# Below these expert widths the gathered kernels gather inside their loads instead of reading
# a gathered copy through TMA. Measured on the H100, third session (BENCHMARKS.md, "pre-gathered
# rows through TMA where the expert is wide"; `benchmarks/results_triton_tune_h100.json`):
# forward gather+GEMM1+SwiGLU with the copy Mixtral (H=14336) 6.87 -> 6.06 ms and small
# 0.57 -> 0.55, but DeepSeek 1.95 vs 2.05 and fine-grained 1.06 vs 1.26 ms (narrow experts)
# slower. For the backward's product the copy is free (the W_out gradient needs it):
# Mixtral 2.91 -> 2.63 ms, yet at H=512 the in-load gather still won.
PREGATHER_MIN_H: Mapping[str, int] = MappingProxyType({"glu_fwd": 2048, "glu_bwd": 1024})

# Weight gradients as one cuBLAS product per expert instead of one grouped GEMM when the
# experts are few and large (CUDA bf16). Measured on the H100, fourth session (BENCHMARKS.md,
# "weight gradients as one cuBLAS product per expert"; `torch._grouped_mm` vs the loop in one
# process): Mixtral (E=8, 2048 rows per expert) W_in gradient 5.99 / 6.34 -> 5.44 / 5.60 ms
# (balanced / random routing), W_out 2.82 / 2.89 -> 2.72 / 2.75; at 1024 rows per expert the
# two are within -16..+21% either way, at 512 rows (E=256) the loop is 4-10x slower.
PER_EXPERT_MIN_ROWS = 2048  # mean rows per expert
PER_EXPERT_MAX_E = 16  # one launch per expert: keep the host's share small


def kernel_configs(
    dtype: torch.dtype, device: torch.device, H: int, overrides: Mapping[str, KernelConfig] | None = None,
    rows_per_expert: float | None = None,
) -> dict[str, KernelConfig]:
    """The config of each large-batch kernel of `KERNELS` for inputs of ``dtype`` on ``device`` with
    expert width ``H``: the measured tables and rules above, then ``overrides`` (kernel name
    -> config, used as given, with no rule applied to them). ``rows_per_expert``: the mean rows
    per routed expert of an inference call (None for calls that keep h for backward); at most
    `FEW_ROWS_MAX_ROWS_PER_EXPERT` the forward products take `FEW_ROWS_CONFIGS_BF16`.

    Examples
    --------
    >>> import torch
    >>> kernel_configs(torch.float32, torch.device("cpu"), 64)["wgrad"]
    KernelConfig(BM=16, BN=16, BK=16, warps=4, stages=1, group_m=8, tma=True, pregather=False)
    """
    few_rows = rows_per_expert is not None and rows_per_expert <= FEW_ROWS_MAX_ROWS_PER_EXPERT
    cfgs = dict(_rule_configs(dtype, device.type, H, few_rows))
    if overrides:
        cfgs.update({name: cfg for name, cfg in overrides.items() if name in _LARGE_KERNELS})
    return cfgs


@functools.lru_cache(maxsize=64)
def _rule_configs(dtype: torch.dtype, device_type: str, H: int, few_rows: bool = False) -> Mapping[str, KernelConfig]:
    # Cached: two calls per training step, and the dataclass copies cost host time that
    # delays the first launch.
    if device_type != "cuda":
        cfgs = dict.fromkeys(_LARGE_KERNELS, CONFIG_INTERPRETER)
    elif dtype == torch.float32:
        cfgs = dict.fromkeys(_LARGE_KERNELS, CONFIG_FP32)
    else:
        cfgs = dict(CONFIGS_BF16)
        # A gathered copy read through TMA beats gathering inside the loads once each row is
        # reused over enough columns (the copy costs N*D, the product N*D*H).
        if H < PREGATHER_MIN_H["glu_fwd"]:
            cfgs["glu_fwd"] = replace(cfgs["glu_fwd"], pregather=False, group_m=8)
        if H < PREGATHER_MIN_H["glu_bwd"]:
            cfgs["glu_bwd"] = replace(cfgs["glu_bwd"], pregather=False)
        if few_rows:
            cfgs.update(FEW_ROWS_CONFIGS_BF16)
    return MappingProxyType(cfgs)


# ---------------------------------------------------------------------------------- decode
# The decode path (`ops.moe_glu_decode`): inference with few rows per expert, where the time is
# the read of the routed experts' weights. Its floor is (distinct experts hit) x 3 D H x 2 bytes
# over the HBM bandwidth; `benchmarks/decode.py` measures both side by side.

# The decode path covers at most this many tokens (the range it is tested and measured for:
# T = 1..256; larger batches are the large-batch kernels' regime).
DECODE_MAX_TOKENS = 256
# ... and only while the mean rows per routed expert, N / min(N, E), stays at most this. Above
# it each expert's weights are reused by enough rows that the large-batch kernels (tensor-core
# tiles of 128 rows, TMA) win.
# Measured on an H200 (torch 2.11, Triton 3.6; `benchmarks/decode.py`, layer forward as a CUDA
# graph, 2026-12-02, BENCHMARKS.md "Decode", `benchmarks/results_decode_h200_d.json`): for narrow
# experts (below) the decode kernels win at up to 8 rows per expert at T >= 8 (GPT-OSS-20B T=64,
# 8 rows: 404 vs 417 us; Qwen3-30B T=64, 4 rows: 309 vs 324); at 16 and more the large-batch
# kernels win on every shape (Mixtral T=64 695 vs 835 us, Qwen3-30B T=256 338 vs 368,
# GPT-OSS-20B T=256 429 vs 567).
DECODE_MAX_ROWS_PER_EXPERT = 8
# ... and, for experts of at least `DECODE_MAX_EXPERT_ELEMENTS` elements per matrix (D x H),
# only where the large-batch kernels would leave the SMs idle: their first product has fewer
# than `DECODE_WIDE_MIN_LARGE_PROGRAMS` programs (at most min(N, E) experts x H / 128 columns).
# Otherwise wide experts are read faster by the large-batch kernels with 64-row tiles
# (`FEW_ROWS_CONFIGS_BF16`: weight tiles through TMA) even at 1-8 rows per expert. Measured on an
# H200 (layer forward from given top-k as CUDA-graph replays, 2026-12-02; BENCHMARKS.md "Decode",
# `benchmarks/results_decode_h200_d.json`, and for the five more shapes
# `benchmarks/results_decode_configs_h200.json`): the large path ahead for DeepSeek-V3 (7168 x
# 2048 = 14.7M; T=8 1300 vs 1360 us, T=64 4526 vs 5084, T=256 5289 vs 6681), Mixtral (58.7M; T=1
# 222 vs 234, T=8 608 vs 629) and Mixtral-8x22B (100.7M; T=1 332 vs 360, T=8 1020 vs 1161), but
# behind at DeepSeek-V3 T=1 (8 experts x 16 column blocks = 128 programs: 247 vs 228 us; Mixtral
# T=1 has 224); the decode kernels ahead at T >= 8 for Qwen2-57B (3584 x 2560 = 9.2M; T=8 562 vs 582 us),
# GPT-OSS-20B (8.3M), Qwen3-235B (6.3M) and every narrower shape. The size cut lies between
# 9.2M and 14.7M elements, the program cut between 128 and 224. Measured in bf16; float32 inputs
# (the untuned test dtype) follow the same cuts.
DECODE_MAX_EXPERT_ELEMENTS = 12 << 20
DECODE_WIDE_MIN_LARGE_PROGRAMS = 192
# Column blocks are narrowed (64 -> 32 -> 16 columns) until a product has at least this many
# programs (so that T=1, one row tile per routed expert, still fills 132 SMs several times
# over) and each program streams at most `DECODE_MAX_PROGRAM_BYTES` of weights (short programs:
# the last ones to finish leave SMs idle for less). `benchmarks/decode.py --sweep` times the
# alternatives per shape: on an H200 at T=8 (Qwen3-30B-A3B, GPT-OSS-20B) these rules came within
# 1-2% of the fastest config (BENCHMARKS.md, "Decode").
DECODE_MIN_PROGRAMS = 1024
DECODE_MAX_PROGRAM_BYTES = 512 << 10
# Reduction depth of the decode products on CUDA (16-bit: 256-byte row segments of the weights
# per load; float32: half the elements), and the pipeline depth: 4 stages, 3 where a stage's
# tiles exceed 24 KB (two programs per SM then still fit in shared memory). Swept as above; at
# 32 rows per expert (GPT-OSS T=256, beyond the threshold) a depth of 64 was faster.
DECODE_BK = 128

# The per-token combine (`kernels.decode_combine_kernel`): columns per program, token ids
# scanned per step, rows gathered per load.
DECODE_COMBINE_BLOCK = (512, 256, 8)


def use_decode(T: int, N: int, E: int, D: int, H: int) -> bool:
    """Whether the automatic choice (``TritonOptions(decode=None)``) takes the decode path
    for an inference call of ``T`` tokens, ``N`` routed assignments and ``E`` experts of
    ``D x H`` matrices: at most `DECODE_MAX_TOKENS` tokens and at most
    `DECODE_MAX_ROWS_PER_EXPERT` rows per routed expert; for experts of at least
    `DECODE_MAX_EXPERT_ELEMENTS` elements, only while the large-batch kernels' first product
    would have fewer than `DECODE_WIDE_MIN_LARGE_PROGRAMS` programs. Sizes only (no data), so
    a captured decode step always takes the same path.

    Examples
    --------
    >>> use_decode(1, 8, 128, 2048, 768), use_decode(256, 512, 8, 2048, 768)  # Qwen3-30B-A3B
    (True, False)
    >>> use_decode(1, 8, 256, 7168, 2048), use_decode(8, 64, 256, 7168, 2048)  # DeepSeek-V3
    (True, False)
    """
    if not (0 < T <= DECODE_MAX_TOKENS and N <= DECODE_MAX_ROWS_PER_EXPERT * min(N, E)):
        return False
    if D * H < DECODE_MAX_EXPERT_ELEMENTS:
        return True
    large_programs = min(N, E) * -(-H // FEW_ROWS_CONFIGS_BF16["glu_fwd"].BN)
    return large_programs < DECODE_WIDE_MIN_LARGE_PROGRAMS


def decode_row_tiles(N: int, E: int, BM: int) -> int:
    """Row tiles of the decode products: an upper bound on sum_e ceil(count_e / BM) from the
    sizes alone. At most m = min(N, E) experts have rows, each leaves at most one partial
    tile, so the tiles number at most m + (N - m) // BM (= N for T=1: one per assignment,
    instead of the large-batch kernels' N / BM + E, which launches E mostly idle programs)."""
    m = min(N, E)
    return m + (N - m) // BM


def decode_configs(
    dtype: torch.dtype, device: torch.device, N: int, E: int, D: int, H: int,
    overrides: Mapping[str, KernelConfig] | None = None,
) -> dict[str, KernelConfig]:
    """Configs of "decode_glu" (``BN`` columns of H, gate and up each) and "decode_down"
    (``BN`` columns of D) for ``N`` assignments over ``E`` experts, then ``overrides`` (only
    the decode kernels' names are read; used as given).

    Rows per tile: 16 (the smallest tensor-core tile) up to 16 rows per routed expert, then
    32, then 64. Columns: the widest of 64, 32, 16 that gives `DECODE_MIN_PROGRAMS` programs
    of at most `DECODE_MAX_PROGRAM_BYTES` of weights each (else 16).

    Examples
    --------
    >>> import torch
    >>> decode_configs(torch.bfloat16, torch.device("cuda"), 8, 128, 2048, 768)["decode_glu"]
    KernelConfig(BM=16, BN=16, BK=128, warps=4, stages=4, group_m=8, tma=False, pregather=False)
    """
    cfgs = dict(_decode_rule(dtype, device.type, N, E, D, H))
    if overrides:
        cfgs.update({name: cfg for name, cfg in overrides.items() if name in cfgs})
    return cfgs


@functools.lru_cache(maxsize=256)
def _decode_rule(dtype: torch.dtype, device_type: str, N: int, E: int, D: int, H: int) -> tuple:
    """`decode_configs` without overrides, as ``((name, config), ...)``: a pure function of the
    sizes, cached (measured: 12 us of host time per call otherwise, on every decode step)."""
    if device_type != "cuda":
        cfgs = {name: replace(CONFIG_INTERPRETER, tma=False) for name in ("decode_glu", "decode_down")}
    else:
        rows = -(-N // max(1, min(N, E)))
        BM = 16 if rows <= 16 else 32 if rows <= 32 else 64
        tiles = decode_row_tiles(N, E, BM)
        elt = dtype.itemsize
        BK = DECODE_BK if elt == 2 else DECODE_BK // 2
        cfgs = {}
        # (name, output width, reduction depth, weight matrices per column: gate and up)
        for name, width, depth, mats in (("decode_glu", H, D, 2), ("decode_down", D, H, 1)):
            BN = next((bn for bn in (64, 32) if tiles * -(-width // bn) >= DECODE_MIN_PROGRAMS
                       and mats * bn * depth * elt <= DECODE_MAX_PROGRAM_BYTES), 16)
            stage_bytes = (BM * BK + mats * BK * BN) * elt
            cfgs[name] = KernelConfig(BM, BN, BK, 4, 4 if stage_bytes <= 24 << 10 else 3, group_m=8, tma=False)
    return tuple(cfgs.items())


_N_FIELDS = len(fields(KernelConfig))


def configs_to_ints(configs: Mapping[str, KernelConfig] | None) -> list[int]:
    """``configs`` flattened to ints (kernel index in `KERNELS`, then each field), the form
    a `torch.library` custom op can take; ``[]`` for none."""
    out: list[int] = []
    for name, cfg in (configs or {}).items():
        out += [KERNELS.index(name), *(int(v) for v in astuple(cfg))]
    return out


def configs_from_ints(ints: list[int] | tuple[int, ...] | None) -> dict[str, KernelConfig]:
    """Inverse of `configs_to_ints`."""
    return ints_to_configs(ints, KERNELS, "configs as ints")


def ints_to_configs(ints: Sequence[int] | None, names: Sequence[str], what: str) -> dict[str, KernelConfig]:
    """Configs from ints as ``*configs_to_ints`` flatten them: per config its index in
    ``names``, then each `KernelConfig` field; ``what`` names the form in the error."""
    ints = list(ints or ())
    step = 1 + _N_FIELDS
    if len(ints) % step:
        raise ValueError(f"{what}: expected a multiple of {step} values, got {len(ints)}")
    out = {}
    for i in range(0, len(ints), step):
        BM, BN, BK, warps, stages, group_m, tma, pregather = ints[i + 1 : i + step]
        out[names[ints[i]]] = KernelConfig(BM, BN, BK, warps, stages, group_m, bool(tma), bool(pregather))
    return out
