"""Make Triton's CPU interpreter (TRITON_INTERPRET=1) work with numpy >= 2.4.

Triton's interpreter (seen in 3.6) turns loop bounds into Python ints with ``int(array)`` on
a one-element 1-D array, which numpy 2.4 rejects ("only 0-dimensional arrays can be
converted to Python scalars"). The interpreter only runs our kernels on CPU in tests, so
the tests patch that one conversion and nothing else (`conftest.py` applies it, and only
when TRITON_INTERPRET=1); the package itself never imports this.
"""

from __future__ import annotations

import os


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    from triton.runtime import interpreter

    if getattr(interpreter, "_gatedmoe_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._gatedmoe_patched = True
