import pytest
import torch

from gatedmoe import Routing


def test_from_topk_sorts_by_expert_keeping_token_order():
    w = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
    e = torch.tensor([[2, 0], [0, 1], [2, 1]])
    r = Routing.from_topk(w, e, n_experts=4).validate()
    assert r.expert.tolist() == [0, 0, 1, 1, 2, 2]
    assert r.token.tolist() == [0, 1, 1, 2, 0, 2]
    assert r.weight.tolist() == pytest.approx([0.4, 0.9, 0.1, 0.5, 0.6, 0.5])
    assert r.counts.tolist() == [2, 2, 2, 0]
    assert r.offsets.tolist() == [2, 4, 6, 6]
    assert r.n_tokens == 3 and r.n_experts == 4 and r.n_assignments == 6


def test_combine_matrix_and_experts_per_token():
    w = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    e = torch.tensor([[2, 0], [0, 1]])
    r = Routing.from_topk(w, e, n_experts=3)
    expected = torch.tensor([[0.4, 0.0, 0.6], [0.9, 0.1, 0.0]])
    torch.testing.assert_close(r.combine_matrix(), expected)
    assert r.experts_per_token().tolist() == [2, 2]


def test_drop_over_capacity_position_priority_hand_example():
    # 5 tokens, top-1. Expert 0 is chosen by tokens 0, 2, 3, 4; expert 1 by token 1.
    w = torch.tensor([[0.5], [0.9], [0.8], [0.7], [0.95]])
    e = torch.tensor([[0], [1], [0], [0], [0]])
    r = Routing.from_topk(w, e, n_experts=2).drop_over_capacity(2, priority="position").validate()
    assert r.token.tolist() == [0, 2, 1]
    assert r.expert.tolist() == [0, 0, 1]
    assert r.counts.tolist() == [2, 1]
    assert r.n_dropped == 2
    assert r.weight.tolist() == pytest.approx([0.5, 0.8, 0.9])


def test_drop_over_capacity_score_priority_hand_example():
    w = torch.tensor([[0.5], [0.9], [0.8], [0.7], [0.95]])
    e = torch.tensor([[0], [1], [0], [0], [0]])
    r = Routing.from_topk(w, e, n_experts=2).drop_over_capacity(2, priority="score").validate()
    assert sorted(r.token[:2].tolist()) == [2, 4]  # the two highest weights of expert 0
    assert r.counts.tolist() == [2, 1]
    assert r.n_dropped == 2


def test_drop_over_capacity_counts_accumulate_and_noop():
    w = torch.rand(8, 2)
    e = torch.stack([torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)], 1)
    r = Routing.from_topk(w, e, 2)
    assert r.drop_over_capacity(8).n_dropped == 0
    r2 = r.drop_over_capacity(5).drop_over_capacity(3)
    assert r2.n_dropped == 10 and r2.counts.tolist() == [3, 3]


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_drop_over_capacity_rejects_bad_capacity(bad, exc):
    r = Routing.from_topk(torch.rand(3, 1), torch.zeros(3, 1, dtype=torch.long), 2)
    with pytest.raises(exc, match="capacity"):
        r.drop_over_capacity(bad)


def test_drop_over_capacity_rejects_bad_priority():
    r = Routing.from_topk(torch.rand(3, 1), torch.zeros(3, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="priority"):
        r.drop_over_capacity(1, priority="random")


def test_validate_catches_broken_invariants():
    r = Routing.from_topk(torch.rand(4, 2), torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]]), 3)
    from dataclasses import replace

    with pytest.raises(ValueError, match="non-decreasing"):
        replace(r, expert=r.expert.flip(0)).validate()
    with pytest.raises(ValueError, match="counts"):
        replace(r, counts=torch.tensor([8, 0, 0])).validate()
    with pytest.raises(ValueError, match="token"):
        replace(r, token=r.token + 10).validate()
    with pytest.raises(ValueError, match="probs"):
        replace(r, probs=torch.rand(4, 5)).validate()
    with pytest.raises(ValueError, match="NaN"):
        replace(r, weight=torch.full_like(r.weight, float("nan"))).validate()


def test_builders_reject_bad_input():
    with pytest.raises(ValueError, match="shape"):
        Routing.from_topk(torch.rand(3, 2), torch.zeros(3, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="expert ids"):
        Routing.from_topk(torch.rand(3, 1), torch.full((3, 1), 5), 2)
    with pytest.raises(ValueError, match="n_experts"):
        Routing.from_assignments(torch.zeros(1), torch.zeros(1), torch.ones(1), n_experts=0, n_tokens=1)


def test_empty_routing_is_valid():
    r = Routing.from_assignments(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), n_experts=3, n_tokens=4
    ).validate()
    assert r.counts.tolist() == [0, 0, 0]
    assert r.drop_over_capacity(1).n_dropped == 0


def test_per_assignment_is_one_unit_weight_row_per_assignment():
    r = Routing.from_topk(torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]]), torch.tensor([[2, 0], [0, 1], [2, 1]]), 3)
    rows = r.per_assignment(torch.float16)
    assert rows.n_tokens == r.n_assignments == 6
    assert torch.equal(rows.token, torch.arange(6))
    assert torch.equal(rows.expert, r.expert) and torch.equal(rows.counts, r.counts)
    assert rows.weight.dtype == torch.float16 and torch.equal(rows.weight, torch.ones(6, dtype=torch.float16))
