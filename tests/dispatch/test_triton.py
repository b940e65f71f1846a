"""Fused Triton backend against the reference: outputs and every gradient.

On CUDA this runs the compiled kernels; on CPU it runs them in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py) at tiny sizes in float32.
"""

import pytest
import torch
from routings import assert_second_backward_refused, make_routing

from gatedmoe.dispatch import TritonOptions, get_backend, reference_dispatch
from gatedmoe.dispatch.triton import config
from gatedmoe.dispatch.triton.config import KernelConfig
from gatedmoe.experts import ExpertBank
from helpers import assert_close, poisoned_empty

pytest.importorskip("triton")
from gatedmoe.dispatch.triton import (  # noqa: E402
    launchers,
    moe_glu,
    moe_glu_forward,
    tile_schedule,
    triton_dispatch,
)
from gatedmoe.dispatch.triton.launchers import device_tile_schedule  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _poison_kernel_buffers(monkeypatch):
    """Every buffer a kernel must fill starts as NaN, so an unwritten element fails loudly."""
    monkeypatch.setattr(launchers, "alloc", lambda *shape, device, dtype: poisoned_empty(*shape, dtype=dtype, device=device))

DEVICE = "cuda" if CUDA else "cpu"
# (T, D, H, E, K, mode): T=1, T=63, widths that are not powers of two, empty experts,
# everything on one expert, k = E.
CASES = [
    (1, 16, 16, 3, 1, "random"),
    (63, 24, 40, 5, 2, "random"),
    (33, 16, 24, 6, 3, "skip_experts"),
    (40, 32, 16, 4, 2, "one_expert"),
    (17, 16, 16, 3, 3, "all"),
]
if CUDA:
    CASES += [(1000, 264, 328, 8, 2, "random"), (517, 128, 96, 16, 6, "skip_experts")]
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]


def _grads(fn, x, logits, T, E, K, mode, bank, gy):
    x = x.detach().clone().requires_grad_()
    logits = logits.detach().clone().requires_grad_()
    torch.manual_seed(7)
    routing = make_routing(T, E, K, mode, logits)
    bank.zero_grad(set_to_none=True)
    y = fn(x, routing, bank)
    y.backward(gy)
    return y.detach(), {"x": x.grad, "logits": logits.grad, "w_in": bank.w_in.grad, "w_out": bank.w_out.grad}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,H,E,K,mode", CASES)
def test_triton_matches_reference(T, D, H, E, K, mode, dtype, options=None):
    torch.set_default_device(DEVICE)
    try:
        bank = ExpertBank(E, D, H).to(dtype)
        x = torch.randn(T, D, dtype=dtype)
        logits = torch.randn(T, E)
        gy = torch.randn(T, D, dtype=dtype)
        ref_y, ref_g = _grads(reference_dispatch, x, logits, T, E, K, mode, bank, gy)

        def fast_fn(x, routing, bank):
            return triton_dispatch(x, routing, bank, options=options)

        fast_y, fast_g = _grads(fast_fn, x, logits, T, E, K, mode, bank, gy)
    finally:
        torch.set_default_device("cpu")
    assert_close("y", ref_y, fast_y, dtype)
    for name in ref_g:
        assert_close(f"grad {name}", ref_g[name], fast_g[name], dtype)


@pytest.mark.parametrize("options", [TritonOptions(fp32_scatter=True),
                                     TritonOptions(configs={"gemm_fwd": KernelConfig(16, 32, 16, 4, 1, group_m=1),
                                                            "wgrad": KernelConfig(32, 16, 16, 4, 1)})])
@pytest.mark.parametrize("T,D,H,E,K,mode", [(63, 24, 40, 5, 2, "random"), (33, 16, 24, 6, 3, "skip_experts")])
def test_triton_with_options_matches_reference(T, D, H, E, K, mode, options):
    # Options pass through the call (no module-level state): outputs and every gradient.
    dtype = torch.bfloat16 if CUDA else torch.float32
    test_triton_matches_reference(T, D, H, E, K, mode, dtype, options)


