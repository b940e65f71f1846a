"""Gate probabilities against float64 brute force and the shared torch gate math."""

import itertools
import math

import numpy as np
import pytest

from gatedmoe.stats.gating import (
    GATES,
    check_gate,
    gate_features,
    gate_log_probs,
    gate_logit_grad,
    gate_probs,
)


def brute_force(l, gate, k, temperature):
    """Per row, per expert, straight from the papers' formulas with math.exp."""
    out = np.zeros_like(l)
    for n, row in enumerate(l):
        E = len(row)
        kept = sorted(range(E), key=lambda e: (-row[e], e))[: (k or E)]
        if gate == "sigmoid":
            s = [1.0 / (1.0 + math.exp(-row[e])) for e in range(E)]
            total = sum(s[e] for e in kept)
            for e in kept:
                out[n, e] = s[e] / total
        else:
            t = temperature if gate == "temperature" else 1.0
            total = sum(math.exp(row[e] / t) for e in kept)
            for e in kept:
                out[n, e] = math.exp(row[e] / t) / total
    return out


CASES = [("softmax", None, 1.0), ("temperature", None, 0.3), ("temperature", None, 4.0), ("topk", 1, 1.0),
         ("topk", 2, 1.0), ("sigmoid", None, 1.0), ("sigmoid", 2, 1.0), ("modified_softmax", None, 1.0)]


@pytest.mark.parametrize("gate,k,temperature", CASES)
def test_gate_probs_match_brute_force(gate, k, temperature):
    rng = np.random.default_rng(1)
    l = rng.normal(scale=3, size=(17, 4))
    ref = brute_force(l, gate, k, temperature)
    np.testing.assert_allclose(np.exp(gate_log_probs(l, gate, k, temperature)), ref, rtol=1e-12, atol=1e-15)
    # The torch path through gatedmoe.gates.functional gives the same numbers.
    np.testing.assert_allclose(gate_probs(l, gate, k, temperature), ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("gate,k,temperature", CASES)
def test_logit_gradient_matches_finite_differences(gate, k, temperature):
    rng = np.random.default_rng(2)
    l = rng.normal(size=(6, 4))
    # Targets only on kept experts (as EM responsibilities are).
    T = rng.random((6, 4)) * np.isfinite(gate_log_probs(l, gate, k, temperature))
    T /= T.sum(1, keepdims=True)
    _, grad = gate_logit_grad(l, T, gate, k, temperature)
    h = 1e-6
    for n, e in itertools.product(range(6), range(4)):
        lp, lm = l.copy(), l.copy()
        lp[n, e] += h
        lm[n, e] -= h
        fd = (gate_logit_grad(lp, T, gate, k, temperature)[0] - gate_logit_grad(lm, T, gate, k, temperature)[0]) / (2 * h)
        assert abs(fd - grad[n, e]) < 1e-6, (n, e, fd, grad[n, e])


def test_modified_softmax_transforms_input_with_tanh():
    X = np.array([[-3.0, 0.5]])
    np.testing.assert_array_equal(gate_features(X, "modified_softmax"), np.tanh(X))
    np.testing.assert_array_equal(gate_features(X, "softmax"), X)


def test_bad_gate_options_raise_naming_the_argument():
    with pytest.raises(ValueError, match="gate must be one of"):
        check_gate("nope", 3, None, 1.0)
    with pytest.raises(ValueError, match="k must be"):
        check_gate("topk", 3, 4, 1.0)
    with pytest.raises(ValueError, match="k only applies"):
        check_gate("softmax", 3, 2, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        check_gate("temperature", 3, None, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        check_gate("softmax", 3, None, 2.0)
    assert check_gate("topk", 3, 3, 1.0) is None
    assert set(GATES) == {"softmax", "topk", "temperature", "sigmoid", "modified_softmax"}
