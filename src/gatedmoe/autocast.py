"""How gatedmoe's products meet ``torch.autocast``: as a linear layer's would.

Autocast rounds a linear layer's inputs to its dtype (bf16, fp16) and leaves alone ops it does
not list, such as the grouped GEMMs and Triton kernels of the dispatch backends; the router
would even lose its float32 logits to an autocast ``F.linear``. `outside_autocast` gives every
such product the linear layer's input dtype and then runs it with autocast off, so each op
inside sees explicit dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["outside_autocast"]

R = TypeVar("R")


def outside_autocast(fn: Callable[..., R], x: Tensor, *args: object) -> R:
    """``fn(x, *args)``; under ``torch.autocast`` on ``x``'s device, with ``x`` cast to
    autocast's dtype and autocast off inside ``fn``.

    Examples
    --------
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     outside_autocast(lambda x: x.dtype, torch.ones(2))
    torch.bfloat16
    >>> outside_autocast(lambda x: x.dtype, torch.ones(2))
    torch.float32
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return fn(x, *args)
    with torch.autocast(device_type, enabled=False):
        return fn(x.to(torch.get_autocast_dtype(device_type)), *args)
