import os

import torch

# Without a GPU, run the Triton kernels in Triton's CPU interpreter. Must be set before the
# kernels are defined (they are imported lazily, after this file).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
