"""Tests of src/gatedmoe/gates/temperature.py."""

import math

import pytest
import torch

from gatedmoe.gates import TemperatureSoftmaxGate
from gatedmoe.gates.functional import annealed_temperature
from helpers import assert_close


def test_schedules():
    assert annealed_temperature(0, 2.0, 0.3, 100, "exponential") == 2.0
    assert math.isclose(annealed_temperature(50, 2.0, 0.3, 100, "exponential"), 2.0 * 0.15**0.5)
    assert math.isclose(annealed_temperature(500, 2.0, 0.3, 100, "exponential"), 0.3)
    assert math.isclose(annealed_temperature(25, 2.0, 0.4, 100, "linear"), 1.6)
    assert annealed_temperature(25, 2.0, 0.4, 100, "constant") == 2.0
    with pytest.raises(ValueError, match="schedule"):
        annealed_temperature(0, 2.0, 0.3, 100, "cosine")


def _gate(**kw):
    g = TemperatureSoftmaxGate(2, 3, **kw)
    with torch.no_grad():
        g.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        g.linear.bias.copy_(torch.tensor([0.0, 0.5, -1.0]))
    return g


X = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
LOGITS = torch.tensor([[1.0, 2.5, 2.0], [-1.0, 1.0, -1.5]], dtype=torch.float64)


def test_dense_softmax_over_temperature():
    g = _gate(tau_start=2.0, noise=False).eval()
    assert_close("probs", torch.softmax(LOGITS / 2.0, -1).float(), g(X).combine_matrix().detach())


def test_activation_before_temperature():
    g = _gate(tau_start=0.5, schedule="constant", activation="tanh", noise=False).eval()
    want = torch.softmax(torch.tanh(LOGITS) / 0.5, -1)
    assert_close("probs", want.float(), g(X).combine_matrix().detach())


def test_threshold_drops_small_weights_keeps_top1():
    g = _gate(tau_start=0.5, schedule="constant", threshold=0.3, noise=False).eval()
    p = torch.softmax(LOGITS / 0.5, -1)
    keep = p >= 0.3
    keep[torch.arange(2), p.argmax(-1)] = True
    r = g(X).validate()
    assert_close("thresholded", (p * keep).float(), r.combine_matrix().detach())
    assert r.n_assignments == int(keep.sum())
    g.renormalize = True
    assert_close("renormalised", (p * keep / (p * keep).sum(-1, keepdim=True)).float(), g(X).combine_matrix().detach())


def test_step_counts_training_forwards_and_anneals():
    g = _gate(tau_start=2.0, tau_end=0.5, anneal_steps=2, schedule="linear", noise=True).train()
    g(X)
    assert int(g.step) == 1 and math.isclose(g.temperature, 1.25)
    g(X)
    assert math.isclose(g.temperature, 0.5)
    g.eval()
    g(X)
    assert int(g.step) == 2


@pytest.mark.parametrize(
    "kw,match",
    [({"tau_start": 0.0}, "tau_start"), ({"threshold": 1.0}, "threshold"), ({"activation": "cube"}, "activation"), ({"schedule": "x"}, "schedule")],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        TemperatureSoftmaxGate(4, 3, **kw)
