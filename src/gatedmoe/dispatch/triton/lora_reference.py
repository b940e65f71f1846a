"""Plain PyTorch version of each launcher in `lora_ops.py`, the oracle of the LoRA kernel
tests: same signature (same output buffers filled, ``cfg`` and ``prec`` accepted and
ignored), computed in float32 with a per-expert loop, no Triton.

* `lora_glu_fwd` ``h = x[token] @ W_in[e]^T + z @ B_in[e]^T``, ``a = silu(h_gate) * h_up``
* `lora_gemm`    ``C = alpha (A[rows] @ B[e] + Z[rows] @ L[e])``, optionally gathered, scaled by the
                 routing weight, scatter-added by token (with no ``z``, the plain product)
* `lora_wgrad`   ``out[e] = L[rows_e]^T @ R[rows_e]``, float32

Rows are the expert-sorted routed assignments: expert e owns rows
``[end_e - counts[e], end_e)``. Shape legend: N routed assignments, D model dim,
H expert hidden, E experts, R adapter rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gatedmoe.dispatch.triton.reference import _expert_rows, _finish_rows

__all__ = ["lora_gemm", "lora_glu_fwd", "lora_wgrad"]


def lora_glu_fwd(x, token, w_in, z, b_in, h, a, counts, N: int, D: int, H: int, R: int, cfg=None,
                 prec=None, *, gathered: bool = False, store_h: bool = True) -> None:
    """Fills ``h`` [N, 2H] (only with ``store_h``) and ``a`` [N, H]; ``gathered``: ``x`` is
    already ``x[token]`` ([N, D]). The activation reads h rounded to its dtype, as the kernel
    does."""
    rows = x.float() if gathered else x.float()[token]
    for e, (s, t) in enumerate(_expert_rows(counts)):
        if s == t:
            continue
        h_e = rows[s:t] @ w_in[e].float().T + z[s:t].float() @ b_in[e].float().T
        h_e = h_e.to(a.dtype)
        if store_h:
            h[s:t] = h_e
        a[s:t] = (F.silu(h_e.float()[:, :H]) * h_e.float()[:, H:]).to(a.dtype)


def lora_gemm(a, b, b_strides, c, token, weight, counts, N: int, K: int, n_cols: int, *, gather: bool, scale: bool,
              scatter: bool, cfg=None, prec=None, z=None, l_=None, l_strides=None, alpha: float = 1.0,
              rank_out: bool = False) -> None:
    """``c[n] = alpha * (A[n] @ B[e] + z[n] @ L[e])`` for each expert's rows, B's element
    ``[e, k, n]`` at ``b_strides`` and L's ``[e, r, n]`` at ``l_strides`` (``A[n] = a[token[n]]``
    with ``gather``; times ``weight[n]`` with ``scale``; added into ``c[token[n]]`` with
    ``scatter``, else stored at ``c[n]``)."""
    E = b.shape[0]
    b_EKC = torch.as_strided(b, (E, K, n_cols), b_strides, b.storage_offset()).float()
    if z is not None:
        R = z.shape[1]
        l_ERC = torch.as_strided(l_, (E, R, n_cols), l_strides, l_.storage_offset()).float()
    rows = a.float()[token] if gather else a.float()
    for e, (s, t) in enumerate(_expert_rows(counts)):
        if s == t:
            continue
        out = rows[s:t] @ b_EKC[e]
        if z is not None:
            out = out + z[s:t].float() @ l_ERC[e]
        _finish_rows(c, out * alpha, token, weight, s, t, scale=scale, scatter=scatter)


def lora_wgrad(lhs: Tensor, rhs: Tensor, token: Tensor, counts: Tensor, E: int, *, gather_l: bool, gather_r: bool,
               cfg=None, prec=None) -> Tensor:
    """``out[e] = lhs[rows_e]^T @ rhs[rows_e]``, ``[E, P, Q]`` float32 (gathered operands read
    by token)."""
    left = lhs.float()[token] if gather_l else lhs.float()
    right = rhs.float()[token] if gather_r else rhs.float()
    out = torch.zeros(E, lhs.shape[1], rhs.shape[1], device=lhs.device)
    for e, (s, t) in enumerate(_expert_rows(counts)):
        out[e] = left[s:t].T @ right[s:t]
    return out
