"""Gate probabilities against float64 brute force and the shared torch gate math."""

import itertools
import math

import numpy as np
import pytest

from gatedmoe.stats.gating import (
    GATE_ALIASES,
    GATES,
    check_gate,
    gate_features,
    gate_log_probs,
    gate_logit_grad,
    gate_probs,
    logsumexp_rows,
    make_gate,
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
            t = temperature if gate == "temperature_softmax" else 1.0
            total = sum(math.exp(row[e] / t) for e in kept)
            for e in kept:
                out[n, e] = math.exp(row[e] / t) / total
    return out


CASES = [("softmax", None, 1.0), ("temperature_softmax", None, 0.3), ("temperature_softmax", None, 4.0), ("topk_softmax", 1, 1.0),
         ("topk_softmax", 2, 1.0), ("sigmoid", None, 1.0), ("sigmoid", 2, 1.0), ("modified_softmax", None, 1.0)]


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
        check_gate("topk_softmax", 3, 4, 1.0)
    with pytest.raises(ValueError, match="k only applies"):
        check_gate("softmax", 3, 2, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        check_gate("temperature_softmax", 3, None, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        check_gate("softmax", 3, None, 2.0)
    assert check_gate("topk_softmax", 3, 3, 1.0) is None
    with pytest.raises(ValueError, match="gate='topk_softmax' needs k"):
        check_gate("topk_softmax", 3, None, 1.0)  # never silently the dense softmax
    # Renamed in issue 16 to the deep registry's names; the old names are aliases.
    assert set(GATES) == {"softmax", "topk_softmax", "temperature_softmax", "sigmoid", "modified_softmax"}
    assert GATE_ALIASES == {"topk": "topk_softmax", "temperature": "temperature_softmax"}


@pytest.mark.parametrize("gate,k,temperature", CASES)
def test_gate_table_matches_the_deep_gates_math(gate, k, temperature):
    """The numpy table and `gatedmoe.gates.functional` (torch) agree on what a gate is."""
    torch = pytest.importorskip("torch")
    from gatedmoe.gates import functional

    rng = np.random.default_rng(3)
    l = rng.normal(scale=3, size=(17, 4))
    l_TE = torch.from_numpy(l)
    if gate in ("softmax", "modified_softmax", "temperature_softmax"):
        ref = functional.softmax_probs(l_TE, temperature=temperature)
    else:
        fn = functional.topk_softmax if gate == "topk_softmax" else functional.sigmoid_topk
        kw = {"renormalize": True} if gate == "topk_softmax" else {"normalize": True}
        w_TK, idx_TK, _ = fn(l_TE, k or 4, **kw)
        ref = torch.zeros_like(l_TE).scatter(1, idx_TK, w_TK)
    np.testing.assert_allclose(make_gate(gate, 4, k, temperature).probs(l), ref.numpy(), rtol=1e-12, atol=1e-15)


def test_gate_names_are_the_deep_registry_names():
    pytest.importorskip("torch")
    from gatedmoe import gates

    assert set(GATES) <= set(gates.names())


def test_each_table_entry_is_complete():
    for name in GATES:
        g = make_gate(name, 4, k=4 if name == "topk_softmax" else None)
        assert g.name == name and g.n_free(4) in (3, 4) and not g.sparse
        X = np.random.default_rng(0).normal(size=(5, 2))
        assert g.design(X).shape == (5, 3)
    assert make_gate("sigmoid", 4).n_free(4) == 4 and make_gate("softmax", 4).n_free(4) == 3
    assert make_gate("topk_softmax", 4, k=2).dense().name == "softmax"
    assert make_gate("sigmoid", 4, k=2).dense() == make_gate("sigmoid", 4)
    # A sparse sigmoid fit starts from the dense softmax (and, for k > 1, the dense sigmoid).
    assert [g.name for g in make_gate("sigmoid", 4, k=1).dense_starts()] == ["softmax"]
    assert [g.name for g in make_gate("sigmoid", 4, k=2).dense_starts()] == ["softmax", "sigmoid"]


def test_deprecated_gate_names_warn_where_the_user_calls():
    from gatedmoe.stats import MoERegressor, MoETruth

    X = np.random.default_rng(0).normal(size=(60, 1))
    y = np.where(X[:, 0] > 0, 2.0, -2.0) + 0.1 * X[:, 0]
    with pytest.warns(FutureWarning, match="use gate='topk_softmax'") as rec:
        old = MoERegressor(n_experts=2, gate="topk", k=1, random_state=0, max_iter=5).fit(X, y)
    assert rec[0].filename == __file__
    new = MoERegressor(n_experts=2, gate="topk_softmax", k=1, random_state=0, max_iter=5).fit(X, y)
    np.testing.assert_array_equal(old.predict(X), new.predict(X))
    assert old.get_params()["gate"] == "topk"  # scikit-learn: fit never rewrites a parameter
    t = MoETruth.well_separated(2, 1)
    with pytest.warns(FutureWarning, match="temperature_softmax") as rec:
        truth = MoETruth(t.gate_coef, t.gate_intercept, t.expert_coef, t.expert_intercept, t.noise_variance,
                         gate="temperature")
    assert rec[0].filename == __file__
    assert truth.gate == "temperature_softmax"


def test_import_stats_loads_neither_torch_nor_the_deep_stack():
    """`import gatedmoe.stats` (with the top-level package lazy) pulls in no torch, gates,
    dispatch or layers."""
    import os
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    # Stand in for a lazy gatedmoe/__init__.py: a bare package object on the same path.
    code = (
        "import sys, types, os; pkg = types.ModuleType('gatedmoe'); "
        f"pkg.__path__ = [os.path.join({src!r}, 'gatedmoe')]; sys.modules['gatedmoe'] = pkg; "
        "import gatedmoe.stats; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('gatedmoe.gates', "
        "'gatedmoe.dispatch', 'gatedmoe.layer', 'gatedmoe.experts'))); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("gate,k", [("topk_softmax", 1), ("topk_softmax", 2), ("sigmoid", 1), ("sigmoid", 2)])
def test_smoothed_topk_gradient_and_limit(gate, k):
    rng = np.random.default_rng(4)
    l = rng.normal(scale=2, size=(7, 4))
    T = rng.dirichlet(np.ones(4), size=7)
    sm = make_gate(gate, 4, k).smoothed(0.7)
    _, grad = sm.logit_grad(l, T)
    h = 1e-6
    for n, e in itertools.product(range(7), range(4)):
        lp, lm = l.copy(), l.copy()
        lp[n, e] += h
        lm[n, e] -= h
        fd = (sm.logit_grad(lp, T)[0] - sm.logit_grad(lm, T)[0]) / (2 * h)
        assert abs(fd - grad[n, e]) < 1e-6, (n, e, fd, grad[n, e])
    # Narrow width: the hard top-K gate.
    hard = make_gate(gate, 4, k)
    np.testing.assert_allclose(hard.smoothed(1e-4).probs(l), hard.probs(l), atol=1e-8)


def test_sigmoid_start_from_softmax_keeps_the_order_and_takes_the_best_scale_and_shift():
    # Logits of a saturated top-2 sigmoid truth (the 45-unit issue-19 miss): the
    # exponential-regime map of them makes the sigmoid gate a softmax; among that map and
    # its rescalings and shifts, the start must be the one with the highest hard-gate
    # likelihood (experts fixed), computed here from the gate's own probabilities.
    from gatedmoe.stats import gating

    rng = np.random.default_rng(0)
    F = np.c_[rng.normal(size=(500, 1)), np.ones(500)]
    W_sig = np.array([[-9.0, -6.0, -3.0, 0.0], [0.0, 3.0, 3.0, 0.0]])
    g = make_gate("sigmoid", 4, k=2)
    expert = rng.integers(0, 4, 500)
    le = np.where(np.arange(4) == expert[:, None], 0.0, -3.0)
    (W,) = g.from_dense(W_sig, F, make_gate("softmax", 4), le)

    def ll(W):
        return float(logsumexp_rows(g.log_probs(F @ W) + le).sum())

    W_exp = W_sig.copy()
    W_exp[-1] -= (F @ W_sig).max() + 4.0
    cands = [W_exp]
    for a in gating.SIGMOID_START_SCALES:
        for m in gating.SIGMOID_START_SHIFTS:
            Wc = a * W_exp
            Wc[-1] += m - (F @ Wc).max()
            cands.append(Wc)
    assert ll(W) == pytest.approx(max(ll(c) for c in cands), rel=1e-12)
    # Here the saturated regime is better than the softmax-like one.
    assert ll(W) > ll(W_exp) + 10
    # Every candidate is a positive scale and a common shift: the order of the logits (so
    # the top-K selection) is the softmax fit's.
    np.testing.assert_array_equal(np.argsort(F @ W, axis=1), np.argsort(F @ W_sig, axis=1))
    assert g.from_dense(W_sig, F, make_gate("sigmoid", 4), le)[0] is W_sig
