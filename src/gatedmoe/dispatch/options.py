"""Backend options: values that change a backend's numerics or speed, passed per layer or
per call (``MoE(..., backend_options=TritonOptions(...))``), never module-level switches.

Importing this module never imports Triton.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from gatedmoe.dispatch.triton.config import KERNELS, KernelConfig

__all__ = ["TritonOptions"]


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
        configs). Stored read-only; an empty mapping is stored as None.
    decode : bool or None
        The decode path (`gatedmoe.dispatch.triton.ops.moe_glu_decode`: kernels for a few
        rows per expert, inference only). None (default): chosen by size for calls that need
        no gradient (`gatedmoe.dispatch.triton.config.use_decode`: at most 256 tokens and few
        rows per routed expert); True: every call that needs no gradient; False: never. Calls
        that need gradients always run the large-batch kernels.

    Raises
    ------
    ValueError
        ``configs`` names a kernel that does not exist (the message lists the known ones).
    TypeError
        ``fp32_scatter`` is not a bool, ``decode`` not a bool or None, or a config is not a
        `KernelConfig`.

    Examples
    --------
    >>> from gatedmoe.dispatch.options import TritonOptions
    >>> from gatedmoe.dispatch.triton.config import KernelConfig
    >>> TritonOptions(fp32_scatter=True)
    TritonOptions(fp32_scatter=True, configs=None, decode=None)
    >>> TritonOptions(configs={"wgrad": KernelConfig(64, 64, 64, 4, 3)}).configs["wgrad"].BM
    64
    """

    fp32_scatter: bool = False
    configs: Mapping[str, KernelConfig] | None = None
    decode: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fp32_scatter, bool):
            raise TypeError(f"fp32_scatter must be a bool, got {type(self.fp32_scatter).__name__}")
        if self.decode is not None and not isinstance(self.decode, bool):
            raise TypeError(f"decode must be a bool or None, got {type(self.decode).__name__}")
        if self.configs is None:
            return
        if not isinstance(self.configs, Mapping):
            raise TypeError(f"configs must be a mapping of kernel name to KernelConfig, got "
                            f"{type(self.configs).__name__}")
        unknown = [name for name in self.configs if name not in KERNELS]
        if unknown:
            raise ValueError(f"configs: unknown kernel name(s) {', '.join(map(repr, unknown))}; known kernels: "
                             f"{', '.join(KERNELS)}")
        for name, cfg in self.configs.items():
            if not isinstance(cfg, KernelConfig):
                raise TypeError(f"configs[{name!r}] must be a KernelConfig, got {type(cfg).__name__}")
        object.__setattr__(self, "configs", _FrozenConfigs(self.configs) if self.configs else None)
