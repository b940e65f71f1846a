import math

import pytest
import torch

from gatedmoe import MoE, Routing
from gatedmoe.analysis import RoutingStats


def test_hand_example_statistics():
    # Expert 0 gets 3 assignments, expert 1 gets 1; one more was dropped.
    w = torch.ones(4, 1)
    e = torch.tensor([[0], [0], [1], [0]])
    probs = torch.tensor([[0.5, 0.5]] * 4)
    r = Routing.from_topk(w, e, 2, probs=probs)
    r = Routing(r.token, r.expert, r.weight, r.counts, r.n_tokens, probs=probs, n_dropped=1)
    stats = RoutingStats()
    stats.update(r, "l0")
    s = stats.summary()["layers"]["l0"]
    assert s["load"] == pytest.approx([0.75, 0.25])
    assert s["cv"] == pytest.approx(0.25 / 0.5)
    assert s["max_violation"] == pytest.approx(0.75 / 0.5 - 1)
    assert s["entropy"] == pytest.approx(math.log(2))
    assert s["entropy_normalized"] == pytest.approx(1.0)
    assert s["dropped_fraction"] == pytest.approx(1 / 5)


def test_accumulates_over_batches_and_layers(tmp_path):
    model = torch.nn.Sequential(MoE(8, 4, 16), MoE(8, 6, 16, k=1))
    stats = RoutingStats()
    for _ in range(3):
        model(torch.randn(10, 8))
        stats.update_model(model)
    s = stats.summary()
    assert list(s["layers"]) == ["0", "1"]
    assert s["layers"]["0"]["n_tokens"] == 30
    assert sum(s["layers"]["1"]["load"]) == pytest.approx(1.0)
    png = stats.plot(tmp_path / "load.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean" in stats.format()


def test_errors():
    stats = RoutingStats()
    with pytest.raises(ValueError, match="update"):
        stats.plot("x.png")
    with pytest.raises(TypeError, match="Routing"):
        stats.update("nope")
    with pytest.raises(ValueError, match="forward"):
        stats.update_model(MoE(8, 4, 16))


def test_coactivation_and_tokens_by_hand():
    # Token 0 -> experts {0, 1}, token 1 -> {1, 2}, token 2 -> {1}; token ids 5, 2, 5.
    r = Routing.from_assignments(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 2, 1]), torch.ones(5),
                                 n_experts=3, n_tokens=3)
    stats = RoutingStats()
    stats.update(r, "l0", token_ids=torch.tensor([5, 2, 5]))
    co = stats.coactivation("l0")
    assert co.tolist() == [[1, 1, 0], [1, 3, 1], [0, 1, 1]]
    assert stats.coactivation("l0", normalize=True)[1].tolist() == pytest.approx([1 / 3, 1.0, 1 / 3])
    tok = stats.token_expert_counts("l0")
    assert tok.shape == (6, 3) and tok[5].tolist() == [1, 2, 0] and tok[2].tolist() == [0, 1, 1]
    assert stats.summary()["layers"]["l0"]["experts_per_token"] == pytest.approx(5 / 3)
    stats.update(r, "l0", token_ids=torch.tensor([7, 0, 0]))  # larger id: the table grows
    assert stats.token_expert_counts("l0").shape == (8, 3)
    with pytest.raises(ValueError, match="token_ids"):
        stats.update(r, "l0", token_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unknown layer"):
        stats.coactivation("l9")
