"""Each Triton kernel stage (`launchers.launch_*`) against its plain PyTorch reference
(`gatedmoe.dispatch.triton.reference`), called with the same arguments.

On CPU the kernels run in Triton's interpreter at small sizes in float32; shapes are
awkward on purpose: T=1, widths that are not powers of two, empty experts, every row on
one expert. Output buffers start as NaN on both sides, so an unwritten row fails.
"""

import pytest
import torch

from gatedmoe.dispatch.triton import config, reference
from helpers import assert_close, poisoned_empty

pytest.importorskip("triton")
from gatedmoe.dispatch.triton import launchers  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
# (T, D, H, counts): T=1; odd widths with empty experts; everything on one expert.
CASES = [
    (1, 16, 16, [0, 1, 0]),
    (13, 24, 40, [3, 0, 7, 0, 4]),
    (9, 40, 24, [0, 0, 11]),
]


def _problem(T, D, H, counts, dtype):
    torch.manual_seed(0)
    counts = torch.tensor(counts, device=DEVICE)
    N, E = int(counts.sum()), counts.numel()
    token = torch.randint(0, T, (N,), device=DEVICE)
    weight = torch.rand(N, device=DEVICE, dtype=dtype)
    return counts, N, E, token, weight


def _cfg(name, dtype, H):
    return config.kernel_configs(dtype, torch.device(DEVICE), H)[name]


def _nan(*shape, dtype):
    return poisoned_empty(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("store_h", [True, False])
@pytest.mark.parametrize("T,D,H,counts", CASES)
def test_glu_fwd_matches_reference(T, D, H, counts, store_h, dtype):
    counts, N, E, token, _ = _problem(T, D, H, counts, dtype)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype)
    w_in = torch.randn(E, 2 * H, D, device=DEVICE, dtype=dtype) / D**0.5
    sides = {}
    for side, fn in (("ref", reference.glu_fwd), ("fast", launchers.launch_glu_fwd)):
        h, a = _nan(N if store_h else 0, 2 * H, dtype=dtype), _nan(N, H, dtype=dtype)
        fn(x, token, w_in, h, a, counts, N, D, H, _cfg("glu_fwd", dtype, H), launchers.precision(dtype),
           store_h=store_h)
        sides[side] = (h, a)
    (ref_h, ref_a), (fast_h, fast_a) = sides["ref"], sides["fast"]
    assert_close("h", ref_h, fast_h, dtype)
    assert_close("a", ref_a, fast_a, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stage", ["combine", "gathered", "dx"])
@pytest.mark.parametrize("T,D,H,counts", CASES)
def test_gemm_matches_reference(T, D, H, counts, stage, dtype):
    # The three uses in ops.py: forward combine (scaled, scattered), the gathered
    # gy @ W_out of backward, the dL/dx scatter.
    counts, N, E, token, weight = _problem(T, D, H, counts, dtype)
    if stage == "combine":
        a = torch.randn(N, H, device=DEVICE, dtype=dtype)
        b = torch.randn(E, D, H, device=DEVICE, dtype=dtype)
        args = (a, b, (D * H, 1, H))
        K, n_cols, flags, out_rows = H, D, {"gather": False, "scale": True, "scatter": True}, T
    elif stage == "gathered":
        a = torch.randn(T, D, device=DEVICE, dtype=dtype)
        b = torch.randn(E, D, H, device=DEVICE, dtype=dtype)
        args = (a, b, (D * H, H, 1))
        K, n_cols, flags, out_rows = D, H, {"gather": True, "scale": False, "scatter": False}, N
    else:
        a = torch.randn(N, 2 * H, device=DEVICE, dtype=dtype)
        b = torch.randn(E, 2 * H, D, device=DEVICE, dtype=dtype)
        args = (a, b, (2 * H * D, D, 1))
        K, n_cols, flags, out_rows = 2 * H, D, {"gather": False, "scale": False, "scatter": True}, T
    sides = {}
    for side, fn in (("ref", reference.gemm), ("fast", launchers.launch_gemm)):
        # A scatter adds into a zeroed buffer (float32, as with fp32_scatter); a store must
        # write every row.
        c = (torch.zeros(out_rows, n_cols, device=DEVICE) if flags["scatter"]
             else _nan(out_rows, n_cols, dtype=dtype))
        fn(*args, c, token, weight, counts, N, K, n_cols, **flags, cfg=_cfg("gemm_fwd", dtype, H),
           prec=launchers.precision(dtype))
        sides[side] = c
    assert_close("c", sides["ref"], sides["fast"], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("T,D,H,counts", CASES)
def test_swiglu_bwd_matches_reference(T, D, H, counts, in_place, dtype):
    # in_place: wa is ga itself, as ops.py calls it.
    _, N, _, _, weight = _problem(T, D, H, counts, dtype)
    ga0 = torch.randn(N, H, device=DEVICE, dtype=dtype)
    h = torch.randn(N, 2 * H, device=DEVICE, dtype=dtype)
    sides = {}
    for side, fn in (("ref", reference.swiglu_bwd), ("fast", launchers.launch_swiglu_bwd)):
        ga = ga0.clone()
        gh, gweight = _nan(N, 2 * H, dtype=dtype), _nan(N, dtype=torch.float32)
        wa = ga if in_place else _nan(N, H, dtype=dtype)
        fn(ga, h, weight, gh, wa, gweight, N, H)
        sides[side] = (gh, wa, gweight)
    for name, ref, fast in zip(("gh", "wa", "gweight"), *sides.values(), strict=True):
        assert_close(name, ref, fast, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather_l,gather_r", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("T,D,H,counts", CASES)
def test_wgrad_matches_reference(T, D, H, counts, gather_l, gather_r, dtype):
    counts, N, E, token, _ = _problem(T, D, H, counts, dtype)
    lhs = torch.randn(T if gather_l else N, D, device=DEVICE, dtype=dtype)
    rhs = torch.randn(T if gather_r else N, H, device=DEVICE, dtype=dtype)
    sides = {}
    for side, fn in (("ref", reference.wgrad), ("fast", launchers.launch_wgrad)):
        out = _nan(E, D, H, dtype=dtype)
        fn(lhs, rhs, out, token, counts, gather_l=gather_l, gather_r=gather_r, cfg=_cfg("wgrad", dtype, H),
           prec=launchers.precision(dtype))
        sides[side] = out
    assert_close("out", sides["ref"], sides["fast"], dtype)


@pytest.mark.parametrize("T,D,H,counts", CASES)
def test_weight_grad_matches_reference(T, D, H, counts):
    # The torch path of the weight gradients (grouped GEMM / per-expert products).
    counts, N, E, token, _ = _problem(T, D, H, counts, torch.float32)
    lhs = torch.randn(N, 2 * H, device=DEVICE)
    rhs = torch.randn(N, D, device=DEVICE)
    ref_out = _nan(E, 2 * H, D, dtype=torch.float32)
    reference.wgrad(lhs, rhs, ref_out, token, counts, gather_l=False, gather_r=False)
    fast_out = launchers.weight_grad(lhs, rhs, counts, torch.cumsum(counts, 0, dtype=torch.int32))
    assert_close("out", ref_out, fast_out)
