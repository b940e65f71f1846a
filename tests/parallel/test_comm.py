"""`all_to_all` on 2 and 4 gloo processes: uneven and empty splits, gradient = reverse
exchange, exchange statistics. Results come from the session's spawn (conftest)."""

from __future__ import annotations

import torch
from ep_cases import comm_send_splits


def test_rows_reach_their_destination(runs):
    W, per_rank = runs
    for r in range(W):
        recv = [comm_send_splits(W, src)[r] for src in range(W)]
        expected = [[src, r, i] for src in range(W) for i in range(recv[src])]
        # Exact: an exchange only moves rows.
        assert per_rank[r]["comm"]["y"].tolist() == expected


def test_gradient_is_reverse_exchange(runs):
    W, per_rank = runs
    for r in range(W):
        c = per_rank[r]["comm"]
        # Upstream gradient y + 1 travels back to the row it came from.
        assert torch.equal(c["x_grad"], c["x"] + 1)


def test_exchange_stats(runs):
    W, per_rank = runs
    for r in range(W):
        c = per_rank[r]["comm"]
        n_recv = c["y"].shape[0]
        assert c["calls"] == 2  # forward and backward
        assert c["bytes_sent"] == (c["x"].numel() + n_recv * 3) * 8
        assert c["timed"]
