"""One spawn of every world size for the whole session: starting gloo processes costs
seconds, so each worker runs all cases (`ep_cases`) and the tests read its results."""

from __future__ import annotations

import pytest
from ep_cases import CASES, spawn

WORLD_SIZES = [2, 4]
_RESULTS: dict[int, list[dict]] = {}


def _results(W: int, tmp_path_factory) -> list[dict]:
    if W not in _RESULTS:
        _RESULTS[W] = spawn(W, str(tmp_path_factory.mktemp(f"ep_w{W}")), names=list(CASES))
    return _RESULTS[W]


@pytest.fixture(scope="session", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def runs(request, tmp_path_factory):
    """``(W, per_rank_results)`` of `ep_cases._worker` on W gloo processes."""
    return request.param, _results(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def runs_w2(tmp_path_factory):
    """The W=2 results alone (the data-parallel checks run there only: DDP and FSDP2
    import torch._dynamo on construction, seconds of CPU per process)."""
    return 2, _results(2, tmp_path_factory)


@pytest.fixture(scope="session")
def runs_w4(tmp_path_factory):
    """The W=4 results alone (checkpoint resharding: ranks 0-1 also form a 2-rank group)."""
    return 4, _results(4, tmp_path_factory)