def test_backend_passes_options_through(monkeypatch):
    from gatedmoe.dispatch.triton import backend

    seen = []
    monkeypatch.setattr(backend, "moe_glu", lambda *a: seen.append(a[-1]) or (a[0] * 0, None))
    bank = ExpertBank(3, 16, 16).to(DEVICE)
    r = make_routing(5, 3, 2, "random", torch.randn(5, 3)).to(DEVICE)
    options = TritonOptions(fp32_scatter=True)
    get_backend("triton")(torch.randn(5, 16, device=DEVICE), r, bank, options=options)
    get_backend("triton")(torch.randn(5, 16, device=DEVICE), r, bank)
    assert seen == [options, None]


@pytest.mark.skipif(not CUDA, reason="the gathered copies are read through TMA (CUDA, 16-bit)")
@pytest.mark.parametrize("pregather", [False, True])
@pytest.mark.parametrize("T,D,H,E,K,mode", [(1000, 264, 328, 8, 2, "random"), (517, 128, 96, 16, 6, "skip_experts"),
                                             (63, 24, 40, 5, 2, "one_expert")])
def test_gather_modes_match_reference(T, D, H, E, K, mode, pregather):
    from dataclasses import replace

    # Given configs are used as they are (no width rule), so both gather modes run here.
    cfgs = {k: replace(c, pregather=pregather) for k, c in config.CONFIGS_BF16.items()}
    test_triton_matches_reference(T, D, H, E, K, mode, torch.bfloat16, TritonOptions(configs=cfgs))


@pytest.mark.skipif(not CUDA, reason="bf16 atomics: the interpreter runs float32 only")
@pytest.mark.parametrize("fp32", [False, True])
def test_scatter_precisions_match_reference(fp32):
    test_triton_matches_reference(517, 128, 96, 16, 6, "skip_experts", torch.bfloat16,
                                  TritonOptions(fp32_scatter=fp32))


@pytest.mark.skipif(not CUDA, reason="bf16 atomics: the interpreter runs float32 only")
def test_fp32_scatter_is_more_accurate():
    # Each token sums k=8 rows: in bf16 every add rounds, in float32 only the final result.
    # Over 2048 x 256 outputs the difference in error is systematic, not luck.
    T, D, H, E, K = 2048, 256, 128, 32, 8
    bank = ExpertBank(E, D, H).to("cuda", torch.bfloat16)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    r = make_routing(T, E, K, "random", torch.randn(T, E)).to("cuda")
    bank64 = ExpertBank(E, D, H).to("cuda", torch.float64)
    bank64.load_state_dict(bank.state_dict())
    with torch.no_grad():
        ref = reference_dispatch(x.double(), r, bank64)
        errors = {}
        for fp32 in (False, True):
            fast = triton_dispatch(x, r, bank, options=TritonOptions(fp32_scatter=fp32))
            errors[fp32] = ((fast.double() - ref).norm() / ref.norm()).item()
    assert errors[True] < errors[False] * 0.9, errors


@pytest.mark.skipif(not CUDA, reason="the per-expert weight gradients are the CUDA bf16 path")
@pytest.mark.parametrize("T,D,H,E,K,mode", [(1000, 264, 328, 8, 2, "random"), (517, 128, 96, 16, 6, "skip_experts"),
                                             (63, 24, 40, 5, 2, "one_expert")])
def test_per_expert_weight_gradients_match_reference(monkeypatch, T, D, H, E, K, mode):
    # Forced on at these sizes (normally only for experts of >= 2048 rows): one cuBLAS
    # product per expert, empty experts included, counts copied to the host asynchronously.
    monkeypatch.setattr(config, "PER_EXPERT_MIN_ROWS", 1)
    seen = []
    wgrad = launchers.weight_grad
    monkeypatch.setattr(launchers, "weight_grad", lambda *a: seen.append(a[4]) or wgrad(*a))
    test_triton_matches_reference(T, D, H, E, K, mode, torch.bfloat16)
    assert seen and all(c is not None and len(c) == E and sum(c) == T * K for c in seen)


def test_scatter_buffer_follows_the_option():
    # The buffer the scatter GEMMs add into: seen as the dtype the kernel's atomics add in.
    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    assert not TritonOptions().fp32_scatter and launchers.scatter_buffer(3, 4, bf16, False).dtype == torch.bfloat16
    assert TritonOptions(fp32_scatter=True).fp32_scatter
    assert launchers.scatter_buffer(3, 4, bf16, True).dtype == torch.float32
    assert launchers.scatter_buffer(3, 4, bf16, True).abs().sum() == 0
    assert launchers.scatter_buffer(3, 4, torch.zeros(1), False).dtype == torch.float32  # float32 inputs: always


