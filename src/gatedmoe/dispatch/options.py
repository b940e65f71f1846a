"""Backend options: values that change a backend's numerics or speed, passed per layer or
per call (``MoE(..., backend_options=TritonOptions(...))``), never module-level switches.

Importing this module never imports Triton.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from gatedmoe.dispatch.triton.config import KERNELS, KernelConfig
from gatedmoe.dispatch.triton.fp8_config import FP8_KERNELS

__all__ = ["FP8Recipe", "TritonOptions"]


# Largest finite value of each FP8 format the recipes use (OCP FP8: e4m3 "fn" has no infinity).
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
SCALINGS = ("blockwise", "rowwise")


@dataclass(frozen=True, kw_only=True)
class FP8Recipe:
    """How the Triton backend runs the expert GEMMs in FP8 (``TritonOptions(fp8=...)``, CUDA
    sm90 or Triton's CPU interpreter; the grouped backend refuses it).

    Forward: both expert GEMMs take e4m3 operands (3 mantissa bits) with float32 scales and
    accumulate in float32; h, the output and every gradient stay in the input dtype.
    Backward: the two data-gradient GEMMs (dL/da = gy W_out, dL/dx = dL/dh W_in) take FP8
    operands too, the gradient operand in ``grad_format``; the weight gradients are grouped
    GEMMs in the input dtype, as without FP8 (FP8 weight gradients were measured slower and
    less accurate and dropped: kernels README, "FP8"). Master weights keep their dtype: each
    weight is quantised once per optimizer step, cached on the parameter and re-quantised
    when its version counter (bumped by every in-place update) or storage changes.

    Every scale is a power of two (the smallest one that keeps the block's largest magnitude
    within the format's range), so scaling is exact and the only rounding is the FP8
    rounding itself (round to nearest even): the kernels and the float32 reference
    (`gatedmoe.dispatch.triton.fp8_reference`) produce the same FP8 values bit for bit.

    Parameters
    ----------
    scaling : {"rowwise", "blockwise"}
        "rowwise" (default; ``torch._scaled_grouped_mm``'s recipe): one scale per activation
        row and per weight output row, applied once in the epilogue; any D and H; the SwiGLU
        output needs its own quantisation pass (its row amax is known only after the whole
        row is written). "blockwise" (DeepSeek-V3's recipe): one scale per 1 x ``block`` tile
        of an activation row and per ``block`` x ``block`` block of a weight, the partial
        product of each ``block``-deep slice of the reduction scaled and added in float32
        (which also keeps Hopper's reduced-precision FP8 accumulation to ``block`` products);
        D and H multiples of ``block``. Rowwise is the default because its GEMMs measured
        faster (H200, forward+backward: 0.95-1.06x of bf16 against blockwise's 0.91-0.95x, the
        same run), as accurate (the same errors, also with 1000x outlier channels: the scales
        are powers of two and FP8 is floating point, so a value within 2^14 of its scale's amax
        keeps the format's precision either way), and its 2,000-step training run ended closer
        to the baseline (+2.0% against +2.9%, one seed each; BENCHMARKS.md "FP8"). Its weight
        quantisation, once per optimizer step, cost 7x blockwise's until rewritten (two passes
        over each weight now: 1.6x blockwise's; kernels README, "FP8").
    grad_format : {"e4m3", "e5m2"}
        FP8 format of the gradient operand of the backward's data-gradient GEMMs: e4m3 (3
        mantissa bits, range 448) or e5m2 (2 mantissa bits, range 57344). With power-of-two
        scales per row or tile the range rarely matters, so e4m3 is the default: e5m2 measured
        the same speed and trained worse (+4.3% against +2.9% validation loss, blockwise, one
        seed; BENCHMARKS.md "FP8").
    block : int
        Tile width of the blockwise scales, a power of two >= 16 (default 128; the CUDA
        kernels take 128, smaller blocks exist for the interpreter tests).

    Raises
    ------
    ValueError
        An unknown ``scaling`` or ``grad_format`` (the message lists the known ones), or a
        ``block`` that is not a power of two >= 16.

    Examples
    --------
    >>> FP8Recipe()
    FP8Recipe(scaling='rowwise', grad_format='e4m3', block=128)
    >>> TritonOptions(fp8=FP8Recipe(grad_format="e5m2")).fp8.grad_format
    'e5m2'
    """

    scaling: str = "rowwise"
    grad_format: str = "e4m3"
    block: int = 128

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling: unknown value {self.scaling!r}; known: {', '.join(SCALINGS)}")
        if self.grad_format not in FP8_MAX:
            raise ValueError(f"grad_format: unknown value {self.grad_format!r}; known: {', '.join(FP8_MAX)}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 16 \
                or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {self.block!r}")


class _FrozenConfigs(Mapping[str, KernelConfig]):
    """Read-only, hashable kernel name -> `KernelConfig` mapping (keeps `TritonOptions`
    frozen and usable as a dict key)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, KernelConfig]) -> None:
        self._items = dict(items)

    def __getitem__(self, name: str) -> KernelConfig:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


@dataclass(frozen=True, kw_only=True)
class TritonOptions:
    """Options of the fused Triton backend (``backend="triton"``).

    Parameters
    ----------
    fp32_scatter : bool
        Accumulate the scatter-adds (the forward combine and the dL/dx scatter) in a float32
        buffer instead of the input dtype. A little more accurate where tokens pick many
        experts (k=8: error of y against a float32 run 3.5e-3 vs 5.0e-3 in bf16) and slower
        (fine-grained H100 forward 2.42 vs 2.03 ms). Default False, the grouped backend's
        ``index_add`` precision. Float32 inputs always accumulate in float32.
    configs : Mapping[str, KernelConfig] or None
        Kernel configs used instead of the measured ones
        (`gatedmoe.dispatch.triton.config.kernel_configs`), by kernel name: "glu_fwd",
        "gemm_fwd", "glu_bwd", "gemm_bwd", "wgrad", and the decode path's "decode_glu",
        "decode_down" (`config.decode_configs`); kernels not named keep theirs. Given
        configs are used as they are, on every dtype and width. Default None (measured
        configs). Stored read-only; an empty mapping is stored as None. The FP8 kernels'
        entries, "fp8_glu_fwd" and "fp8_gemm" (`gatedmoe.dispatch.triton.fp8_config`), are
        read only by FP8 calls, which read no others.
    decode : bool or None
        The decode path (`gatedmoe.dispatch.triton.ops.moe_glu_decode`: kernels for a few
        rows per expert, inference only). None (default): chosen by size for calls that need
        no gradient (`gatedmoe.dispatch.triton.config.use_decode`: at most 256 tokens, few
        rows per routed expert, experts narrow enough that the large-batch kernels do not read
        them faster); True: every call that needs no gradient; False: never. Calls
        that need gradients always run the large-batch kernels.
    fp8 : FP8Recipe or None
        Run the expert GEMMs in FP8 with this recipe (`FP8Recipe`: scaling, gradient
        format; CUDA with FP8 tensor cores, or Triton's CPU interpreter in tests). Default
        None: the input dtype throughout. The grouped backend, and the Triton backend where
        its kernels do not apply, raise ValueError rather than run without FP8. Measured so
        far: the kernels README ("FP8") lists what is and what is still open.

    Raises
    ------
    ValueError
        ``configs`` names a kernel that does not exist (the message lists the known ones).
    TypeError
        ``fp32_scatter`` is not a bool, ``decode`` not a bool or None, a config is not a
        `KernelConfig`, or ``fp8`` is not an `FP8Recipe`.

    Examples
    --------
    >>> from gatedmoe.dispatch.options import TritonOptions
    >>> from gatedmoe.dispatch.triton.config import KernelConfig
    >>> TritonOptions(fp32_scatter=True)
    TritonOptions(fp32_scatter=True, configs=None, decode=None, fp8=None)
    >>> TritonOptions(configs={"wgrad": KernelConfig(64, 64, 64, 4, 3)}).configs["wgrad"].BM
    64
    """

    fp32_scatter: bool = False
    configs: Mapping[str, KernelConfig] | None = None
    decode: bool | None = None
    fp8: FP8Recipe | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fp32_scatter, bool):
            raise TypeError(f"fp32_scatter must be a bool, got {type(self.fp32_scatter).__name__}")
        if self.decode is not None and not isinstance(self.decode, bool):
            raise TypeError(f"decode must be a bool or None, got {type(self.decode).__name__}")
        if self.fp8 is not None and not isinstance(self.fp8, FP8Recipe):
            raise TypeError(f"fp8 must be an FP8Recipe or None, got {type(self.fp8).__name__}")
        if self.configs is None:
            return
        if not isinstance(self.configs, Mapping):
            raise TypeError(f"configs must be a mapping of kernel name to KernelConfig, got "
                            f"{type(self.configs).__name__}")
        known = KERNELS + FP8_KERNELS
        unknown = [name for name in self.configs if name not in known]
        if unknown:
            raise ValueError(f"configs: unknown kernel name(s) {', '.join(map(repr, unknown))}; known kernels: "
                             f"{', '.join(known)}")
        for name, cfg in self.configs.items():
            if not isinstance(cfg, KernelConfig):
                raise TypeError(f"configs[{name!r}] must be a KernelConfig, got {type(cfg).__name__}")
        object.__setattr__(self, "configs", _FrozenConfigs(self.configs) if self.configs else None)

    def to_dict(self) -> dict:
        """JSON-able: ``configs`` as ``{name: {field: value}}``, ``fp8`` as its fields; read
        back by `from_dict` (checkpoints store options this way).

        Examples
        --------
        >>> o = TritonOptions(decode=False, fp8=FP8Recipe(scaling="blockwise"))
        >>> o.to_dict()["fp8"]
        {'scaling': 'blockwise', 'grad_format': 'e4m3', 'block': 128}
        >>> TritonOptions.from_dict(o.to_dict()) == o
        True
        """
        return {
            "fp32_scatter": self.fp32_scatter,
            "configs": None if self.configs is None else {n: dataclasses.asdict(c) for n, c in self.configs.items()},
            "decode": self.decode,
            "fp8": None if self.fp8 is None else dataclasses.asdict(self.fp8),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> TritonOptions:
        """Inverse of `to_dict` (validated like a new instance); `KernelConfig` and
        `FP8Recipe` values are taken as they are too."""
        d = dict(d)
        if isinstance(d.get("configs"), Mapping):
            d["configs"] = {n: c if isinstance(c, KernelConfig) else KernelConfig(**c) for n, c in d["configs"].items()}
        if isinstance(d.get("fp8"), Mapping):
            d["fp8"] = FP8Recipe(**d["fp8"])
        return cls(**d)
