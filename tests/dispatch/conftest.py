"""Dispatch tests: on CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1,
set by the top-level conftest.py), patched here for numpy >= 2.4 (`triton_interpret`)."""

import importlib.util

if importlib.util.find_spec("triton") is not None:
    from triton_interpret import apply

    apply()
