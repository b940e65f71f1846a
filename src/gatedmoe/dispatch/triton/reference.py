"""Plain PyTorch version of each kernel stage, the oracle of the kernel tests: same
signature as the launcher in `launchers.py` (same output buffers filled, ``cfg`` and
``prec`` accepted and ignored), computed in float32 with a per-expert loop, no Triton.

* `glu_fwd`    gathered GEMM + SwiGLU: ``h = x[token] @ W_in[e]^T``, ``a = silu(h_gate) * h_up``
* `gemm`       grouped GEMM over expert rows, optionally gathered, scaled by the routing
               weight, scatter-added by token (the forward combine, dL/dx)
* `swiglu_bwd` SwiGLU backward with the routing weight
* `wgrad`      weight-gradient GEMM ``out[e] = L[rows_e]^T @ R[rows_e]``
* `decode_glu`, `decode_down`, `decode_combine`: the decode path's three stages (SwiGLU
               of the gathered rows; the second product times the routing weight, float32,
               per assignment; the per-token sum), and `moe_glu_decode`, the three in a row
               (the signature of `ops.moe_glu_decode`)

Rows are the expert-sorted routed assignments: expert e owns rows
``[end_e - counts[e], end_e)``. Shape legend: T tokens, D model dim, H expert hidden,
E experts, N routed assignments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["decode_combine", "decode_down", "decode_glu", "glu_fwd", "gemm", "moe_glu_decode", "swiglu_bwd", "wgrad"]


def _expert_rows(counts_E: Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each expert's rows."""
    bounds, start = [], 0
    for c in counts_E.tolist():
        bounds.append((start, start + c))
        start += c
    return bounds


def glu_fwd(x, token, w_in, h, a, counts, N: int, D: int, H: int, cfg=None, prec=None, *,
            gathered: bool = False, store_h: bool = True) -> None:
    """Fills ``h`` [N, 2H] (gate columns then up columns; only with ``store_h``) and ``a``
    [N, H]; ``gathered``: ``x`` is already ``x[token]`` ([N, D]). The activation reads h
    rounded to its dtype, as the kernel does."""
    rows = x.float() if gathered else x.float()[token]
    for e, (s, t) in enumerate(_expert_rows(counts)):
        if s == t:
            continue
        h_e = (rows[s:t] @ w_in[e].float().T).to(a.dtype)
        if store_h:
            h[s:t] = h_e
        g, u = h_e.float()[:, :H], h_e.float()[:, H:]
        a[s:t] = (F.silu(g) * u).to(a.dtype)


def gemm(a, b, b_strides, c, token, weight, counts, N: int, K: int, n_cols: int, *,
         gather: bool, scale: bool, scatter: bool, cfg=None, prec=None) -> None:
    """``c[n] = A[n] @ B[e]`` for each expert's rows, with B's element ``[e, k, n]`` at
    ``b_strides`` (``A[n] = a[token[n]]`` with ``gather``; times ``weight[n]`` with
    ``scale``; added into ``c[token[n]]`` with ``scatter``, else stored at ``c[n]``)."""
    E = b.shape[0]
    b_EKC = torch.as_strided(b, (E, K, n_cols), b_strides, b.storage_offset())
    rows = a.float()[token] if gather else a.float()[:N]
    for e, (s, t) in enumerate(_expert_rows(counts)):
        if s == t:
            continue
        _finish_rows(c, rows[s:t] @ b_EKC[e].float(), token, weight, s, t, scale=scale, scatter=scatter)


def _finish_rows(c: Tensor, out: Tensor, token: Tensor, weight: Tensor, s: int, t: int, *, scale: bool,
                 scatter: bool) -> None:
    """The GEMMs' epilogue for rows ``s:t``: ``out`` times ``weight[n]`` with ``scale``, then
    added into ``c[token[n]]`` with ``scatter``, else stored at ``c[n]``."""
    if scale:
        out = out * weight[s:t].float()[:, None]
    if scatter:
        c.index_add_(0, token[s:t], out.to(c.dtype))
    else:
        c[s:t] = out.to(c.dtype)


