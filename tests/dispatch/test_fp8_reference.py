"""`gatedmoe.dispatch.triton.fp8_reference`: the FP8 quantisation and GEMM arithmetic the
kernels reproduce, against FP8's rounding bounds (no Triton needed).

The bounds. A format with ``m`` mantissa bits rounds to nearest with unit roundoff
``u = 2^-(m+1)`` (e4m3: m = 3, u = 2^-4; e5m2: m = 2, u = 2^-3) above its smallest normal
``2^emin`` (e4m3: 2^-6, e5m2: 2^-14); below it the spacing is ``2^(emin-m)``. A value v of a
tile with power-of-two scale s is stored as ``s * RN(v / s)`` (v / s is exact), so

    |q s - v| <= u |v| + s 2^(emin-m-1)                                          (1)

(the second term only below ``s 2^emin``; the scale puts the tile's amax in (fmax/2, fmax],
so it matters only for elements ~2^-13 (e4m3) of the tile's largest). A GEMM with both
operands quantised, ``A' = A + dA``, ``B' = B + dB``, accumulating in float32 (error
~K 2^-24, negligible against u) has

    ||A'B' - AB||_F <= ||dA||_F ||B||_2 + ||A||_2 ||dB||_F + ||dA||_F ||dB||_F     (2)

with ``||dA||_F`` bounded elementwise by (1). `test_gemm_error_within_the_rounding_bound`
checks (2) for both recipes; the dispatch tests (`test_fp8.py`) derive their tolerances
from (1) as well.
"""

import pytest
import torch

from gatedmoe.dispatch.options import FP8_MAX, FP8Recipe
from gatedmoe.dispatch.triton.fp8_reference import (
    FP8_DTYPES,
    _per_expert,
    _weight,
    dequantize_blocks,
    dequantize_rows,
    pow2_scale,
    quantize_blocks,
    quantize_rows,
)

# (mantissa bits, smallest normal exponent) of each format.
FORMATS = {"e4m3": (3, -6), "e5m2": (2, -14)}


def _elementwise_bound(v: torch.Tensor, s: torch.Tensor, fmt: str) -> torch.Tensor:
    """Bound (1) on |q s - v| for values v with their tile's scale s (broadcast)."""
    m, emin = FORMATS[fmt]
    return 2.0 ** -(m + 1) * v.abs() + s * 2.0 ** (emin - m - 1)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_scale_is_the_smallest_power_of_two_in_range(fmt):
    amax = torch.cat([torch.logspace(-30, 30, 2001), torch.tensor([FP8_MAX[fmt], FP8_MAX[fmt] * (1 + 2**-20), 1.0])])
    s = pow2_scale(amax, fmt)
    assert torch.equal(torch.frexp(s).mantissa, torch.full_like(s, 0.5)), "not a power of two"
    assert (amax / s <= FP8_MAX[fmt]).all()
    assert (amax / (s / 2) > FP8_MAX[fmt]).all()
    assert pow2_scale(torch.tensor([FP8_MAX[fmt]]), fmt).item() == 1.0
    zero = pow2_scale(torch.zeros(1), fmt)
    assert torch.isfinite(1 / zero).all() and zero.item() > 0


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("group", [16, None])
def test_quantize_rows_within_the_rounding_bound(fmt, group):
    # Rows of very different magnitudes, a tile with one outlier, zeros, 40 columns (a partial tile).
    x = torch.randn(9, 40) * torch.logspace(-8, 8, 9)[:, None]
    x[3, 5] = 1e4
    x[4] = 0
    q, s = quantize_rows(x, fmt, group)
    assert q.dtype == FP8_DTYPES[fmt] and s.shape == (9, 3 if group else 1)
    deq = dequantize_rows(q, s, group)
    s_full = s.repeat_interleave(group or 40, 1)[:, :40]
    assert ((deq - x).abs() <= _elementwise_bound(x, s_full, fmt)).all()
    assert torch.equal(deq[4], torch.zeros(40))
    # Every tile reaches the upper half of the range (amax/s > fmax/2 may round down onto it).
    amax = (q.float().abs().amax(-1) if group is None else
            torch.nn.functional.pad(q.float().abs(), (0, 8)).view(9, 3, 16).amax(-1))
    assert ((amax >= FP8_MAX[fmt] / 2) | (amax == 0)).all()


def test_quantize_blocks_within_the_rounding_bound_and_blocks_transpose():
    w = torch.randn(3, 40, 24)
    w[1, :16, :16] *= 1e3  # one block of large values leaves the others' scales alone
    q, s = quantize_blocks(w, "e4m3", 16)
    assert s.shape == (3, 3, 2)
    s_full = s.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :40, :24]
    assert ((dequantize_blocks(q, s, 16) - w).abs() <= _elementwise_bound(w, s_full, "e4m3")).all()
    qt, st = quantize_blocks(w.transpose(1, 2), "e4m3", 16)
    assert torch.equal(qt.view(torch.uint8), q.transpose(1, 2).view(torch.uint8))
    assert torch.equal(st, s.transpose(1, 2))
    qr, sr = quantize_blocks(w, "e4m3", None)
    assert sr.shape == (3, 40, 1)
    assert ((dequantize_blocks(qr, sr, None) - w).abs() <= _elementwise_bound(w, sr, "e4m3")).all()


@pytest.mark.parametrize("scaling", ["blockwise", "rowwise"])
def test_gemm_error_within_the_rounding_bound(scaling):
    recipe = FP8Recipe(scaling=scaling, block=16)
    group = 16 if scaling == "blockwise" else None
    a = torch.randn(50, 64) * torch.rand(50, 1)
    w = torch.randn(2, 48, 64)
    counts = torch.tensor([20, 30])
    exact = _per_expert(a, w, counts)
    qa, sa = quantize_rows(a, "e4m3", group)
    a8 = dequantize_rows(qa, sa, group)
    fp8 = _per_expert(a8, _weight(w, recipe), counts)
    s_a = sa.repeat_interleave(group or 64, 1)[:, :64]
    dA = _elementwise_bound(a, s_a, "e4m3").norm()
    for e, (lo, hi) in enumerate([(0, 20), (20, 50)]):
        w8 = _weight(w[e : e + 1], recipe)[0]
        dB = (w8 - w[e]).abs().norm()  # the actual error, itself checked against (1) above
        A, B = a[lo:hi], w[e].T
        dA_e = _elementwise_bound(A, s_a[lo:hi], "e4m3").norm()
        bound = dA_e * torch.linalg.matrix_norm(B, 2) + torch.linalg.matrix_norm(A, 2) * dB + dA_e * dB
        err = (fp8[lo:hi] - exact[lo:hi]).norm()
        assert err <= bound, f"expert {e}: {err:.3g} > bound {bound:.3g}"
        # ... and the bound is informative: a few percent of the product, not vacuous.
        assert bound < 0.25 * exact[lo:hi].norm()
    assert dA > 0
