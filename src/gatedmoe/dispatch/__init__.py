"""Dispatch: execute a `Routing` over an `ExpertBank`.

Backends share one signature ``fn(x_TD, routing, experts, options=None) -> y_TD``, where
``options`` is the backend's options value (`gatedmoe.dispatch.options.TritonOptions` for
"triton"; the grouped backend takes none). Users choose by name ("grouped", "triton",
"auto"); `reference.reference_dispatch` is the test oracle, not a backend.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from gatedmoe.dispatch.grouped import grouped_dispatch, grouped_mm
from gatedmoe.dispatch.options import FP8Recipe, TritonOptions
from gatedmoe.dispatch.reference import reference_dispatch, reference_moe
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.routing import Routing

__all__ = [
    "DispatchFn",
    "FP8Recipe",
    "TritonOptions",
    "backend_names",
    "get_backend",
    "grouped_dispatch",
    "grouped_mm",
    "reference_dispatch",
    "reference_moe",
]

DispatchFn = Callable[..., Tensor]


def _triton_dispatch(x_TD: Tensor, routing: Routing, experts: ExpertBank, options: TritonOptions | None = None) -> Tensor:
    if experts.active_lora is not None and options is not None and options.fp8 is not None:
        raise ValueError("TritonOptions(fp8=...): the FP8 kernels have no LoRA adapter term; merge the adapters "
                         "(ExpertBank.merge_lora) or drop the fp8 option")
    # Imported on first use: importing Triton costs time and is only useful on CUDA.
    from gatedmoe.dispatch.triton import triton_dispatch

    return triton_dispatch(x_TD, routing, experts, options=options)


_BACKENDS: dict[str, DispatchFn] = {"grouped": grouped_dispatch}
if importlib.util.find_spec("triton") is not None:
    _BACKENDS["triton"] = _triton_dispatch


def backend_names() -> list[str]:
    """Names a user may pass as ``backend`` (plus "auto")."""
    return ["auto", *sorted(_BACKENDS)]


def check_backend_name(name: str) -> str:
    """ValueError listing the known backends if ``name`` is not one of them."""
    if name not in backend_names():
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(backend_names())}")
    return name


def get_backend(name: str, device: torch.device | str = "cpu") -> DispatchFn:
    """The dispatch function for ``name`` on ``device``; "auto" picks the fastest available."""
    check_backend_name(name)
    if name == "auto":
        if torch.device(device).type == "cuda" and "triton" in _BACKENDS:
            return _BACKENDS["triton"]
        return _BACKENDS["grouped"]
    return _BACKENDS[name]
