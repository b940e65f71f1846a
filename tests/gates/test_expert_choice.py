"""Tests of src/gatedmoe/gates/expert_choice.py."""

import pytest
import torch

from gatedmoe.gates import ExpertChoiceGate
from helpers import assert_close


def test_each_expert_takes_its_top_c_tokens():
    g = ExpertChoiceGate(2, 2, capacity_factor=1.0)
    with torch.no_grad():
        g.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # logits = x; S[:, 0] = sigmoid(x0 - x1). C = ceil(1 * 4 / 2) = 2.
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    r = g(x).validate()
    S = torch.softmax(x.double(), -1)
    # Expert 0: tokens 0 (S=.95) and 3 (S=.88); expert 1: tokens 2 (.88) and 1 (.27).
    assert r.counts.tolist() == [2, 2]
    assert sorted(r.token[:2].tolist()) == [0, 3] and sorted(r.token[2:].tolist()) == [1, 2]
    want = torch.zeros(4, 2, dtype=torch.float64)
    for t, e in [(0, 0), (3, 0), (2, 1), (1, 1)]:
        want[t, e] = S[t, e]
    assert_close("combine", want.float(), r.combine_matrix().detach())
    assert r.experts_per_token().tolist() == [1, 1, 1, 1]


def test_capacity_capped_at_tokens():
    g = ExpertChoiceGate(4, 2, capacity_factor=8.0)
    assert g.capacity(3) == 3
    assert g(torch.randn(3, 4)).n_assignments == 6


def test_bad_capacity():
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceGate(4, 2, capacity_factor=0)
