"""Argument and input checks shared by every layer, gate and expert bank (imports torch only).

The contract (README "Bad input"), in one place so every entry point keeps it the same way:

* A bad constructor argument raises ``ValueError`` (bad value) or ``TypeError`` (bad type)
  naming the argument, the allowed range and the value given, before any work starts.
* A forward input that is not a tensor, not floating point (integer, bool, complex) or not
  shaped as the layer says raises ``TypeError``/``ValueError`` naming ``x`` and the shape.
* Floating dtypes are *not* refused: every layer computes its experts in the input's dtype
  (its weights are cast to it), its router in float32, and returns the input's dtype; a
  float64 input to a float32 layer gives a float64 output. `check_input` is the one place
  that says which dtypes are accepted.
* NaN or inf in the input (`check_finite`, when the layer's ``check_inputs`` is on): a
  ``ValueError`` on the CPU; on an accelerator a device-side assertion, so no forward waits
  for the host (the step fails at the next synchronisation with "device-side assert
  triggered"); under ``torch.compile`` also the device-side assertion, so the check does
  not break the graph.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "positive_int",
    "nonneg_int",
    "int_in",
    "real_in",
    "boolean",
    "one_of",
    "check_input",
    "check_finite",
]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(name: str, v: object) -> int:
    """``v`` if it is an int >= 1; ValueError naming ``name`` otherwise."""
    if not _is_int(v) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def nonneg_int(name: str, v: object) -> int:
    """``v`` if it is an int >= 0; ValueError naming ``name`` otherwise."""
    if not _is_int(v) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return v


def int_in(name: str, v: object, lo: int, hi: int) -> int:
    """``v`` if it is an int in ``[lo, hi]``; ValueError naming ``name`` and the range."""
    if not _is_int(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def real_in(
    name: str,
    v: object,
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """``float(v)`` if ``v`` is a real number in the interval; ValueError naming ``name``.

    The interval is ``[lo, hi]``, with ``lo_open``/``hi_open`` excluding an end. NaN is
    always refused, and so is inf unless ``allow_inf``.
    """
    if math.isinf(hi) and math.isfinite(lo):
        span = f"{'>' if lo_open else '>='} {lo}"
    else:
        span = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a real number {span}, got {v!r}")
    f = float(v)
    ok = not math.isnan(f) and (allow_inf or math.isfinite(f))
    ok = ok and (f > lo if lo_open else f >= lo) and (f < hi if hi_open else f <= hi)
    if not ok:
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number {span}, got {v!r}")
    return f


def boolean(name: str, v: object) -> bool:
    """``v`` if it is a bool; TypeError naming ``name`` otherwise (``"no"`` is not False)."""
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return v


def one_of(name: str, v: Any, choices: Collection[Any]) -> Any:
    """``v`` if it is one of ``choices``; ValueError listing them otherwise."""
    try:
        ok = v in choices
    except TypeError:  # an unhashable value in a set
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {list(choices)!r}, got {v!r}")
    return v


def check_input(
    x: object,
    d_model: int,
    owner: str,
    *,
    ndims: Collection[int] | None = None,
    shape_text: str = "[..., d_model]",
    name: str = "x",
) -> Tensor:
    """Check a layer's or gate's input before any work; return it.

    TypeError if ``x`` is not a tensor or not floating point; ValueError if its last
    dimension is not ``d_model`` or (with ``ndims``) its number of dimensions is not one of
    ``ndims``. Any floating dtype passes: layers compute in the input's dtype.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{owner}: {name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {x.dtype}; convert it with {name}.float()"
        )
    if x.dim() < 1 or x.shape[-1] != d_model or (ndims is not None and x.dim() not in ndims):
        shape = shape_text.replace("d_model", f"d_model={d_model}")
        raise ValueError(f"{owner}: {name} must have shape {shape}, got {tuple(x.shape)}")
    return x


def check_finite(x: Tensor, owner: str, name: str = "x") -> None:
    """Fail if ``x`` holds NaN or inf: ValueError on the CPU, a device-side assertion on an
    accelerator or under ``torch.compile`` (neither waits for the host)."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{owner}: {name} contains NaN or inf (check_inputs=True)")
        return
    # Reading the flag on the host would stall the stream on every forward (and forbid
    # CUDA-graph capture and a whole-graph compile); a device-side assertion fails the step
    # without a sync.
    torch._assert_async(torch.isfinite(x).all(), f"gatedmoe.{owner}: {name} contains NaN or inf")
