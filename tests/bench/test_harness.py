"""The shared pieces of the benchmarks: routings, timer, machine info, ceiling."""

from __future__ import annotations

import torch

from gatedmoe.bench.harness import (
    BenchShape,
    balanced_routing,
    dense_ceiling,
    machine_info,
    random_routing,
    time_ms,
)
from gatedmoe.dispatch.options import TritonOptions


def test_balanced_routing_is_balanced_and_distinct():
    r = balanced_routing(63, 4, 3, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert r.counts.sum().item() == 63 * 3
    # Balanced in expectation: at T=4096 every expert is within 10% of T*K/E.
    big = balanced_routing(4096, 8, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert (big.counts.float() / (4096 * 2 / 8) - 1).abs().max().item() < 0.1
    # Each token's K experts are distinct: no (token, expert) pair repeats.
    pairs = set(zip(r.token.tolist(), r.expert.tolist(), strict=True))
    assert len(pairs) == 63 * 3


def test_random_routing_counts_assignments():
    r = random_routing(32, 8, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert r.n_assignments == 64


def test_time_ms_and_ceiling_are_positive():
    assert time_ms(lambda: torch.ones(4).sum(), torch.device("cpu"), warmup=1, reps=3) >= 0
    assert dense_ceiling(torch.device("cpu"), torch.float32, n=32, warmup=1, reps=2) > 0


def test_machine_info_on_cpu_has_no_gpu_keys():
    info = machine_info(torch.device("cpu"), TritonOptions(fp32_scatter=True))
    assert {"torch", "python", "cpu", "cores"} <= set(info) and "gpu" not in info


def test_shape_label():
    assert BenchShape(64, 16, 32, 4, 2).label() == "T=64 d=16 h=32 E=4 k=2"
