"""Gate math of the statistical MoE literature, in numpy float64 for EM.

Every gate maps gate scores (logits) ``l = beta . z(x) + beta0`` of shape ``[N, E]`` to
weights ``g(x)`` on the simplex. ``z(x) = x`` except for ``"modified_softmax"``.
Shape legend: N samples, P features, E experts.

=====================  ====================================================================
name                   g_e(x)
=====================  ====================================================================
``softmax``            ``exp(l_e) / sum_j exp(l_j)`` (Jordan & Jacobs 1994; Nguyen, Nguyen &
                       Ho 2023, "Demystifying softmax gating function in Gaussian MoE")
``temperature``        ``softmax(l / tau)_e`` with a fixed temperature ``tau`` (Nguyen et al.
                       2024, "Is temperature sample efficient for softmax Gaussian MoE?")
``topk``               ``softmax(TopK(l, K))_e``: logits outside the K largest are set to
                       ``-inf`` (Nguyen, Akbarian, Yan & Ho 2024, "Statistical perspective of
                       top-K sparse softmax gating MoE"; the same as Shazeer et al. 2017)
``sigmoid``            ``s_e / sum_j s_j`` with ``s = sigmoid(l)``, optionally over the top K
                       (Nguyen et al. 2024, "Sigmoid gating is more sample efficient than
                       softmax gating"; normalised as in DeepSeek-V3 so that ``p(y|x)`` is a
                       density: the paper's unnormalised weights define a regression
                       function, not a mixture likelihood)
``modified_softmax``   ``softmax(beta . tanh(x) + beta0)_e`` (Nguyen, Akbarian, Nguyen & Ho
                       2024, "A general theory for softmax gating multinomial logistic MoE":
                       a bounded transform of the input before the gate)
=====================  ====================================================================

Softmax-family gates are invariant to adding one vector to every expert's parameters, so
the fitted parameters fix the last expert's gate at zero; the normalised sigmoid gate is
not, and all its experts' parameters are free.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit, log_expit

from gatedmoe.gates.functional import sigmoid_topk, softmax_probs, topk_softmax

__all__ = [
    "GATES",
    "check_gate",
    "gate_features",
    "gate_log_probs",
    "gate_probs",
    "gate_logit_grad",
    "n_free_gate_experts",
]

GATES = ("softmax", "topk", "temperature", "sigmoid", "modified_softmax")


def check_gate(gate: str, n_experts: int, k: int | None, temperature: float) -> int | None:
    """Validate a gate name and its options; return the number of kept experts (None = all).

    ``k`` is used by ``"topk"`` and ``"sigmoid"``; ``temperature`` by ``"temperature"``
    (and accepted, but must be 1, for the other gates).
    """
    if not isinstance(gate, str) or gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}; got {gate!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) or not (
        np.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if gate != "temperature" and temperature != 1.0:
        raise ValueError(f"temperature={temperature} only applies to gate='temperature', got gate={gate!r}")
    if k is None:
        return None
    if gate not in ("topk", "sigmoid"):
        raise ValueError(f"k only applies to gate='topk' or 'sigmoid', got gate={gate!r} with k={k}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_experts:
        raise ValueError(f"k must be an integer in [1, n_experts={n_experts}], got {k!r}")
    return None if k == n_experts else int(k)


def n_free_gate_experts(gate: str, n_experts: int) -> int:
    """Experts whose gate parameters are free (softmax family: the last is fixed at 0)."""
    return n_experts if gate == "sigmoid" else n_experts - 1


def gate_features(X_NP: np.ndarray, gate: str) -> np.ndarray:
    """The gate's input ``z(x)``: ``tanh(x)`` for ``"modified_softmax"``, else ``x``."""
    return np.tanh(X_NP) if gate == "modified_softmax" else X_NP


def logsumexp_rows(A_NE: np.ndarray) -> np.ndarray:
    """``log sum_e exp(A_ne)`` ``[N]``; rows must hold at least one finite entry.

    numpy's reductions along a short last axis are ~20x slower than a loop over the E
    columns (max) and a matrix-vector product (sum), which is what this does.
    """
    m_N = A_NE[:, 0].copy()
    for e in range(1, A_NE.shape[1]):
        np.maximum(m_N, A_NE[:, e], out=m_N)
    return m_N + np.log(row_sum(np.exp(A_NE - m_N[:, None])))


def row_sum(A_NE: np.ndarray) -> np.ndarray:
    """``A.sum(axis=1)`` as a matrix-vector product (fast for few columns)."""
    return A_NE @ np.ones(A_NE.shape[1])


