"""Which `MoEConfig` settings a layer variant that builds no `MoE` honours.

`MultiTaskMoE` and `SoftMoE` use some of the layer's settings (their experts, dispatch,
gates); every other setting must keep its default, so a config they cannot honour is
refused by name instead of silently ignored, and a setting added to `MoEConfig` later is
refused until a variant learns it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

from gatedmoe.layers.config import MoEConfig


def honoured_settings(config: MoEConfig, honoured: Collection[str], owner: str) -> dict[str, Any]:
    """The ``honoured`` settings of ``config`` as keywords; ValueError naming the first other
    field whose value differs from its `MoEConfig` default."""
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
    for f in dataclasses.fields(MoEConfig):
        if f.name in honoured:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        value = getattr(config, f.name)
        if default is dataclasses.MISSING or value != default:
            raise ValueError(
                f"{owner} cannot honour {f.name}={value!r}; it uses only {', '.join(honoured)} "
                f"(leave {f.name} at its default {default!r})"
            )
    return {name: getattr(config, name) for name in honoured}
