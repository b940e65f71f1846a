"""Router replay: record a forward's routing, replay it with the same parameters (same
outputs, exactly) and after an update (same experts; weights recorded or from the router)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from gatedmoe import MoE
from gatedmoe.replay import RouterReplay
from helpers import assert_close


def _model(**kw) -> torch.nn.Sequential:
    torch.manual_seed(0)
    kw = {"load_balance_weight": 0.0, "router_z_weight": 0.0, **kw}
    return torch.nn.Sequential(MoE(8, 6, 16, k=2, **kw), MoE(8, 6, 12, k=3, **kw))


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model:
            m.gate.weight.add_(torch.randn_like(m.gate.weight))


@pytest.mark.parametrize("weights", ["recorded", "router"])
@pytest.mark.parametrize("kw", [{}, {"capacity_factor": 0.75}, {"gate": "sigmoid"}], ids=["topk", "capacity", "sigmoid"])
def test_replay_with_same_parameters_reproduces_the_forward(weights, kw):
    model = _model(**kw)
    xs = torch.randn(2, 3, 7, 8)  # two micro-batches
    replay = RouterReplay(model)
    with replay.record():
        ref_ys = [model(x) for x in xs]
    assert [len(v) for v in replay.records.values()] == [2, 2]
    with replay.replay(weights):
        fast_ys = [model(x) for x in xs]
    for ref_y, fast_y in zip(ref_ys, fast_ys, strict=True):
        assert_close("y", ref_y, fast_y)


def test_replay_after_an_update_keeps_the_recorded_experts():
    model = _model()
    x = torch.randn(10, 8)
    replay = RouterReplay(model)
    with replay.record():
        model(x)
    rec = replay.records["0"][0]
    assert rec.expert.dtype == torch.int16 and rec.token.dtype == torch.int32 and rec.weight.dtype == torch.float32
    _perturb(model)
    model(x)
    assert not torch.equal(model[0].last_routing.expert, rec.expert.long())  # the router changed its mind
    with replay.replay("recorded"):
        y = model(x)
    r = model[0].last_routing
    assert torch.equal(r.token, rec.token.long()) and torch.equal(r.expert, rec.expert.long())
    assert torch.equal(r.weight, rec.weight)
    y.sum().backward()
    assert model[0].gate.weight.grad is None  # recorded weights are constants
    with replay.replay("router"):
        y = model(x)
    r = model[0].last_routing
    # topk_softmax renormalises: p_e / sum of p over the token's recorded experts.
    p_TE = torch.softmax(x @ model[0].gate.weight.detach().T, -1)
    p_N = p_TE[r.token, r.expert]
    p_T = torch.zeros(10).index_add(0, r.token, p_N)
    assert_close("router weights", p_N / p_T[r.token], r.weight.detach())
    y.sum().backward()
    assert model[0].gate.weight.grad is not None and model[0].gate.weight.grad.abs().sum() > 0


def test_records_round_trip_through_safetensors(tmp_path):
    model = _model()
    x = torch.randn(4, 5, 8)
    replay = RouterReplay(model)
    with replay.record():
        ref_y = model(x)
    save_file(replay.state_dict(), str(tmp_path / "routing.safetensors"))
    _perturb(model)
    other = RouterReplay(model)
    other.load_state_dict(load_file(str(tmp_path / "routing.safetensors")))
    with other.replay():
        fast_y = model(x)
    # Same experts and weights, but the gate changed: only the routing is equal.
    assert torch.equal(model[1].last_routing.expert, replay.records["1"][0].expert.long())
    assert fast_y.shape == ref_y.shape


def test_replay_errors():
    model = _model()
    replay = RouterReplay(model)
    with replay.record():
        model(torch.randn(4, 8))
    with pytest.raises(ValueError, match="4 tokens"), replay.replay():
        model(torch.randn(5, 8))
    with pytest.raises(IndexError, match="1 recorded"), replay.replay():
        model(torch.randn(4, 8))
        model(torch.randn(4, 8))
    with pytest.raises(ValueError, match="weights must be one of"):
        replay.replay("fresh")
    with pytest.raises(ValueError, match="no gatedmoe.MoE"):
        RouterReplay(torch.nn.Linear(2, 2))
    # Hooks are gone after the blocks: plain forwards route freshly.
    model(torch.randn(5, 8))
