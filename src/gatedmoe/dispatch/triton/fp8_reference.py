"""Plain float32 PyTorch version of the FP8 path (`fp8_kernels.py`, `fp8_ops.py`): the
quantisation of activations and weights, and the whole FP8 forward and backward, computed
as "dequantise, then multiply in float32". The oracle of the FP8 kernel tests.

Quantisation (`gatedmoe.dispatch.options.FP8Recipe`): ``q = RN(v / s)`` in e4m3 or e5m2,
round to nearest even, with one power-of-two scale ``s`` per tile (``1 x block`` of an
activation row, ``block x block`` of a weight, or a whole row): the smallest ``s = 2^e``
with ``amax / s <= fmax``. Division by a power of two is exact, so the kernels' FP8
values equal these bit for bit; their products differ only in the order of float32 sums.

Shape legend: T tokens, D model dim, H expert hidden, E experts, N routed assignments,
R rows, C columns, KB scale blocks along the reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gatedmoe.dispatch.options import FP8_MAX, FP8Recipe

__all__ = [
    "FP8_DTYPES",
    "dequantize_blocks",
    "dequantize_rows",
    "fp8_moe_backward",
    "fp8_moe_forward",
    "pow2_scale",
    "quantize_blocks",
    "quantize_rows",
]

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# log2 of the largest power of two below each format's maximum: both maxima are 1.75 * 2^EXP.
_FMAX_EXP = {"e4m3": 8, "e5m2": 15}
# amax floor: keeps 2^-e a normal float32 for an all-zero tile (its scale is then 2^-108).
AMAX_FLOOR = 2.0**-100


def pow2_scale(amax: Tensor, fmt: str) -> Tensor:
    """The smallest power of two ``s`` with ``amax / s <= fmax`` (float32, elementwise).

    With ``amax = m 2^E`` (``1 <= m < 2``) and ``fmax = 1.75 2^X``: ``s = 2^(E - X)`` if
    ``m <= 1.75`` else ``2^(E - X + 1)``, read off the float32 bits (no log2, exact).

    Examples
    --------
    >>> pow2_scale(torch.tensor([448.0, 449.0, 1.0]), "e4m3")
    tensor([1.0000, 2.0000, 0.0039])
    """
    bits = amax.float().clamp_min(AMAX_FLOOR).view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 - _FMAX_EXP[fmt] + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    return ((exp + 127) << 23).view(torch.float32)


def quantize_rows(x_RC: Tensor, fmt: str, group: int | None) -> tuple[Tensor, Tensor]:
    """``(q [R, C] fp8, s [R, KB] float32)``: one scale per ``1 x group`` tile of each row
    (``group=None``: the whole row, ``KB = 1``); ``x ~ q * s`` tile by tile.

    Examples
    --------
    >>> q, s = quantize_rows(torch.tensor([[1.0, -3.0, 100.0, 0.1]]), "e4m3", group=2)
    >>> s
    tensor([[0.0078, 0.2500]])
    >>> dequantize_rows(q, s, group=2)  # 100 / 0.25 = 400, a tie between 384 and 416: even wins
    tensor([[ 1.0000, -3.0000, 96.0000,  0.1016]])
    """
    R, C = x_RC.shape
    g = C if group is None else group
    KB = -(-C // g)
    xp = F.pad(x_RC.float(), (0, KB * g - C)).view(R, KB, g)
    s = pow2_scale(xp.abs().amax(-1), fmt)
    q = (xp / s[..., None]).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).to(FP8_DTYPES[fmt])
    return q.view(R, KB * g)[:, :C].contiguous(), s


def dequantize_rows(q_RC: Tensor, s_RKB: Tensor, group: int | None) -> Tensor:
    """float32 ``q * s`` for `quantize_rows`' output (same ``group``)."""
    C = q_RC.shape[1]
    return q_RC.float() * s_RKB.repeat_interleave(C if group is None else group, 1)[:, :C]


def quantize_blocks(w_ERC: Tensor, fmt: str, block: int | None) -> tuple[Tensor, Tensor]:
    """``(q [E, R, C] fp8, s [E, RB, CB] float32)``: one scale per ``block x block`` block
    (``block=None``: one scale per row, ``s`` of shape ``[E, R, 1]``)."""
    if block is None:
        E, R, C = w_ERC.shape
        q, s = quantize_rows(w_ERC.reshape(E * R, C), fmt, None)
        return q.view(E, R, C), s.view(E, R, 1)
    E, R, C = w_ERC.shape
    RB, CB = -(-R // block), -(-C // block)
    wp = F.pad(w_ERC.float(), (0, CB * block - C, 0, RB * block - R)).view(E, RB, block, CB, block)
    s = pow2_scale(wp.abs().amax((2, 4)), fmt)
    q = (wp / s[:, :, None, :, None]).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).to(FP8_DTYPES[fmt])
    return q.view(E, RB * block, CB * block)[:, :R, :C].contiguous(), s


