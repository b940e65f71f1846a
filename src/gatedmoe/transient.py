"""`TransientState`: per-forward results that copies and pickles leave behind.

Layers and gates keep what their last forward produced (routings, auxiliary losses) on the
instance. Those tensors are part of the autograd graph, which `copy.deepcopy` refuses to
copy, so a model could not be deep-copied (an EMA model, a frozen reference model) after a
training step. A copy starts with these attributes empty instead, as a fresh module would.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["TransientState"]


class TransientState:
    """Mixin for `nn.Module` subclasses: attributes named in ``_transient`` (with their
    empty values) are reset in the state that `copy.deepcopy` and `pickle` see."""

    _transient: ClassVar[dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        for name, empty in self._transient.items():
            if name in state:
                state[name] = type(empty)() if isinstance(empty, (dict, list)) else empty
        return state

    def _set_transient(self, name: str, value: Any) -> None:
        """Store a forward's result ``value`` (a dict or a `Routing`) in the attribute ``name``
        of ``_transient``. Those are plain attributes (made so in ``__init__``, never a
        Parameter, Module or buffer), for which ``nn.Module.__setattr__``'s checks end in
        ``object.__setattr__`` anyway; calling it directly leaves them out (~1.2 us per store
        on a CPU core, on every forward of every layer)."""
        object.__setattr__(self, name, value)