def swiglu_bwd(ga, h, weight, gh, wa, gweight, N: int, H: int) -> None:
    """From ``ga = gy[token] @ W_out[e]`` [N, H] and h [N, 2H]: ``gweight[n] = <ga[n], a[n]>``
    ([N]), ``wa = weight * a`` [N, H] and ``gh = weight * ga * (dsilu(h_gate) * h_up,
    silu(h_gate))`` [N, 2H], with ``a = silu(h_gate) * h_up``. ``wa`` may be ``ga``."""
    g, u = h[:N, :H].float(), h[:N, H:].float()
    ga32 = ga[:N].float()
    w = weight[:N].float()[:, None]
    sig = torch.sigmoid(g)
    silu = g * sig
    act = silu * u
    gweight[:N] = (ga32 * act).sum(1).to(gweight.dtype)
    gw_a = ga32 * w
    gh[:N, :H] = (gw_a * u * (sig + silu * (1 - sig))).to(gh.dtype)
    gh[:N, H:] = (gw_a * silu).to(gh.dtype)
    wa[:N] = (act * w).to(wa.dtype)


def wgrad(lhs: Tensor, rhs: Tensor, out: Tensor, token: Tensor, counts: Tensor, *, gather_l: bool,
          gather_r: bool, cfg=None, prec=None) -> None:
    """Fills ``out[e] = L[rows_e]^T @ R[rows_e]`` ([E, P, Q]; zero for an empty expert),
    ``L = lhs[token]`` with ``gather_l`` (likewise R)."""
    L = lhs.float()[token] if gather_l else lhs.float()
    R = rhs.float()[token] if gather_r else rhs.float()
    for e, (s, t) in enumerate(_expert_rows(counts)):
        out[e] = (L[s:t].T @ R[s:t]).to(out.dtype)


def decode_glu(x, token, w_in, a, counts, N: int, D: int, H: int, cfg=None, prec=None) -> None:
    """Fills ``a`` [N, H] with ``silu(g) * u``, ``(g, u) = x[token[n]] @ W_in[e]^T`` rounded to
    a's dtype (as `glu_fwd` with ``store_h=False``)."""
    glu_fwd(x, token, w_in, None, a, counts, N, D, H, store_h=False)


def decode_down(a, w_out, weight, o, counts, N: int, H: int, D: int, cfg=None, prec=None) -> None:
    """Fills ``o`` [N, D] (float32) with ``weight[n] * (a[n] @ W_out[e]^T)``."""
    for e, (s, t) in enumerate(_expert_rows(counts)):
        if s < t:
            o[s:t] = (a[s:t].float() @ w_out[e].float().T) * weight[s:t].float()[:, None]


def decode_combine(o, token, y, N: int, D: int) -> None:
    """Fills ``y`` [T, D] with the sum of ``o[n]`` over each token's assignments (zeros for a
    token with none), rounded once to y's dtype."""
    y.copy_(torch.zeros(y.shape, dtype=torch.float32, device=y.device).index_add_(0, token[:N], o[:N].float()))


def moe_glu_decode(x_TD, token_N, weight_N, counts_E, w_in_EHD, w_out_EDH, options=None) -> Tensor:
    """`ops.moe_glu_decode` in plain PyTorch: the three stages above in a row (``options``
    accepted and ignored)."""
    T, D = x_TD.shape
    N, H = token_N.numel(), w_out_EDH.shape[-1]
    a = torch.empty(N, H, device=x_TD.device, dtype=x_TD.dtype)
    o = torch.empty(N, D, device=x_TD.device, dtype=torch.float32)
    y = torch.empty(T, D, device=x_TD.device, dtype=x_TD.dtype)
    decode_glu(x_TD, token_N, w_in_EHD, a, counts_E, N, D, H)
    decode_down(a, w_out_EDH, weight_N, o, counts_E, N, H, D)
    decode_combine(o, token_N, y, N, D)
    return y