def dequantize_blocks(q_ERC: Tensor, s_E_RB_CB: Tensor, block: int | None) -> Tensor:
    """float32 ``q * s`` for `quantize_blocks`' output (same ``block``)."""
    E, R, C = q_ERC.shape
    rb, cb = (1, C) if block is None else (block, block)
    s = s_E_RB_CB.repeat_interleave(rb, 1).repeat_interleave(cb, 2)[:, :R, :C]
    return q_ERC.float() * s


def _weight(w_ERC: Tensor, recipe: FP8Recipe) -> Tensor:
    """float32 dequantised e4m3 weight as the kernels see it, rows = output channels."""
    block = recipe.block if recipe.scaling == "blockwise" else None
    return dequantize_blocks(*quantize_blocks(w_ERC, "e4m3", block), block)


def _acts(x_RC: Tensor, fmt: str, recipe: FP8Recipe) -> Tensor:
    """float32 dequantised activation rows (1 x block tiles, or whole rows)."""
    group = recipe.block if recipe.scaling == "blockwise" else None
    return dequantize_rows(*quantize_rows(x_RC, fmt, group), group)


def _expert_rows(counts_E: Tensor) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for c in counts_E.tolist():
        bounds.append((start, start + c))
        start += c
    return bounds


def _per_expert(rows_NK: Tensor, w_EMK: Tensor, counts_E: Tensor) -> Tensor:
    """``out[n] = rows[n] @ w[e]^T`` for each expert's rows, float32."""
    out = rows_NK.new_zeros(rows_NK.shape[0], w_EMK.shape[1])
    for e, (s, t) in enumerate(_expert_rows(counts_E)):
        if t > s:
            out[s:t] = rows_NK[s:t] @ w_EMK[e].T
    return out


def fp8_moe_forward(x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w_in_EHD: Tensor,
                    w_out_EDH: Tensor, recipe: FP8Recipe) -> tuple[Tensor, Tensor]:
    """``(y_TD, h_N2H)`` of the FP8 forward, in ``x``'s dtype: x quantised per token before the
    gather, ``h = x[token] @ W_in[e]^T`` (stored in x's dtype), ``a = silu(h_gate) * h_up``
    from the rounded h, a quantised, ``y[token] += weight * (a @ W_out[e]^T)`` summed in
    float32."""
    dtype = x_TD.dtype
    H = w_out_EDH.shape[-1]
    xs = _acts(x_TD, "e4m3", recipe)[token_N]
    h = _per_expert(xs, _weight(w_in_EHD, recipe), counts_E).to(dtype)
    a = F.silu(h[:, :H].float()) * h[:, H:].float()
    a = _acts(a.to(dtype), "e4m3", recipe)
    o = _per_expert(a, _weight(w_out_EDH, recipe), counts_E) * weight_N.float()[:, None]
    y = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device).index_add_(0, token_N, o)
    return y.to(dtype), h


def fp8_moe_backward(gy_TD: Tensor, x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor,
                     w_in_EHD: Tensor, w_out_EDH: Tensor, h_N2H: Tensor, recipe: FP8Recipe
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_w_in, grad_w_out)`` of `fp8_moe_forward`, as the kernels
    compute them: the data-gradient GEMMs with gy and dL/dh quantised per token / row in
    ``recipe.grad_format`` against the transposed e4m3 weights (blockwise: the forward's
    blocks transposed; rowwise: quantised per row of the transpose), the weight gradients
    from the unquantised (input dtype) operands in float32."""
    dtype = x_TD.dtype
    H = w_out_EDH.shape[-1]
    fmt = recipe.grad_format
    gys = _acts(gy_TD, fmt, recipe)[token_N]
    ga = _per_expert(gys, _weight(w_out_EDH.transpose(1, 2), recipe), counts_E).to(dtype).float()
    g, u = h_N2H[:, :H].float(), h_N2H[:, H:].float()
    sig = torch.sigmoid(g)
    silu = g * sig
    act = silu * u
    grad_weight = (ga * act).sum(1)
    gw_a = ga * weight_N.float()[:, None]
    gh = torch.cat([gw_a * u * (sig + silu * (1 - sig)), gw_a * silu], 1).to(dtype)
    wa = (act * weight_N.float()[:, None]).to(dtype)
    gx_rows = _per_expert(_acts(gh, fmt, recipe), _weight(w_in_EHD.transpose(1, 2), recipe), counts_E)
    gx = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device).index_add_(0, token_N, gx_rows)
    xs = x_TD.float()[token_N]
    gy_rows = gy_TD.float()[token_N]
    wa = wa.float()
    gh = gh.float()
    grad_w_in = torch.zeros(w_in_EHD.shape, dtype=torch.float32, device=x_TD.device)
    grad_w_out = torch.zeros(w_out_EDH.shape, dtype=torch.float32, device=x_TD.device)
    for e, (s, t) in enumerate(_expert_rows(counts_E)):
        grad_w_in[e] = gh[s:t].T @ xs[s:t]
        grad_w_out[e] = gy_rows[s:t].T @ wa[s:t]
    return gx.to(dtype), grad_weight.to(weight_N.dtype), grad_w_in.to(w_in_EHD.dtype), grad_w_out.to(w_out_EDH.dtype)