def log_softmax_rows(A_NE: np.ndarray) -> np.ndarray:
    """``A - logsumexp(A)`` per row ``[N, E]``."""
    return A_NE - logsumexp_rows(A_NE)[:, None]


def _topk_mask(scores_NE: np.ndarray, k: int) -> np.ndarray:
    # Ties are broken towards the lower index, as torch.topk does on CPU for equal values.
    order_NE = np.argsort(-scores_NE, axis=1, kind="stable")
    mask_NE = np.zeros(scores_NE.shape, dtype=bool)
    np.put_along_axis(mask_NE, order_NE[:, :k], True, axis=1)
    return mask_NE


def gate_log_probs(
    logits_NE: np.ndarray, gate: str, k: int | None = None, temperature: float = 1.0
) -> np.ndarray:
    """``log g(x)`` ``[N, E]`` float64 from gate logits; ``-inf`` for experts a top-K drops."""
    logits_NE = np.asarray(logits_NE, dtype=np.float64)
    if gate == "sigmoid":
        logs_NE = log_expit(logits_NE)
        if k is not None:
            logs_NE = np.where(_topk_mask(logits_NE, k), logs_NE, -np.inf)
        return log_softmax_rows(logs_NE)
    if gate == "temperature":
        logits_NE = logits_NE / temperature
    if gate == "topk" and k is not None:
        logits_NE = np.where(_topk_mask(logits_NE, k), logits_NE, -np.inf)
    return log_softmax_rows(logits_NE)


def gate_probs(logits_NE: np.ndarray, gate: str, k: int | None = None, temperature: float = 1.0) -> np.ndarray:
    """``g(x)`` ``[N, E]`` float64, computed with the shared `gatedmoe.gates.functional` math.

    The same numbers as ``exp(gate_log_probs(...))``; this path exists so the deep gates and
    the statistical estimators provably agree on what a gate is.
    """
    l_NE = torch.from_numpy(np.ascontiguousarray(logits_NE, dtype=np.float64))
    n_experts = l_NE.shape[1]
    kk = n_experts if k is None else k
    if gate in ("softmax", "modified_softmax"):
        return softmax_probs(l_NE).numpy()
    if gate == "temperature":
        return softmax_probs(l_NE, temperature=temperature).numpy()
    if gate == "topk":
        w_NK, idx_NK, _ = topk_softmax(l_NE, kk, renormalize=True)
    else:
        w_NK, idx_NK, _ = sigmoid_topk(l_NE, kk, normalize=True)
    return torch.zeros_like(l_NE).scatter(1, idx_NK, w_NK).numpy()


def expected_log(T_NE: np.ndarray, logp_NE: np.ndarray) -> float:
    """``sum_ne T_ne log p_ne`` with ``0 log 0 = 0`` (and ``-inf`` where ``T > 0 = p``)."""
    if np.isneginf(logp_NE).any():
        with np.errstate(invalid="ignore"):
            return float(np.sum(np.where(T_NE > 0, T_NE * logp_NE, 0.0)))
    return float(np.einsum("ne,ne->", T_NE, logp_NE))


def gate_logit_grad(
    logits_NE: np.ndarray, targets_NE: np.ndarray, gate: str, k: int | None = None, temperature: float = 1.0
) -> tuple[float, np.ndarray]:
    """Value and gradient in the logits of ``Q(l) = sum_ne t_ne log g_ne(l)``.

    ``targets_NE`` are non-negative (EM responsibilities, rows summing to 1, or weighted
    one-hot labels); entries where ``g = 0`` (dropped by a top-K) must have zero target.
    The top-K selection is held fixed in the gradient (it is piecewise constant).
    Returns ``(Q, dQ/dl [N, E])``.
    """
    logg_NE = gate_log_probs(logits_NE, gate, k, temperature)
    g_NE = np.exp(logg_NE)
    w_N1 = row_sum(targets_NE)[:, None]
    value = expected_log(targets_NE, logg_NE)
    if gate == "sigmoid":
        s_NE = expit(logits_NE)
        if k is not None:
            s_NE = np.where(np.isfinite(logg_NE), s_NE, 0.0)
        # d log g_e / d l_j = (1 - s_j) (delta_ej - g_j) on the kept set.
        grad_NE = (1.0 - s_NE) * (targets_NE - w_N1 * g_NE)
        return value, grad_NE
    grad_NE = targets_NE - w_N1 * g_NE
    if gate == "temperature":
        grad_NE = grad_NE / temperature
    return value, grad_NE
