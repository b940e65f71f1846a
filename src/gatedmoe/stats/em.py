"""EM for gated mixtures of experts: private pure E-step, M-steps and log-likelihoods.

Shape legend: N samples, P features, Q = P + 1 (features plus an intercept column, last),
E experts, C classes, F free gate columns (E - 1 for softmax-family gates, E for sigmoid).

Parameters, all float64:
  gate                ``W_QE``: logits ``l = Z W`` with ``Z = [z(x), 1]``
  Gaussian experts    ``A_QE`` (means ``mu = [x, 1] A``) and variances ``var_E``
  multinomial experts ``V_EQC`` (class logits ``[x, 1] V_e``; the last class column is 0)

Gate steps take a gate of the table in `gatedmoe.stats.gating` (an object with
``log_probs``, ``logit_grad`` and, for the softmax family, ``logit_scale``); ``None`` is the
plain softmax (also the multinomial experts' link).

Every M-step here only ever *increases* its block of the expected complete-data
log-likelihood (step halving guards the Newton steps), so EM built from them never lowers
the (penalised) likelihood.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import scipy.linalg
from scipy.optimize import minimize
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import enet_path

LOG_2PI = float(np.log(2.0 * np.pi))
MAX_LOGIT_STEP = 4.0
# Rows per block of the Gram products below: their [rows, Q]-sized temporaries stay a few
# MB at any N (at N = 1e7 a full-size temporary was 0.9-1.8 GB each).
GRAM_CHUNK = 65536
# Rows per block of the E-step (`gatedmoe.stats._base._BaseMoE._objective`): its [rows, E]
# temporaries stay a few MB and are reused, instead of fresh N-row arrays at every iteration.
ESTEP_CHUNK = 65536
# Up to this many free gate columns the gate's Newton Hessian is built block by block
# (a weighted Gram per pair of experts); above, as one GEMM.
SMALL_GATE = 3


def row_sum(A_NE: np.ndarray) -> np.ndarray:
    """``A.sum(axis=1)`` as a matrix-vector product (fast for few columns)."""
    return A_NE @ np.ones(A_NE.shape[1])


def logsumexp_rows(A_NE: np.ndarray) -> np.ndarray:
    """``log sum_e exp(A_ne)`` ``[N]``; rows must hold at least one finite entry.

    numpy's reductions along a short last axis are ~20x slower than a loop over the E
    columns (max) and a matrix-vector product (sum), which is what this does.
    """
    m_N = A_NE[:, 0].copy()
    for e in range(1, A_NE.shape[1]):
        np.maximum(m_N, A_NE[:, e], out=m_N)
    # In place on one temporary: at large N each fresh [N, E] array costs page faults.
    T_NE = A_NE - m_N[:, None]
    np.exp(T_NE, out=T_NE)
    return m_N + np.log(row_sum(T_NE))


def log_softmax_rows(A_NE: np.ndarray) -> np.ndarray:
    """``A - logsumexp(A)`` per row ``[N, E]``."""
    return A_NE - logsumexp_rows(A_NE)[:, None]


def expected_log(T_NE: np.ndarray, logp_NE: np.ndarray) -> float:
    """``sum_ne T_ne log p_ne`` with ``0 log 0 = 0`` (and ``-inf`` where ``T > 0 = p``)."""
    if np.isneginf(logp_NE).any():
        with np.errstate(invalid="ignore"):
            return float(np.sum(np.where(T_NE > 0, T_NE * logp_NE, 0.0)))
    return float(np.einsum("ne,ne->", T_NE, logp_NE))


def softmax_logit_grad(logits_NE: np.ndarray, targets_NE: np.ndarray) -> tuple[float, np.ndarray]:
    """``Q(l) = sum_ne t_ne log softmax(l)_ne`` and ``dQ/dl`` ``[N, E]`` (the plain softmax,
    what ``gate=None`` means in the steps below)."""
    logp_NE = log_softmax_rows(logits_NE)
    return expected_log(targets_NE, logp_NE), targets_NE - row_sum(targets_NE)[:, None] * np.exp(logp_NE)


def weighted_gram(Z_NQ: np.ndarray, w_N: np.ndarray) -> np.ndarray:
    """``Z^T diag(w) Z`` ``[Q, Q]``, over blocks of `GRAM_CHUNK` rows."""
    out = np.zeros((Z_NQ.shape[1], Z_NQ.shape[1]))
    for lo in range(0, Z_NQ.shape[0], GRAM_CHUNK):
        Zb = Z_NQ[lo : lo + GRAM_CHUNK]
        out += Zb.T @ (Zb * w_N[lo : lo + GRAM_CHUNK, None])
    return out


def add_intercept(X_NP: np.ndarray) -> np.ndarray:
    """``[X, 1]`` ``[N, Q]``."""
    return np.hstack([X_NP, np.ones((X_NP.shape[0], 1))])


def gaussian_log_density(Z_NQ: np.ndarray, y_N: np.ndarray, A_QE: np.ndarray, var_E: np.ndarray) -> np.ndarray:
    """``log N(y_n; Z_n A_e, var_e)`` ``[N, E]``."""
    out_NE = Z_NQ @ A_QE
    np.subtract(y_N[:, None], out_NE, out=out_NE)
    out_NE *= out_NE
    out_NE *= -0.5 / var_E
    out_NE += -0.5 * (LOG_2PI + np.log(var_E))
    return out_NE


def multinomial_log_density(Z_NQ: np.ndarray, y_N: np.ndarray, V_EQC: np.ndarray) -> np.ndarray:
    """``log softmax(Z_n V_e)[y_n]`` ``[N, E]``; ``y_N`` holds class codes 0..C-1."""
    out_NE = np.empty((Z_NQ.shape[0], V_EQC.shape[0]))
    rows = np.arange(Z_NQ.shape[0])
    for e in range(V_EQC.shape[0]):
        out_NE[:, e] = log_softmax_rows(Z_NQ @ V_EQC[e])[rows, y_N]
    return out_NE


def e_step(log_gate_NE: np.ndarray, log_expert_NE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Responsibilities ``R_NE = p(e | x_n, y_n)`` and per-sample log-likelihoods ``ll_N``."""
    joint_NE = log_gate_NE + log_expert_NE
    ll_N = logsumexp_rows(joint_NE)
    joint_NE -= ll_N[:, None]
    return np.exp(joint_NE, out=joint_NE), ll_N