def test_tile_schedule_covers_every_row_once():
    counts = torch.tensor([5, 0, 17, 1, 0, 16])
    BM = 8
    tile_expert, tile_row, expert_end = tile_schedule(counts, int(counts.sum()), BM)
    covered = []
    for e, r in zip(tile_expert.tolist(), tile_row.tolist(), strict=True):
        if e < 0:
            continue
        end = int(expert_end[e])
        assert end - int(counts[e]) <= r < end  # the tile starts inside its expert
        covered += list(range(r, min(r + BM, end)))
    assert covered == list(range(int(counts.sum())))
    assert tile_expert.numel() == -(-39 // BM) + 6


@pytest.mark.parametrize("counts,BM", [([5, 0, 17, 1, 0, 16], 8), ([0, 0, 3], 16), ([40], 16), ([0] * 20 + [1], 16),
                                       ([16, 16, 16, 16], 16)])
def test_kernel_schedule_matches_host_reference(counts, BM):
    # Each kernel program works out its own tile (kernels._tile_rows); tile_schedule is the
    # readable host version of the same rule.
    counts = torch.tensor(counts, device=DEVICE)
    N = int(counts.sum())
    tile_expert, tile_row, _ = tile_schedule(counts, N, BM)
    k_expert, k_row = device_tile_schedule(counts, N, BM)
    assert k_expert.tolist() == tile_expert.tolist()
    used = tile_expert >= 0
    assert k_row[used].tolist() == tile_row[used].tolist()
    assert (k_row[~used] == -1).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather_l,gather_r", [(True, False), (False, True), (True, True), (False, False)])
def test_wgrad_kernel_matches_per_expert_products(gather_l, gather_r, dtype):
    # Expert sizes that are not multiples of any tile, an empty expert, a single row: the
    # (bf16, CUDA) operand read through TMA runs into the next expert's rows, which the
    # other operand's masked rows must cancel.
    torch.manual_seed(0)
    counts = torch.tensor([7, 0, 133, 1, 70], device=DEVICE)
    N, T, P, Q = int(counts.sum()), 51, 24, 40
    token = torch.randint(0, T, (N,), device=DEVICE)
    lhs = torch.randn(T if gather_l else N, P, device=DEVICE, dtype=dtype)
    rhs = torch.randn(T if gather_r else N, Q, device=DEVICE, dtype=dtype)
    out = poisoned_empty(5, P, Q, dtype=dtype, device=DEVICE)
    cfg = config.kernel_configs(dtype, torch.device(DEVICE), P)["wgrad"]
    launchers.launch_wgrad(lhs, rhs, out, token, counts, gather_l=gather_l, gather_r=gather_r, cfg=cfg,
                           prec=launchers.precision(dtype))
    L = (lhs[token] if gather_l else lhs).float()
    R = (rhs[token] if gather_r else rhs).float()
    start = 0
    for e, c in enumerate(counts.tolist()):
        assert_close(f"expert {e}", L[start : start + c].t() @ R[start : start + c], out[e].float(), dtype)
        start += c


def test_h_is_x_times_w_in_in_expert_order():
    bank = ExpertBank(3, 16, 16).to(DEVICE)
    x = torch.randn(10, 16, device=DEVICE)
    r = make_routing(10, 3, 2, "random", torch.randn(10, 3)).to(DEVICE)
    _, h = moe_glu_forward(x, r.token, r.weight, r.counts, bank.w_in.detach(), bank.w_out.detach())
    starts, ends = (r.offsets - r.counts).tolist(), r.offsets.tolist()
    expected = torch.cat([x[r.token[s:e]] @ bank.w_in[i].detach().T for i, (s, e) in enumerate(zip(starts, ends, strict=True))])
    assert_close("h", expected, h)


def test_inference_forward_skips_h_and_refuses_backward():
    bank = ExpertBank(3, 16, 16).to(DEVICE)
    x = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    r = make_routing(10, 3, 2, "random", torch.randn(10, 3)).to(DEVICE)
    y_full, h = moe_glu_forward(x, r.token, r.weight, r.counts, bank.w_in, bank.w_out)
    y_inf, h_inf = moe_glu_forward(x, r.token, r.weight, r.counts, bank.w_in, bank.w_out, False)
    assert h.shape == (20, 32) and h_inf.shape == (0, 32)
    torch.testing.assert_close(y_inf, y_full)
    with pytest.raises(RuntimeError, match="need_h=True"):
        y_inf.sum().backward()
    with torch.no_grad():  # the dispatch function picks need_h=False by itself here
        assert_close("y", reference_dispatch(x, r, bank), triton_dispatch(x, r, bank))


def test_eager_path_equals_custom_op():
    # Eager mode runs an autograd.Function around the same code as the custom op that
    # torch.compile sees; outputs and every gradient must be identical.
    bank = ExpertBank(4, 16, 24).to(DEVICE)
    r = make_routing(21, 4, 2, "random", torch.randn(21, 4)).to(DEVICE)
    weight = r.weight.detach().clone()
    x = torch.randn(21, 16, device=DEVICE)
    gy = torch.randn(21, 16, device=DEVICE)
    results = []
    for fn in (moe_glu, moe_glu_forward):
        xx, ww = x.clone().requires_grad_(), weight.clone().requires_grad_()
        bank.zero_grad(set_to_none=True)
        y, _ = fn(xx, r.token, ww, r.counts, bank.w_in, bank.w_out)
        y.backward(gy)
        results.append([y.detach(), xx.grad, ww.grad, bank.w_in.grad, bank.w_out.grad])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # no Function at all here
        y, h = moe_glu(x, r.token, weight, r.counts, bank.w_in, bank.w_out)
    assert torch.equal(y, results[0][0]) and not y.requires_grad and h.shape[0] == r.token.numel()


def test_second_backward_is_refused_not_wrong():
    # The eager backward frees h as it goes (routings.assert_second_backward_refused).
    assert_second_backward_refused(triton_dispatch, ExpertBank(3, 16, 16).to(DEVICE))


def test_opcheck():
    bank = ExpertBank(3, 16, 16).to(DEVICE)
    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    logits = torch.randn(6, 3, requires_grad=True)
    r = make_routing(6, 3, 2, "random", logits).to(DEVICE)
    for need_h in (True, False):
        args = (x, r.token, r.weight, r.counts, bank.w_in, bank.w_out, need_h)
        torch.library.opcheck(moe_glu_forward, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    # With the options' values: the scatter precision as a bool, config overrides as ints.
    cfgs = config.configs_to_ints({"gemm_fwd": config.CONFIG_INTERPRETER, "wgrad": config.CONFIG_INTERPRETER})
    args = (x, r.token, r.weight, r.counts, bank.w_in, bank.w_out, True, True, cfgs)
    torch.library.opcheck(moe_glu_forward, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_fallbacks_are_correct():
    # Unsupported configurations (biases, other activations) go to the grouped backend.
    bank = ExpertBank(3, 16, 16, activation="geglu", bias=True)
    r = make_routing(8, 3, 2, "random", torch.randn(8, 3))
    x = torch.randn(8, 16)
    assert_close("y", reference_dispatch(x, r, bank), triton_dispatch(x, r, bank))


@pytest.mark.skipif(not CUDA, reason="torch.compile of Triton kernels needs CUDA")
def test_torch_compile():
    bank = ExpertBank(4, 64, 64).to("cuda", torch.bfloat16)
    r = make_routing(128, 4, 2, "random", torch.randn(128, 4)).to("cuda")
    x = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)

    def f(x, token, weight, counts, w_in, w_out):
        return moe_glu(x, token, weight, counts, w_in, w_out)[0]

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xx = x.clone().requires_grad_()
        bank.zero_grad(set_to_none=True)
        y = fn(xx, r.token, r.weight, r.counts, bank.w_in, bank.w_out)
        y.backward(gy)
        results.append((y.detach(), xx.grad, bank.w_in.grad, bank.w_out.grad))
    for name, a, b in zip(("y", "grad x", "grad w_in", "grad w_out"), *results, strict=True):
        assert_close(f"compiled {name}", a, b, torch.bfloat16)


def test_auto_picks_triton_on_cuda_only():
    from gatedmoe.dispatch import grouped_dispatch

    assert get_backend("auto", "cpu") is grouped_dispatch
    if CUDA:
        assert get_backend("auto", "cuda") is not grouped_dispatch
