"""One spawn of every world size for the whole session: starting gloo processes costs
seconds, so each worker runs all cases (`ep_cases`) and the tests read its results."""

from __future__ import annotations

import pytest
from ep_cases import CASES, spawn

WORLD_SIZES = [2, 4]


@pytest.fixture(scope="session", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def runs(request, tmp_path_factory):
    """``(W, per_rank_results)`` of `ep_cases._worker` on W gloo processes."""
    W = request.param
    out = tmp_path_factory.mktemp(f"ep_w{W}")
    return W, spawn(W, str(out), names=list(CASES))
