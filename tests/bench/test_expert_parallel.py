"""`run_ep_bench` on 2 spawned gloo processes, tiny sizes: a smoke test of the program
and its report, not a timing."""

from __future__ import annotations

import pytest

from gatedmoe.bench.expert_parallel import run_ep_bench
from gatedmoe.bench.report import format_ep_report


def test_run_ep_bench_reports():
    r = run_ep_bench(2, tokens_per_rank=32, d_model=16, d_hidden=32, n_experts=4, k=2, steps=2)
    assert r["check_passed"], r["max_abs_err"]
    assert r["n_ranks"] == 2 and r["backend"] == "gloo"
    assert 0 <= r["all_to_all_share"] <= r["all_to_all_share_max"] <= 1
    assert r["load_imbalance"] >= 0
    assert sum(r["rank_load_last"]) == 2 * 32 * 2
    assert r["tokens_per_s_per_rank"] > 0
    assert "tokens/s per rank" in format_ep_report(r)


def test_run_ep_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_experts=6 must be divisible by n_ranks=4"):
        run_ep_bench(4, n_experts=6)
    with pytest.raises(ValueError, match="dtype"):
        run_ep_bench(2, dtype="float8")
    with pytest.raises(ValueError, match="tokens_per_rank"):
        run_ep_bench(2, tokens_per_rank=0)