def _solve_psd(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    # A relative ridge keeps near-singular curvature (separable gates) solvable; the step
    # is only a search direction, the line search decides what is accepted.
    ridge = 1e-10 * (np.trace(H) / H.shape[0] + 1e-12)
    try:
        return np.linalg.solve(H + ridge * np.eye(H.shape[0]), g)
    except np.linalg.LinAlgError:
        return scipy.linalg.lstsq(H + ridge * np.eye(H.shape[0]), g)[0]


@functools.lru_cache(maxsize=64)
def gate_ridge_matrix(n_free: int, n_columns: int) -> np.ndarray:
    """``P`` ``[F, F]`` of the ridge ``l2/2 sum_q w_q^T P w_q`` on the free gate columns.

    A gate with a reference column (``n_free = n_columns - 1``, fixed at 0: the softmax
    family, invariant to a common shift of all logits) gets the reference-free ridge over
    all columns, ``l2/2 sum_e ||w_e - mean_e w||^2`` (`class_ridge_matrix`): otherwise the
    penalty, and so the fit, depends on which expert happens to be the reference (issue 19:
    default fits 1.1-1.5 units "below" restarts that were the same model relabelled).
    Without a reference (normalised sigmoid): the plain ridge, ``P = I``. Cached (read-only):
    the quasi-Newton fits ask for it at every objective evaluation.
    """
    if n_free == n_columns - 1:
        return class_ridge_matrix(n_columns, symmetric=True)
    P = np.eye(n_free)
    P.flags.writeable = False
    return P


def gate_ridge(W_QE: np.ndarray, n_free: int, l2: float) -> float:
    """The gate ridge of `gate_ridge_matrix` (coefficient rows only, not the intercepts)."""
    if not l2:
        return 0.0
    B_qF = W_QE[:-1, :n_free]
    return 0.5 * l2 * float(np.einsum("qe,ef,qf->", B_qF, gate_ridge_matrix(n_free, W_QE.shape[1]), B_qF))


def softmax_newton(
    Z_NQ: np.ndarray,
    T_NE: np.ndarray,
    W_QE: np.ndarray,
    n_free: int,
    gate=None,
    n_steps: int = 1,
    log_expert_NE: np.ndarray | None = None,
    l2: float = 0.0,
) -> tuple[np.ndarray, float]:
    """Damped Newton (IRLS) steps increasing ``Q(W) = sum_ne T_ne log g_ne(Z W)``
    (minus the ridge `gate_ridge` if ``l2 > 0``; intercepts are not penalised).

    With ``log_expert_NE`` the steps instead increase the observed log-likelihood
    ``sum_n log sum_e g_ne(Z W) p_ne`` with the experts fixed (targets: the current
    responsibilities), which a top-K gate needs: its ``Q`` is ``-inf`` as soon as a step
    changes which experts are kept, so EM on ``Q`` could never move the selection.

    For softmax-family gates (and, with one-hot targets, multinomial logistic experts);
    only the first ``n_free`` columns of ``W_QE`` move. A step is halved until ``Q`` does
    not decrease, so the result is never worse than ``W_QE``. Returns ``(W_QE, Q)``.
    """
    N, Q = Z_NQ.shape
    inv_t = 1.0 if gate is None else gate.logit_scale
    log_probs = log_softmax_rows if gate is None else gate.log_probs
    w_N = row_sum(T_NE)
    P_FF = gate_ridge_matrix(n_free, W_QE.shape[1])
    if l2:
        ridge_H = l2 * np.kron(P_FF, np.diag(np.r_[np.ones(Q - 1), 0.0]))

    def value(W):
        logg = log_probs(Z_NQ @ W)
        pen = gate_ridge(W, n_free, l2)
        if log_expert_NE is not None:
            return float(logsumexp_rows(logg + log_expert_NE).sum()) - pen, logg
        return expected_log(T_NE, logg) - pen, logg

    q0, logg_NE = value(W_QE)
    for _ in range(n_steps):
        g_NE = np.exp(logg_NE)
        if log_expert_NE is not None:
            joint_NE = logg_NE + log_expert_NE
            T_NE = np.exp(joint_NE - logsumexp_rows(joint_NE)[:, None])
            w_N = np.ones(Z_NQ.shape[0])
        grad_NE = (T_NE - w_N[:, None] * g_NE) * inv_t
        grad_FQ = (Z_NQ.T @ grad_NE[:, :n_free]).T
        if l2:
            grad_FQ[:, :-1] -= l2 * (W_QE[:-1, :n_free] @ P_FF).T
        # Negative Hessian in the logits: w_n (diag(g) - g g^T) / tau^2, per sample; in the
        # parameters the block-diagonal part minus M^T M with M_n = sqrt(w_n) (g_n kron z_n).
        # One GEMM instead of (E-1)^2 / 2 small products (many experts were Python-bound).
        # (over blocks of rows: M is [N, F Q]).
        G_NF = g_NE[:, :n_free]
        H = np.zeros((n_free * Q, n_free * Q))
        if n_free <= SMALL_GATE:
            # Few experts: block (e, f) is Z^T diag(w (delta_ef g_e - g_e g_f)) Z, one
            # weighted Gram per pair (half the flops of the GEMM below).
            H4 = H.reshape(n_free, Q, n_free, Q)
            wt_N = w_N * inv_t**2
            for e in range(n_free):
                for f in range(e, n_free):
                    c_N = -G_NF[:, e] * G_NF[:, f]
                    if e == f:
                        c_N += G_NF[:, e]
                    H4[e, :, f, :] = weighted_gram(Z_NQ, wt_N * c_N)
                    if f != e:
                        H4[f, :, e, :] = H4[e, :, f, :].T
        else:
            sw_N = np.sqrt(w_N) * inv_t
            for lo in range(0, N, GRAM_CHUNK):
                sl = slice(lo, lo + GRAM_CHUNK)
                M_BX = (sw_N[sl, None, None] * G_NF[sl, :, None] * Z_NQ[sl, None, :]).reshape(-1, n_free * Q)
                H -= M_BX.T @ M_BX
            H = H.reshape(n_free, Q, n_free, Q)
            for e in range(n_free):
                H[e, :, e, :] += weighted_gram(Z_NQ, w_N * G_NF[:, e] * inv_t**2)
            H = H.reshape(n_free * Q, n_free * Q)
        if l2:
            H = H + ridge_H
        step_FQ = _solve_psd(H, grad_FQ.ravel()).reshape(n_free, Q)
        # Trust region: no logit moves by more than MAX_LOGIT_STEP in one step. Near
        # separation the Newton step is huge and would otherwise be halved many times.
        max_move = np.abs(Z_NQ @ step_FQ.T).max() if step_FQ.size else 0.0
        t = min(1.0, MAX_LOGIT_STEP / max_move) if max_move > 0 else 1.0
        for _ in range(30):
            W_new = W_QE.copy()
            W_new[:, :n_free] += t * step_FQ.T
            q, logg_new = value(W_new)
            if q >= q0:
                break
            t *= 0.5
        else:
            return W_QE, q0
        improved = q - q0
        W_QE, q0, logg_NE = W_new, q, logg_new
        if improved <= 1e-12 * abs(q0):
            break
    return W_QE, q0


def lbfgs_gate(
    Z_NQ: np.ndarray,
    T_NE: np.ndarray,
    W_QE: np.ndarray,
    n_free: int,
    gate=None,
    maxiter: int = 15,
    l2: float = 0.0,
) -> tuple[np.ndarray, float]:
    """A few warm-started L-BFGS iterations increasing ``Q(W)`` (gates without a Newton
    step here, e.g. the normalised sigmoid gate), minus ``l2/2`` times the squared
    coefficients (intercepts excluded). Never returns a worse ``W``."""
    Q = Z_NQ.shape[1]
    fixed = W_QE[:, n_free:]
    logit_grad = softmax_logit_grad if gate is None else gate.logit_grad

    def fun(theta):
        W = np.hstack([theta.reshape(Q, n_free), fixed])
        val, grad_NE = logit_grad(Z_NQ @ W, T_NE)
        return _ridged(-val, -(Z_NQ.T @ grad_NE[:, :n_free]), theta, Q, n_free, l2, W_QE.shape[1])

    q0 = -fun(W_QE[:, :n_free].ravel())[0]
    res = minimize(fun, W_QE[:, :n_free].ravel(), jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
    if np.all(np.isfinite(res.x)) and -res.fun >= q0:
        return np.hstack([res.x.reshape(Q, n_free), fixed]), float(-res.fun)
    return W_QE, q0


def _ridged(value, grad_QF, theta, Q, n_free, l2, n_columns):
    """``(value, grad)`` of a loss (to minimise) plus the ridge of `gate_ridge` on the
    ``[Q, F]`` free parameters of a gate with ``n_columns`` columns; the last row
    (intercepts) is not penalised."""
    if l2:
        coef_QF = theta.reshape(Q, n_free)[:-1]
        P_FF = gate_ridge_matrix(n_free, n_columns)
        value = value + 0.5 * l2 * float(np.einsum("qe,ef,qf->", coef_QF, P_FF, coef_QF))
        grad_QF = grad_QF.copy()
        grad_QF[:-1] += l2 * coef_QF @ P_FF
    return value, grad_QF.ravel()


def observed_lbfgs_gate(
    Z_NQ: np.ndarray,
    W_QE: np.ndarray,
    n_free: int,
    gate,
    log_expert_NE: np.ndarray,
    maxiter: int = 15,
    l2: float = 0.0,
) -> tuple[np.ndarray, float]:
    """A few L-BFGS iterations increasing the observed log-likelihood
    ``sum_n log sum_e g_ne(Z W) p_ne`` with the experts fixed (a sparse gate whose ``Q``
    cannot move its selection). Its gradient in the logits is ``Q``'s at the current
    posterior responsibilities. Never returns a worse ``W``."""
    Q = Z_NQ.shape[1]
    fixed = W_QE[:, n_free:]

    def fun(theta):
        W = np.hstack([theta.reshape(Q, n_free), fixed])
        logits_NE = Z_NQ @ W
        joint_NE = gate.log_probs(logits_NE) + log_expert_NE
        ll_N = logsumexp_rows(joint_NE)
        if not np.all(np.isfinite(ll_N)):
            return np.inf, np.zeros_like(theta)
        _, grad_NE = gate.logit_grad(logits_NE, np.exp(joint_NE - ll_N[:, None]))
        return _ridged(-float(ll_N.sum()), -(Z_NQ.T @ grad_NE[:, :n_free]), theta, Q, n_free, l2, W_QE.shape[1])

    q0 = -fun(W_QE[:, :n_free].ravel())[0]
    res = minimize(fun, W_QE[:, :n_free].ravel(), jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
    if np.all(np.isfinite(res.x)) and -res.fun >= q0:
        return np.hstack([res.x.reshape(Q, n_free), fixed]), float(-res.fun)
    return W_QE, q0


def pinned_gate_ascent(
    F_NQ: np.ndarray,
    W_QE: np.ndarray,
    n_free: int,
    gate,
    log_expert_NE: np.ndarray,
    l2: float = 0.0,
    n_near: int = 500,
    margin_floor: float = 1e-4,
    rel_tol: float = 1e-2,
    maxiter: int = 200,
) -> tuple[np.ndarray, float]:
    """L-BFGS on the observed log-likelihood of a top-K gate (experts fixed, minus
    `gate_ridge`) restricted to moves that keep its selection boundaries where they are.

    The hard top-K likelihood is smooth between selection boundaries and jumps where a
    sample crosses one. At large n the samples sit so close to every boundary (1e-5 apart
    at n = 1e5) that almost any gradient step moves a boundary over one of them, so EM and
    L-BFGS stop; yet the smooth part can still rise a lot along moves that leave every
    boundary in place (issue 19, top-2 sigmoid at n = 1e5: 13-25 units below the
    truth-started fit, with a monotone straight path to it that moved no sample across).
    Sample n's boundary stays put to first order when its margin ``l_na - l_nc`` (the
    ``k``-th minus the ``(k+1)``-th largest logit) does not change: ``F_n . (dW_a - dW_c) = 0``,
    linear in the move. The ``n_near`` samples of smallest margin give these rows (less
    those whose crossing would raise the likelihood, `_swap_gain`: no wall), each
    weighted by ``1 / (margin + margin_floor)`` so that the sample nearest a boundary
    defines it (a sample sitting on it is the wall the smooth part presses on); the
    directions above ``rel_tol`` times the largest singular value are removed, and L-BFGS
    runs in what is left (in d = 1: the pairwise slopes and intercepts may change in any
    way that keeps each crossing point). Every value is the exact hard likelihood, so a
    move that does cross samples is judged as it is. Never returns a worse ``W``.
    """
    N = F_NQ.shape[0]
    k = gate.k
    base_log_scores = (getattr(gate, "base", None) or gate).log_scores
    L_NE = F_NQ @ W_QE
    order_N2 = np.argpartition(-L_NE, (k - 1, k), axis=1)[:, k - 1 : k + 1]
    rows = np.arange(N)
    a_N, c_N = order_N2[:, 0], order_N2[:, 1]
    margin_N = L_NE[rows, a_N] - L_NE[rows, c_N]
    near = np.argsort(margin_N)[: min(n_near, N)]
    walls = near[_swap_gain(L_NE[near], log_expert_NE[near], a_N[near], c_N[near], k, base_log_scores) <= 0]
    # Both constraint sets, the better result: freeing the samples that would gain by
    # crossing let a top-2 sigmoid fit (n = 1e4) climb 1.4 units further, but cost 6 units
    # on a gate started at 3x the true logits (n = 2000), where many samples gain by crossing.
    best = (W_QE, None)
    for rows_M in (near, walls) if walls.size < near.size else (near,):
        W, value = _pinned_lbfgs(F_NQ, W_QE, n_free, gate, log_expert_NE, l2, rows_M, a_N[rows_M], c_N[rows_M],
                                 margin_N[rows_M] + margin_floor, rel_tol, maxiter)
        if best[1] is None or value > best[1]:
            best = (W, value)
    return best


def _pinned_lbfgs(F_NQ, W_QE, n_free, gate, log_expert_NE, l2, near, a_M, c_M, scale_M, rel_tol, maxiter):
    """`pinned_gate_ascent` with the rows of samples ``near`` (kept experts ``a_M``
    against dropped ``c_M``, rows divided by ``scale_M``) as its constraints."""
    N, Q = F_NQ.shape
    E = W_QE.shape[1]
    M = near.size
    C_MQE = np.zeros((M, Q, E))
    C_MQE[np.arange(M), :, a_M] += F_NQ[near]
    C_MQE[np.arange(M), :, c_M] -= F_NQ[near]
    C_MX = C_MQE[:, :, :n_free].reshape(M, Q * n_free) / scale_M[:, None]
    if M == 0:
        Vt, rank = np.eye(Q * n_free), 0
    else:
        _, sv, Vt = np.linalg.svd(C_MX, full_matrices=True)
        rank = int((sv > rel_tol * sv[0]).sum()) if sv[0] > 0 else 0
    B_XR = Vt[rank:].T
    fixed = W_QE[:, n_free:]

    def unflat(theta):
        return np.hstack([W_QE[:, :n_free] + (B_XR @ theta).reshape(Q, n_free), fixed])

    def fun(theta):
        W = unflat(theta)
        logits_NE = F_NQ @ W
        joint_NE = gate.log_probs(logits_NE) + log_expert_NE
        ll_N = logsumexp_rows(joint_NE)
        if not np.all(np.isfinite(ll_N)):
            return np.inf, np.zeros_like(theta)
        _, grad_NE = gate.logit_grad(logits_NE, np.exp(joint_NE - ll_N[:, None]))
        value, grad = _ridged(-float(ll_N.sum()), -(F_NQ.T @ grad_NE[:, :n_free]), W[:, :n_free].ravel(),
                              Q, n_free, l2, E)
        return value, B_XR.T @ grad

    theta0 = np.zeros(B_XR.shape[1])
    q0 = -fun(theta0)[0]
    if B_XR.shape[1] == 0:
        return W_QE, q0
    best = [q0, theta0]

    def tracked(theta):
        value, grad = fun(theta)
        if -value > best[0]:
            best[0], best[1] = -value, theta.copy()
        return value, grad

    # Tight tolerances: the valley is long and flat (tens of units over many iterations).
    # L-BFGS stops at the first jump its line search meets, and may then report a point
    # past it: the best point it evaluated is kept instead.
    minimize(tracked, theta0, jac=True, method="L-BFGS-B",
             options={"maxiter": maxiter, "ftol": 1e-15, "gtol": 1e-8, "maxcor": 30})
    if best[0] > q0 and np.all(np.isfinite(best[1])):
        return unflat(best[1]), float(best[0])
    return W_QE, q0


def _swap_gain(L_ME, log_expert_ME, a_M, c_M, k, log_scores) -> np.ndarray:
    """Per-sample change ``[M]`` of a top-``k`` gate's log-likelihood when its selection
    keeps expert ``c_m`` instead of ``a_m`` (the ``(k+1)``-th largest logit instead of the
    ``k``-th: the sample crossing its selection boundary), the logits otherwise as they are."""
    M, E = L_ME.shape
    keep_ME = np.zeros((M, E), dtype=bool)
    np.put_along_axis(keep_ME, np.argpartition(-L_ME, k - 1, axis=1)[:, :k], True, axis=1)
    swap_ME = keep_ME.copy()
    swap_ME[np.arange(M), a_M] = False
    swap_ME[np.arange(M), c_M] = True
    s_ME = log_scores(L_ME)

    def ll(mask_ME):
        A_ME = np.where(mask_ME, s_ME, -np.inf)
        return logsumexp_rows(A_ME + log_expert_ME) - logsumexp_rows(A_ME)

    return ll(swap_ME) - ll(keep_ME)


def _topk_others(L_NE: np.ndarray, log_expert_NE: np.ndarray, e: int, k: int, log_scores):
    """What a top-``k`` gate's per-sample likelihood needs from the experts other than ``e``
    (see `topk_coordinate_profile`): ``(A_in, B_in, ll_out, theta)`` ``[N]`` each."""
    others = [j for j in range(L_NE.shape[1]) if j != e]
    Lo_NO = L_NE[:, others]
    order_NO = np.argsort(-Lo_NO, axis=1, kind="stable")
    ao_NO = log_scores(Lo_NO)
    jo_NO = ao_NO + log_expert_NE[:, others]
    rows = np.arange(L_NE.shape[0])[:, None]

    def lse_top(A_NO, m):
        if m == 0:
            return np.full(A_NO.shape[0], -np.inf)
        return logsumexp_rows(A_NO[rows, order_NO[:, :m]])

    theta_N = Lo_NO[rows[:, 0], order_NO[:, k - 1]]
    return lse_top(jo_NO, k - 1), lse_top(ao_NO, k - 1), lse_top(jo_NO, k) - lse_top(ao_NO, k), theta_N


def topk_coordinate_profile(
    L_NE: np.ndarray,
    log_expert_NE: np.ndarray,
    e: int,
    dL_NT: np.ndarray,
    k: int,
    log_scores,
    others=None,
) -> np.ndarray:
    """Per-sample log-likelihoods ``[N, T]`` of a top-``k`` gate when expert ``e``'s logits
    become ``L[:, e] + dL[:, t]`` and every other logit stays.

    The gate keeps the ``k`` largest logits and weights them by ``exp(a(l))`` renormalised
    (``a = log_scores``: ``l`` for softmax, ``log sigmoid(l)`` for sigmoid), so
    ``ll_n = lse_{j in S_n}(a_nj + log p_nj) - lse_{j in S_n} a_nj``. With the other experts
    fixed, ``e`` is kept exactly when its logit exceeds the ``k``-th largest of the others
    (``theta``); then ``S_n`` is ``e`` plus the ``k - 1`` largest others, else the ``k``
    largest others. Both sums over the others are computed once (``others``: a result of
    `_topk_others` to reuse), so T trial steps cost a few ``[N, T]`` operations instead of
    T full gate evaluations. (Exact ties between logits, which the gate breaks towards the
    lower index, are resolved here as "not kept".)
    """
    A_in, B_in, ll_out_N, theta_N = others or _topk_others(L_NE, log_expert_NE, e, k, log_scores)
    le_NT = L_NE[:, e, None] + dL_NT
    ae_NT = log_scores(le_NT)
    ll_in_NT = np.logaddexp(A_in[:, None], ae_NT + log_expert_NE[:, e, None]) - np.logaddexp(B_in[:, None], ae_NT)
    return np.where(le_NT > theta_N[:, None], ll_in_NT, ll_out_N[:, None])


def topk_breakpoint_step(
    L_NE: np.ndarray, log_expert_NE: np.ndarray, e: int, f_N: np.ndarray, k: int, log_scores, others, max_step: float
) -> float:
    """The move ``t`` (``|t| < max_step``) of expert ``e``'s logits by ``t f_n`` that gains
    most from the samples it moves in or out of ``e``'s top-``k`` selection; 0 if none gains.

    Sample n crosses where ``l_ne + t f_n`` meets ``theta_n`` (`_topk_others`), at
    ``t_n = (theta_n - l_ne) / f_n``, and its log-likelihood then jumps by
    ``+-(ll_in - ll_out)``, evaluated at the crossing (``e``'s logit equal to ``theta_n``).
    Sorting the crossings on each side of 0 and summing the jumps gives the jump part of the
    profile at every crossing (a change-point scan, ``O(N log N)``); the best is returned as
    the midpoint to the next crossing. The smooth change of the kept weights is left out:
    the caller evaluates the chosen move exactly.
    """
    A_in, B_in, ll_out_N, theta_N = others
    l_N = L_NE[:, e]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_N = (theta_N - l_N) / f_N
    at_N = log_scores(theta_N)
    jump_N = np.logaddexp(A_in, at_N + log_expert_NE[:, e]) - np.logaddexp(B_in, at_N) - ll_out_N
    # A sample kept now loses the jump as it leaves; one not kept gains it as it enters.
    jump_N = np.where(l_N > theta_N, -jump_N, jump_N)
    best_gain, best_t = 0.0, 0.0
    for sign in (1.0, -1.0):
        sel = np.flatnonzero(np.isfinite(t_N) & (sign * t_N > 0) & (sign * t_N < max_step) & np.isfinite(jump_N))
        if sel.size == 0:
            continue
        order = np.argsort(sign * t_N[sel])
        ts = sign * t_N[sel][order]
        cum = np.cumsum(jump_N[sel][order])
        i = int(np.argmax(cum))
        if cum[i] > best_gain:
            nxt = ts[i + 1] if i + 1 < ts.size else min(max_step, 2 * ts[i])
            best_gain, best_t = float(cum[i]), sign * 0.5 * (ts[i] + nxt)
    return best_t


def coordinate_gate_search(
    F_NQ: np.ndarray,
    W_QE: np.ndarray,
    n_free: int,
    gate,
    log_expert_NE: np.ndarray,
    steps: np.ndarray,
    l2: float = 0.0,
    min_gain: float = 1e-3,
    max_sweeps: int = 20,
) -> tuple[np.ndarray, float]:
    """Coordinate ascent with a grid line search on the observed log-likelihood of a top-K
    gate, the experts fixed: ``sum_n log sum_e g_ne(F W) p_ne`` minus `gate_ridge`.

    The hard top-K likelihood is discontinuous in ``W``: as a sample's ``k``-th and
    ``(k+1)``-th logits cross, its weight moves from one expert to another, so along any
    direction it jumps once per sample crossing the selection boundary. A gradient step
    stops at the first jump that lowers it, although a slightly larger move of the
    boundary may gain (gaps of 0.4-4.6 log-likelihood units to the fit started at the
    truth, issue 19). Here every free parameter in turn is moved by the best of ``0``, each
    of ``steps`` (both signs) and the best boundary position within ``2 steps[0]`` that the
    change-point scan `topk_breakpoint_step` finds, each evaluated exactly on all samples
    (`topk_coordinate_profile`), which steps over such jumps; sweeps (at most
    ``max_sweeps``) repeat until one gains less than ``min_gain``. Derivative-free coordinate search on a piecewise smooth
    function (as a compass search, Kolda, Lewis & Torczon 2003, with a grid of steps per
    direction); the value never decreases. Returns ``(W_QE, value)``.
    """
    k = gate.k
    base = getattr(gate, "base", None) or gate
    log_scores = base.log_scores
    t_T = np.concatenate([steps, -steps])
    W_QE = W_QE.copy()
    L_NE = F_NQ @ W_QE

    def value(W, L):
        return float(logsumexp_rows(gate.log_probs(L) + log_expert_NE).sum()) - gate_ridge(W, n_free, l2)

    best = value(W_QE, L_NE)
    for _ in range(max_sweeps):
        start = best
        for e in range(n_free):
            for q in range(F_NQ.shape[1]):
                others = _topk_others(L_NE, log_expert_NE, e, k, log_scores)
                t_try = np.append(t_T, topk_breakpoint_step(L_NE, log_expert_NE, e, F_NQ[:, q], k, log_scores, others,
                                                            2 * steps[0]))
                ll_T = topk_coordinate_profile(L_NE, log_expert_NE, e, F_NQ[:, q, None] * t_try, k, log_scores,
                                               others).sum(0)
                if l2 and q < F_NQ.shape[1] - 1:
                    for i, t in enumerate(t_try):
                        W = W_QE.copy()
                        W[q, e] += t
                        ll_T[i] -= gate_ridge(W, n_free, l2)
                else:
                    ll_T -= gate_ridge(W_QE, n_free, l2)
                i = int(np.argmax(ll_T))
                if not ll_T[i] > best + 1e-9 * abs(best):
                    continue
                W = W_QE.copy()
                W[q, e] += t_try[i]
                L = L_NE.copy()
                L[:, e] += t_try[i] * F_NQ[:, q]
                # The exact value (ties as the gate breaks them) decides.
                v = value(W, L)
                if v > best:
                    W_QE, L_NE, best = W, L, v
        if best - start < min_gain:
            break
    return W_QE, best


def soft_threshold(x: np.ndarray, t: float) -> np.ndarray:
    """``sign(x) max(|x| - t, 0)``, the proximal map of ``t ||.||_1``."""
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


def prox_gradient(fun_grad, w0: np.ndarray, l1_mask: np.ndarray, alpha: float, lipschitz: float, n_steps: int = 10):
    """ISTA with backtracking on ``f(w) + alpha ||w[l1_mask]||_1`` (monotone by construction).

    ``fun_grad(w) -> (f, grad)`` is smooth; ``w0`` any shape. Returns ``(w, lipschitz)``, the
    final step-size estimate to warm-start the next call.
    """
    w = w0
    f, g = fun_grad(w)
    for _ in range(n_steps):
        for _ in range(60):
            z = w - g / lipschitz
            z = np.where(l1_mask, soft_threshold(z, alpha / lipschitz), z)
            fz, gz = fun_grad(z)
            d = z - w
            if np.isfinite(fz) and fz <= f + np.sum(g * d) + 0.5 * lipschitz * np.sum(d * d) + 1e-13 * abs(f):
                break
            lipschitz *= 2.0
        else:
            return w, lipschitz
        if np.sum(d * d) <= 1e-20 * (1.0 + np.sum(w * w)):
            w = z
            break
        w, f, g = z, fz, gz
        lipschitz = max(lipschitz * 0.5, 1e-12)
    return w, lipschitz


def l1_gate(
    Z_NQ: np.ndarray,
    T_NE: np.ndarray,
    W_QE: np.ndarray,
    n_free: int,
    gate,
    alpha: float,
    n_total: int,
    lipschitz: float,
    n_steps: int = 10,
) -> tuple[np.ndarray, float]:
    """Proximal-gradient steps on ``-Q(W)/n_total + alpha ||gate coefficients||_1``
    (intercepts unpenalised), the gate M-step of the Lasso MoE (Chamroukhi & Huynh 2019)."""
    Q = Z_NQ.shape[1]
    fixed = W_QE[:, n_free:]
    logit_grad = softmax_logit_grad if gate is None else gate.logit_grad

    def fun_grad(theta_QF):
        W = np.hstack([theta_QF, fixed])
        val, grad_NE = logit_grad(Z_NQ @ W, T_NE)
        return -val / n_total, -(Z_NQ.T @ grad_NE[:, :n_free]) / n_total

    mask = np.zeros((Q, n_free), dtype=bool)
    mask[:-1] = True
    theta, lipschitz = prox_gradient(fun_grad, W_QE[:, :n_free], mask, alpha, lipschitz, n_steps)
    return np.hstack([theta, fixed]), lipschitz


def gaussian_mstep(
    Z_NQ: np.ndarray,
    y_N: np.ndarray,
    R_NE: np.ndarray,
    A_QE: np.ndarray,
    var_E: np.ndarray,
    var_floor: float,
    alpha: float = 0.0,
    n_total: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares per expert, then its variance (floored at ``var_floor``).

    With ``alpha > 0`` the coefficients (not the intercept) get the scale-invariant Lasso
    penalty ``alpha ||a_e||_1 / sigma_e`` on the per-sample scale (Staedler, Buehlmann & van
    de Geer 2010: unlike ``alpha ||a_e||_1`` it keeps the penalised likelihood bounded when
    p > n), solved by coordinate descent at the current sigma, then sigma in closed form
    (an ECM step). An expert with no weight keeps its parameters.
    """
    A_QE, var_E = A_QE.copy(), var_E.copy()
    n_total = n_total or Z_NQ.shape[0]
    for e in range(R_NE.shape[1]):
        r_N = R_NE[:, e]
        s = r_N.sum()
        if s <= 1e-10:
            continue
        if alpha > 0:
            sd = np.sqrt(var_E[e])
            A_QE[:, e] = weighted_lasso(Z_NQ[:, :-1], y_N, r_N, alpha * sd * n_total, A_QE[:, e])
            res_N = y_N - Z_NQ @ A_QE[:, e]
            # argmax over sd of -(s/n) log sd - SSR / (2 n sd^2) - alpha ||a||_1 / sd:
            # the positive root of (s/n) sd^2 - alpha L1 sd - SSR/n = 0.
            l1, ssr = float(np.abs(A_QE[:-1, e]).sum()), float(r_N @ res_N**2)
            a, b = s / n_total, alpha * l1
            sd = (b + np.sqrt(b * b + 4 * a * ssr / n_total)) / (2 * a)
            var_E[e] = max(sd * sd, var_floor)
            continue
        A_QE[:, e] = scipy.linalg.lstsq(weighted_gram(Z_NQ, r_N), Z_NQ.T @ (r_N * y_N), check_finite=False)[0]
        res_N = y_N - Z_NQ @ A_QE[:, e]
        var_E[e] = max(float(r_N @ res_N**2) / s, var_floor)
    return A_QE, var_E


def weighted_lasso(
    X_NP: np.ndarray,
    y_N: np.ndarray,
    r_N: np.ndarray,
    lam: float,
    a0_Q: np.ndarray,
    tol: float = 1e-7,
    max_sweeps: int = 1000,
) -> np.ndarray:
    """``argmin_{a, b} 1/2 sum_n r_n (y_n - b - x_n . a)^2 + lam ||a||_1`` from ``a0_Q``
    (``[P + 1]``, the intercept last); returns ``[P + 1]``.

    Coordinate descent (scikit-learn's compiled ``enet_path`` on a precomputed Gram
    matrix, warm-started) on a working set: the non-zero coefficients and those that
    violate the optimality condition ``|x_j^T diag(r) res| <= lam``; then one vectorised
    check of all ``P`` conditions, repeated until none is violated (glmnet's active sets,
    Friedman, Hastie & Tibshirani 2010). The Gram matrix is ``|S|^2``, not ``P^2``, and
    coefficients outside the set are never swept. Each coordinate step minimises exactly,
    so the objective never rises from ``a0_Q``: the M-step stays monotone. ``tol`` is
    scikit-learn's duality-gap tolerance, ``max_sweeps`` its ``max_iter``.
    """
    s = float(r_N.sum())
    xbar_P = (r_N @ X_NP) / s
    ybar = float(r_N @ y_N) / s
    Xc_NP = X_NP - xbar_P
    yc_N = y_N - ybar
    a_P = a0_Q[:-1].copy()
    z_P = r_N @ Xc_NP**2
    live_P = z_P > 1e-300
    a_P[~live_P] = 0.0
    c_P = Xc_NP.T @ (r_N * yc_N)
    n = X_NP.shape[0]
    sqrt_r_N = np.sqrt(r_N)
    yw_N = sqrt_r_N * yc_N

    def violators(a_P):
        grad_P = c_P - Xc_NP.T @ (r_N * (Xc_NP @ a_P))
        return live_P & (a_P == 0) & (np.abs(grad_P) > lam * (1 + 1e-9) + 1e-14)

    violate_P = violators(a_P)
    for _ in range(100):
        work = np.flatnonzero((a_P != 0) | violate_P)
        if work.size == 0:
            break
        # sqrt(r)-weighted working-set design: the weighted problem as a plain one.
        Xw_NS = Xc_NP[:, work] * sqrt_r_N[:, None]
        with warnings.catch_warnings():
            # A cap on the inner sweeps is not the fit's convergence (EM's is checked above it).
            warnings.simplefilter("ignore", ConvergenceWarning)
            aw_S = enet_path(Xw_NS, yw_N, l1_ratio=1.0, alphas=[lam / n], precompute=Xw_NS.T @ Xw_NS,
                             Xy=Xw_NS.T @ yw_N, coef_init=a_P[work].copy(), tol=tol, max_iter=max_sweeps,
                             check_input=False)[1][:, 0]
        # Coordinate descent from the warm start only ever lowers the objective.
        a_P[work] = aw_S
        violate_P = violators(a_P)
        if not violate_P.any():
            break
    return np.append(a_P, ybar - xbar_P @ a_P)


def gaussian_mixture_grad(
    F_NQ: np.ndarray, Z_NQ: np.ndarray, y_N: np.ndarray, W_QE: np.ndarray, A_QE: np.ndarray, var_E: np.ndarray, gate
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Observed log-likelihood of a mixture of Gaussian linear experts and its gradient.

    ``ll_n = log sum_e g_e(F_n W) N(y_n; Z_n A_e, var_e)``; by Fisher's identity the gradient
    is ``Q``'s at the posterior responsibilities ``R``: gate logits ``gate.logit_grad(l, R)``,
    ``A_e``: ``Z^T (r_e res_e / var_e)``, ``var_e``: ``sum_n r_ne (res_ne^2 - var_e) / (2 var_e^2)``.
    Returns ``(ll_N, R_NE, d/dW [QF, E], d/dA [Q, E], d/dvar [E])`` of ``sum(ll)``.
    """
    logits_NE = F_NQ @ W_QE
    res_NE = y_N[:, None] - Z_NQ @ A_QE
    sq_NE = res_NE * res_NE
    joint_NE = gate.log_probs(logits_NE) - 0.5 * (LOG_2PI + np.log(var_E)) - 0.5 * sq_NE / var_E
    ll_N = logsumexp_rows(joint_NE)
    R_NE = np.exp(joint_NE - ll_N[:, None])
    gW_QE = F_NQ.T @ gate.logit_grad(logits_NE, R_NE)[1]
    gA_QE = Z_NQ.T @ (R_NE * res_NE / var_E)
    gvar_E = (R_NE * (sq_NE - var_E)).sum(axis=0) / (2.0 * var_E**2)
    return ll_N, R_NE, gW_QE, gA_QE, gvar_E


def multinomial_mixture_grad(
    F_NQ: np.ndarray, Z_NQ: np.ndarray, y_N: np.ndarray, W_QE: np.ndarray, V_EQC: np.ndarray, gate
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Observed log-likelihood of a mixture of multinomial logistic experts and its gradient.

    ``ll_n = log sum_e g_e(F_n W) softmax(Z_n V_e)[y_n]``. By Fisher's identity the gradient
    is that of EM's ``Q`` at the posterior responsibilities ``R``: in the gate logits
    ``gate.logit_grad(l, R)``, in expert e's class logits ``r_ne (onehot(y_n) - p_en)``.
    Returns ``(ll_N, R_NE, dsum(ll)/dW [QF, E], dsum(ll)/dV [E, Q, C])``, over every entry
    (the caller keeps the free ones).
    """
    E, _, C = V_EQC.shape
    N = Z_NQ.shape[0]
    # Flat index of (y_n, n) in a [C, N] block: one take instead of a 2-d fancy index.
    at_N = y_N * N + np.arange(N)
    logits_NE = F_NQ @ W_QE
    # Layout [E, C, N] as in `multinomial_newton_experts`; one GEMM for all experts.
    Q = Z_NQ.shape[1]
    L_ECN = np.ascontiguousarray((Z_NQ @ V_EQC.transpose(1, 0, 2).reshape(Q, E * C)).T).reshape(E, C, N)
    L_ECN -= L_ECN.max(axis=1)[:, None]
    P_ECN = np.exp(L_ECN)
    s_EN = P_ECN.sum(axis=1)
    P_ECN /= s_EN[:, None]
    log_expert_NE = (L_ECN.reshape(E, C * N)[:, at_N] - np.log(s_EN)).T
    logg_NE = gate.log_probs(logits_NE)
    joint_NE = logg_NE + log_expert_NE
    ll_N = logsumexp_rows(joint_NE)
    R_NE = np.exp(joint_NE - ll_N[:, None])
    scale = getattr(gate, "logit_scale", None)
    if scale is None:
        gW_QE = F_NQ.T @ gate.logit_grad(logits_NE, R_NE)[1]
    else:
        # Softmax family: d/dl of sum_e r_e log g_e is (r - g) / temperature (rows of R
        # sum to 1); the same as gate.logit_grad without recomputing log g and Q.
        gW_QE = F_NQ.T @ ((R_NE - np.exp(logg_NE)) * scale)
    R_EN = np.ascontiguousarray(R_NE.T)
    G_ECN = P_ECN
    G_ECN *= -R_EN[:, None, :]
    G_ECN.reshape(E, C * N)[:, at_N] += R_EN
    return ll_N, R_NE, gW_QE, (G_ECN.reshape(E * C, N) @ Z_NQ).reshape(E, C, Q).transpose(0, 2, 1)


@functools.lru_cache(maxsize=64)
def class_ridge_matrix(n_classes: int, symmetric: bool) -> np.ndarray:
    """``P`` ``[C-1, C-1]`` of the experts' ridge ``l2/2 sum_q b_q^T P b_q`` on the free
    class coefficients ``b_q`` (the last class fixed at 0).

    ``symmetric=False``: ``P = I`` (the free classes penalised, the reference class not).
    ``symmetric=True``: ``P = I - J / C``, i.e. ``l2/2 sum_c ||B_c - mean_c B||^2`` over all
    ``C`` classes, which is ``min_v l2/2 sum_c ||B_c + v||^2``: the penalty of multinomial
    ``LogisticRegression`` (all ``C`` class vectors, no reference class) at its minimum
    over the shift that leaves the probabilities unchanged. It does not depend on which
    class is the reference. Cached (read-only), as `gate_ridge_matrix`.
    """
    Cf = n_classes - 1
    P = np.eye(Cf)
    if symmetric:
        P -= 1.0 / n_classes
    P.flags.writeable = False
    return P


def multinomial_ridge(V_EQC: np.ndarray, l2: float, symmetric: bool = False) -> np.ndarray:
    """The experts' ridge ``l2/2 sum_q b_q^T P b_q`` per expert ``[E]`` (intercepts not
    penalised; ``P`` from `class_ridge_matrix`)."""
    B_EqC = V_EQC[:, :-1, :-1]
    P = class_ridge_matrix(V_EQC.shape[2], symmetric)
    return 0.5 * l2 * np.einsum("eqc,cd,eqd->e", B_EqC, P, B_EqC)


def multinomial_newton_experts(
    Z_NQ: np.ndarray,
    Y_NC: np.ndarray,
    R_NE: np.ndarray,
    V_EQC: np.ndarray,
    l2: float = 0.0,
    symmetric: bool = False,
    n_steps: int = 1,
    max_step: float = MAX_LOGIT_STEP,
) -> np.ndarray:
    """Damped Newton steps for every multinomial logistic expert at once.

    Expert e maximises ``sum_n r_ne log softmax(Z_n V_e)[y_n]`` minus the ridge of
    `multinomial_ridge` (it leaves the intercept row alone, as LogisticRegression's
    ``1/C``); the experts are independent, so their Newton systems are solved as one batch
    ``[E, (C-1) Q]``. Each expert's step is capped (trust region) and halved until its
    objective does not fall. ``n_steps`` steps (fewer once no expert improves).
    ``max_step``: the cap on any logit's move in one step (`MAX_LOGIT_STEP`; ``np.inf``
    for plain Newton with step halving, which suits a strictly convex ridge fit).
    """
    E, Q, C = V_EQC.shape
    Cf = C - 1
    N = Z_NQ.shape[0]
    R_EN = np.ascontiguousarray(R_NE.T)
    y_N = Y_NC.argmax(axis=1)
    rows = np.arange(N)
    P_CC = class_ridge_matrix(C, symmetric)
    coef_Q = np.r_[np.ones(Q - 1), 0.0]

    # Layout [E, C, N]: reductions over the few classes run over contiguous rows (fast).
    def value(V):
        L_ECN = np.matmul(V.transpose(0, 2, 1), Z_NQ.T)
        m_EN = L_ECN.max(axis=1)
        logp_ECN = L_ECN - (m_EN + np.log(np.exp(L_ECN - m_EN[:, None]).sum(axis=1)))[:, None]
        pen_E = multinomial_ridge(V, l2, symmetric) if l2 else 0.0
        return (R_EN * logp_ECN[:, y_N, rows]).sum(axis=1) - pen_E, logp_ECN

    q0_E, logp_ECN = value(V_EQC)
    for _ in range(n_steps):
        P_ECN = np.exp(logp_ECN)
        G_ECN = R_EN[:, None, :] * (Y_NC.T[None] - P_ECN)
        grad_ECQ = np.matmul(G_ECN[:, :Cf], Z_NQ)
        if l2:
            grad_ECQ[:, :, :-1] -= l2 * np.matmul(P_CC, V_EQC[:, :-1, :Cf].transpose(0, 2, 1))
        # Negative Hessian Z^T diag(r_e p_c (delta_cd - p_d)) Z in blocks (c, d): the
        # block-diagonal part sum_n r p_c z z^T minus M^T M, M_n = sqrt(r_n) (p_n kron z_n),
        # one batched GEMM (an einsum over [E, C, C, N, Q, Q] was 90% of a digits fit).
        Pf_ECN = P_ECN[:, :Cf]
        M_EXN = (np.sqrt(R_EN)[:, None, None, :] * Pf_ECN[:, :, None, :] * Z_NQ.T[None, None]).reshape(E, Cf * Q, N)
        H = -np.matmul(M_EXN, M_EXN.transpose(0, 2, 1)).reshape(E, Cf, Q, Cf, Q)
        D_ECQQ = np.matmul(Z_NQ.T[None, None] * (R_EN[:, None, :] * Pf_ECN)[:, :, None, :], Z_NQ[None, None])
        for c in range(Cf):
            H[:, c, :, c, :] += D_ECQQ[:, c]
        H = H.reshape(E, Cf * Q, Cf * Q)
        ridge_E = 1e-10 * (np.trace(H, axis1=1, axis2=2) / (Cf * Q) + 1e-12)
        H = H + ridge_E[:, None, None] * np.eye(Cf * Q)
        if l2:
            # Layout (c, q): the penalty's curvature on every coefficient but the intercepts.
            H = H + l2 * np.kron(P_CC, np.diag(coef_Q))
        try:
            step_ECQ = np.linalg.solve(H, grad_ECQ.reshape(E, Cf * Q, 1)).reshape(E, Cf, Q)
        except np.linalg.LinAlgError:
            step_ECQ = np.stack([_solve_psd(H[e], grad_ECQ[e].ravel()) for e in range(E)]).reshape(E, Cf, Q)
        step_EQC = step_ECQ.transpose(0, 2, 1)
        move_E = np.abs(np.matmul(Z_NQ[None], step_EQC)).max(axis=(1, 2))
        t_E = np.where(move_E > max_step, max_step / np.maximum(move_E, 1e-300), 1.0)
        pending = np.ones(E, dtype=bool)
        out = V_EQC.copy()
        q_out_E = q0_E.copy()
        logp_out = logp_ECN.copy()
        for _ in range(30):
            V_try = V_EQC.copy()
            V_try[:, :, :Cf] += t_E[:, None, None] * step_EQC
            q_E, logp_try = value(V_try)
            ok = pending & (q_E >= q0_E)
            out[ok] = V_try[ok]
            q_out_E[ok] = q_E[ok]
            logp_out[ok] = logp_try[ok]
            pending &= ~ok
            if not pending.any():
                break
            t_E = np.where(pending, 0.5 * t_E, t_E)
        gain_E = q_out_E - q0_E
        V_EQC, q0_E, logp_ECN = out, q_out_E, logp_out
        if np.all(gain_E <= 1e-12 * np.abs(q0_E)):
            break
    return V_EQC


def multinomial_mstep(
    Z_NQ: np.ndarray,
    Y_NC: np.ndarray,
    R_NE: np.ndarray,
    V_EQC: np.ndarray,
    alpha: float = 0.0,
    n_total: int | None = None,
    lipschitz_E: np.ndarray | None = None,
    l2: float = 0.0,
    symmetric: bool = False,
) -> np.ndarray:
    """Weighted multinomial logistic regression per expert (targets ``r_ne * onehot(y_n)``),
    by damped Newton (ridge of `multinomial_ridge`), or by proximal gradient with the
    Lasso penalty when ``alpha > 0``."""
    if alpha <= 0:
        return multinomial_newton_experts(Z_NQ, Y_NC, R_NE, V_EQC, l2, symmetric)
    V_EQC = V_EQC.copy()
    C = Y_NC.shape[1]
    n_total = n_total or Z_NQ.shape[0]
    for e in range(R_NE.shape[1]):
        T_NC = R_NE[:, e, None] * Y_NC
        if T_NC.sum() <= 1e-10:
            continue
        V_EQC[e], lipschitz_E[e] = l1_gate(
            Z_NQ, T_NC, V_EQC[e], C - 1, None, alpha, n_total, lipschitz_E[e]
        )
    return V_EQC
