"""The FP8 path of the Triton backend (`TritonOptions(fp8=FP8Recipe(...))`): kernels against
the float32 FP8 reference (`fp8_reference.py`, the same quantised arithmetic), and the whole
dispatch, outputs and every gradient, against the exact reference within FP8's rounding.

On CUDA the compiled kernels run (needs sm89+), with the CUDA cases at block 128 in bf16;
on CPU Triton's interpreter runs them (TRITON_INTERPRET=1, conftest.py) at tiny sizes with
block 16, in float32.

Tolerance against the exact reference (`_fp8_tol`). Bound (1) of `test_fp8_reference.py`
gives each quantised operand a relative error of at most u per element (u = 2^-4 for
e4m3, 2^-3 for e5m2; scales are powers of two, so the scaling itself is exact). To first
order a GEMM passes its operands' relative errors to its output with a factor that bound
(2) puts near 1 for these well-spread operands, and independent errors add in quadrature;
a quantity reached through n4 e4m3 and ng gradient-format quantisations then has a
relative error norm of about sqrt(n4 u4^2 + ng ug^2) at most. The tolerance is 1.5 times
that (the factor of bound (2): ||A||_F ||B||_2 / ||AB||_F exceeds 1, and the SwiGLU and
softmax derivatives amplify a little); measured errors are 0.45-0.75 of the unscaled
estimate (interpreter, 3 seeds). Paths: y: x, W_in, a, W_out (4, 0). dL/dx: x, W_in (h),
W_out, W_in in backward; gy, dL/dh (4, 2). dL/dweight and dL/dlogits: x, W_in (a), W_out;
gy (3, 1). dL/dW_in: x, W_in (h), W_out; gy (3, 1). dL/dW_out: x, W_in (a) (2, 0).

Tolerance of the kernels against the FP8 reference: the input dtype's table, widened in bf16
by the rounding flips that Hopper's FP8 accumulation causes (`_flip_allowance`, measured per
case), with the distance to the exact result checked beside it.
"""

import copy
import dataclasses
import math
import pickle

import pytest
import torch
from routings import make_routing

from gatedmoe import MoE
from gatedmoe.dispatch import (
    FP8Recipe,
    TritonOptions,
    get_backend,
    grouped_dispatch,
    reference_dispatch,
)
from gatedmoe.dispatch.triton import fp8_reference
from gatedmoe.dispatch.triton.config import KernelConfig
from gatedmoe.dispatch.triton.fp8_config import fp8_configs_to_ints, fp8_kernel_configs
from gatedmoe.experts import ExpertBank
from helpers import TOLERANCES, assert_close, poisoned_empty

pytest.importorskip("triton")
from gatedmoe.dispatch.triton import fp8_ops, launchers, triton_dispatch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 tensor cores need compute capability >= 8.9", allow_module_level=True)
BLOCK = 128 if CUDA else 16

U = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}
# (e4m3 quantisations, gradient-format quantisations) on each output's path (module docstring).
PATHS = {"y": (4, 0), "x": (4, 2), "weight": (3, 1), "logits": (3, 1), "w_in": (3, 1), "w_out": (2, 0)}


def _fp8_tol(name: str, grad_format: str) -> float:
    n4, ng = PATHS[name]
    return 1.5 * math.sqrt(n4 * U["e4m3"] ** 2 + ng * U[grad_format] ** 2)


@pytest.fixture(autouse=True)
def _poison_kernel_buffers(monkeypatch):
    """Every buffer a kernel must fill starts as NaN, so an unwritten element fails loudly."""
    monkeypatch.setattr(launchers, "alloc", lambda *shape, device, dtype: poisoned_empty(*shape, dtype=dtype, device=device))


@pytest.fixture(autouse=True)
def _device():
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")


def _hard_values(R: int, C: int) -> torch.Tensor:
    """Rows that exercise the rounding: magnitudes 1e-8..1e8 across rows, a ten-thousandfold
    outlier, a zero row, values just below a power of two (the rounding carries into the
    exponent), ties, and values far below the tile's largest (FP8 subnormals)."""
    x = torch.randn(R, C) * torch.logspace(-8, 8, R)[:, None]
    x[1, 3] = 1e4 * x[1].abs().max()
    x[2] = 0
    x[3, :8] = torch.tensor([448.0, 127.9, -7.96, 240.0 * 1.03125, 1e-3, 3e-5, -2e-6, 0.0])  # 1.03125: a tie
    return x


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("group", [BLOCK, None])
def test_quantize_rows_matches_reference_bit_for_bit(fmt, group):
    x = _hard_values(37, 3 * BLOCK - 8).to(DEVICE)
    fast_q, fast_s = fp8_ops.quantize_rows(x, fmt, group)
    ref_q, ref_s = fp8_reference.quantize_rows(x, fmt, group)
    assert_close("q", ref_q.view(torch.uint8), fast_q.view(torch.uint8))
    assert_close("s", ref_s, fast_s, torch.float64)  # powers of two: exact


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("N", [1, 37])
def test_fp8_swiglu_bwd_matches_unfused_swiglu_bwd_and_quantize_rows(fmt, N):
    """The blockwise backward's fused kernel alone: dL/dh, weight * a (over ga) and dL/dweight
    as the SwiGLU backward without FP8 computes them; dL/dh's FP8 tiles and scales bit for
    bit as `quantize_rows` makes them from that dL/dh (a zero row: all-zero tiles)."""
    H = 2 * BLOCK
    ga = (torch.randn(N, H) * torch.logspace(-3, 3, N)[:, None]).to(DTYPE)
    ga[N // 2] = 0
    h = (3 * torch.randn(N, 2 * H)).to(DTYPE)
    weight = torch.rand(N)
    fast_wa, ref_wa = ga.clone(), ga.clone()
    fast_gh, fast_gw, fast_q, fast_s = fp8_ops.fp8_swiglu_bwd(fast_wa, h, weight, fmt, BLOCK)
    ref_gh = launchers.alloc(N, 2 * H, device=DEVICE, dtype=DTYPE)
    ref_gw = launchers.alloc(N, device=DEVICE, dtype=torch.float32)
    launchers.launch_swiglu_bwd(ref_wa, h, weight, ref_gh, ref_wa, ref_gw, N, H)
    assert_close("gh", ref_gh, fast_gh)
    assert_close("wa", ref_wa, fast_wa)
    assert_close("gweight", ref_gw, fast_gw)
    ref_q, ref_s = fp8_reference.quantize_rows(fast_gh, fmt, BLOCK)
    assert_close("ghq", ref_q.view(torch.uint8), fast_q.view(torch.uint8))
    assert_close("ghs", ref_s, fast_s, torch.float64)


@pytest.mark.parametrize("scaling,D,H", [("blockwise", 2 * BLOCK, 2 * BLOCK), ("rowwise", 2 * BLOCK, 2 * BLOCK),
                                         ("rowwise", 3 * BLOCK - 8, 2 * BLOCK + 8)])
@pytest.mark.parametrize("grad_format", ["e4m3", "e5m2"])
def test_fp8_data_gradient_gemms_match_dequantised_products(scaling, D, H, grad_format):
    """The backward's two FP8 GEMMs alone, with the default configs (TMA where it applies;
    widths that are not multiples of the block: pointer loads for ga, a TMA reduction with a
    partial last step for dL/dx): ``ga = gy[token] @ W_out[e]`` stored per row and
    ``dL/dx[token] += dL/dh @ W_in[e]`` scattered, against float32 products of the same
    dequantised operands."""
    T, E, K = 21, 4, 2
    recipe = FP8Recipe(scaling=scaling, grad_format=grad_format, block=BLOCK)
    blockwise, group = scaling == "blockwise", BLOCK if scaling == "blockwise" else None
    bank, x, _, gy, routing = _inputs(T, D, H, E, K, "random", DTYPE)
    token, counts, weight = routing.token, routing.counts, routing.weight.detach()
    N = token.numel()
    cfg = fp8_kernel_configs(torch.device(DEVICE), BLOCK, scaling)["fp8_gemm"]
    w_in = fp8_ops.quantize_weight(bank.w_in.detach(), recipe, transpose=True)
    w_out = fp8_ops.quantize_weight(bank.w_out.detach(), recipe, transpose=True)
    gyq, gys = fp8_ops.quantize_rows(gy, grad_format, group)
    ref_ga = fp8_reference._per_expert(fp8_reference.dequantize_rows(gyq, gys, group)[token],
                                       fp8_reference._weight(bank.w_out.detach().transpose(1, 2), recipe), counts)
    # ga from a pre-gathered copy of the rows (read in order, through TMA where it applies),
    # then with the rows gathered in the loads (the backward's form): on the H200 the gathered
    # blockwise form returned NaN columns (README, 'FP8'); the pair tells the two apart.
    for gathered in (False, True):
        fast_ga = launchers.alloc(N, H, device=DEVICE, dtype=DTYPE)
        rows_q, rows_s = (gyq, gys) if gathered else (gyq[token].contiguous(), gys[token].contiguous())
        fp8_ops._launch_gemm(rows_q, rows_s, w_out.qt, w_out.st, w_out.WB, fast_ga, token, weight, counts, N, D, H,
                             gather=gathered, scale=False, scatter=False, cfg=cfg, blockwise=blockwise)
        assert_close(f"ga ({'rows gathered in the loads' if gathered else 'pre-gathered rows'})", ref_ga.to(DTYPE),
                     fast_ga)
    gh = (torch.randn(N, 2 * H) * torch.logspace(-2, 2, 2 * H)[torch.randperm(2 * H)]).to(DTYPE)
    ghq, ghs = fp8_ops.quantize_rows(gh, grad_format, group)
    fast_gx = torch.zeros(T, D, dtype=torch.float32)
    fp8_ops._launch_gemm(ghq, ghs, w_in.qt, w_in.st, w_in.WB, fast_gx, token, weight, counts, N, 2 * H, D,
                         gather=False, scale=False, scatter=True, cfg=cfg, blockwise=blockwise)
    rows = fp8_reference._per_expert(fp8_reference.dequantize_rows(ghq, ghs, group),
                                     fp8_reference._weight(bank.w_in.detach().transpose(1, 2), recipe), counts)
    # DTYPE's table: on sm90 each 128-deep FP8 product accumulates in reduced precision.
    assert_close("gx", torch.zeros(T, D).index_add_(0, token, rows), fast_gx, DTYPE)


@pytest.mark.parametrize("scaling", ["blockwise", "rowwise"])
def test_quantized_weight_matches_reference_bit_for_bit(scaling):
    recipe = FP8Recipe(scaling=scaling, block=BLOCK)
    w = torch.randn(3, 2 * BLOCK + 8, BLOCK + 24, device=DEVICE)
    w[1, :BLOCK, :BLOCK] *= 1e3
    w[2, 5] = 0  # a zero row and a zero column: the smallest scale
    w[2, :, 7] = 0
    block = BLOCK if scaling == "blockwise" else None
    fast = fp8_ops.quantized_weight(w, recipe, transpose=True)
    ref_q, ref_s = fp8_reference.quantize_blocks(w, "e4m3", block)
    ref_qt, ref_st = fp8_reference.quantize_blocks(w.transpose(1, 2), "e4m3", block)
    assert_close("q", ref_q.view(torch.uint8), fast.q.view(torch.uint8))
    assert_close("s", ref_s, fast.s, torch.float64)
    assert_close("qt", ref_qt.view(torch.uint8), fast.qt.view(torch.uint8))
    assert_close("st", ref_st, fast.st, torch.float64)


def test_weight_quantised_once_per_step(monkeypatch):
    """Cached on the parameter: reused until an in-place update bumps its version."""
    calls = []
    real = fp8_ops.quantize_weight
    monkeypatch.setattr(fp8_ops, "quantize_weight", lambda *a: calls.append(a[0].shape) or real(*a))
    recipe = FP8Recipe(scaling="blockwise", block=BLOCK)
    w = torch.nn.Parameter(torch.randn(2, 2 * BLOCK, BLOCK, device=DEVICE))
    first = fp8_ops.quantized_weight(w, recipe, transpose=True)
    assert fp8_ops.quantized_weight(w, recipe, transpose=True) is first
    assert fp8_ops.quantized_weight(w, recipe, transpose=False) is first  # the cached copy has both
    assert len(calls) == 1
    with torch.no_grad():
        w.mul_(2)  # an optimizer step
    again = fp8_ops.quantized_weight(w, recipe, transpose=True)
    assert len(calls) == 2 and again is not first
    assert torch.equal(again.s, 2 * first.s)
    fp8_ops.quantized_weight(w, FP8Recipe(scaling="rowwise", block=BLOCK), transpose=True)
    assert len(calls) == 3  # another recipe is another quantisation
    # Saved or copied parameters carry no FP8 copies; a copy quantises its own.
    plain = torch.nn.Parameter(w.detach().clone())
    assert len(pickle.dumps(w)) < len(pickle.dumps(plain)) + 512
    twin = copy.deepcopy(w)
    fp8_ops.quantized_weight(twin, recipe, transpose=True)
    assert len(calls) == 4


# (T, D, H, E, K, mode, scaling, grad_format): T=1, T not a multiple of the row tile, empty
# experts, every row on one expert (k=1, "one_expert"), k = 3, both recipes and formats.
CASES = [
    (1, 2 * BLOCK, BLOCK, 3, 1, "random", "blockwise", "e4m3"),
    (21, 3 * BLOCK, 2 * BLOCK, 4, 2, "random", "blockwise", "e5m2"),
    (33, 2 * BLOCK, BLOCK, 6, 3, "skip_experts", "rowwise", "e4m3"),
    (40, 2 * BLOCK, 2 * BLOCK, 4, 1, "one_expert", "blockwise", "e4m3"),
    (21, 3 * BLOCK - 8, 2 * BLOCK + 8, 4, 2, "random", "rowwise", "e5m2"),  # rowwise takes any width
]
if CUDA:
    CASES += [(1000, 1024, 768, 8, 2, "random", "blockwise", "e4m3"),
              (517, 512, 256, 16, 6, "skip_experts", "rowwise", "e5m2")]
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _inputs(T, D, H, E, K, mode, dtype):
    torch.manual_seed(0)
    bank = ExpertBank(E, D, H)  # float32 master weights
    with torch.no_grad():  # weight blocks of different magnitudes too: each block's own scale matters
        for w in (bank.w_in, bank.w_out):
            w.mul_(torch.logspace(-0.5, 0.5, w.shape[1])[torch.randperm(w.shape[1])][:, None])
            w.mul_(torch.logspace(-0.5, 0.5, w.shape[2])[torch.randperm(w.shape[2])])
    # Columns of very different magnitudes, so that per-tile and per-row scales differ.
    x = (torch.randn(T, D) * torch.logspace(-1, 1, D)[torch.randperm(D)]).to(dtype)
    logits = torch.randn(T, E)
    gy = torch.randn(T, D).to(dtype)
    torch.manual_seed(7)
    routing = make_routing(T, E, K, mode, logits)
    return bank, x, logits, gy, routing


def _exact(x, token, weight, counts, w_in, w_out, gy) -> list[torch.Tensor]:
    """``[y, dL/dx, dL/dweight, dL/dW_in, dL/dW_out]`` without FP8, in float64: the plain loop."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, w_in, w_out)]
    xs, H, rows, start = leaves[0][token], w_out.shape[-1], [], 0
    for e, n in enumerate(counts.tolist()):
        h = xs[start:start + n] @ leaves[2][e].T
        rows.append((torch.nn.functional.silu(h[:, :H]) * h[:, H:]) @ leaves[3][e].T)
        start += n
    y = torch.zeros(x.shape, dtype=torch.float64).index_add(0, token, torch.cat(rows) * leaves[1][:, None])
    return [y.detach(), *torch.autograd.grad(y, leaves, gy.double())]


def _flip_allowance(fast_h: torch.Tensor, ref_h: torch.Tensor, fmt: str) -> float:
    """Relative error norm that rounding flips of a 16-bit h can add after an FP8 quantisation.

    Hopper's FP8 tensor cores accumulate with fewer bits than float32 between the kernels'
    promotions (every BK products, ``max_num_imprecise_acc``), so h and ga = gy W_out, stored
    in bf16, round differently from the float32-accumulated reference in a few percent of
    elements (8.7% of h at T=21 D=376 H=264 on an H200; a float32 h differs from the reference
    in its last bits only, far below any FP8 rounding step, and the kernels then agree to
    1.5e-3). An element that differs can land on the other side of an FP8 rounding boundary
    when a (e4m3) or dL/dh (the gradient format) is quantised, which moves it by one FP8 step,
    2u relative; for a fraction p of flipped elements that is about 2u sqrt(p) of the norm.
    (The flips of ga are as frequent as those of h: 5.5% in the same case.)
    """
    if fast_h.dtype == torch.float32:
        return 0.0
    p = (fast_h != ref_h).float().mean().item()
    return 2 * U[fmt] * math.sqrt(p)


@pytest.mark.parametrize("T,D,H,E,K,mode,scaling,grad_format", CASES)
def test_fp8_kernels_match_fp8_reference(T, D, H, E, K, mode, scaling, grad_format, configs=None):
    """Same quantised arithmetic: equal up to float32 summation order and, in bf16, the
    flips that Hopper's FP8 accumulation causes in the rounding of h and ga (`_flip_allowance`),
    and no farther from the exact (unquantised) result than the FP8 reference is. The
    weights go through TMA (the default configs, in the interpreter too)."""
    recipe = FP8Recipe(scaling=scaling, grad_format=grad_format, block=BLOCK)
    bank, x, _, gy, routing = _inputs(T, D, H, E, K, mode, DTYPE)
    token, counts, weight = routing.token, routing.counts, routing.weight.detach()
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_(), bank.w_in, bank.w_out]
    fast_y = fp8_ops.moe_glu_fp8(leaves[0], token, leaves[1], counts, bank.w_in, bank.w_out, recipe, configs=configs)
    fast_g = torch.autograd.grad(fast_y, leaves, gy)
    w_in, w_out = bank.w_in.detach(), bank.w_out.detach()
    ref_y, ref_h = fp8_reference.fp8_moe_forward(x, token, weight, counts, w_in, w_out, recipe)
    ref_g = fp8_reference.fp8_moe_backward(gy, x, token, weight, counts, w_in, w_out, ref_h, recipe)
    _, fast_h = fp8_ops._fp8_forward(x, token, weight, counts, w_in, w_out, True, recipe, False, configs)
    tol = TOLERANCES[torch.bfloat16]["rel_norm"] if DTYPE == torch.bfloat16 else None
    # Which quantisation follows a rounded h / ga on each output's path (module docstring).
    flips = {"y": _flip_allowance(fast_h, ref_h, "e4m3"), "x": _flip_allowance(fast_h, ref_h, grad_format)}
    exact = _exact(x, token, weight, counts, w_in, w_out, gy)
    names = ["y", "x", "weight", "w_in", "w_out"]
    for name, ref, fast, ex in zip(names, [ref_y, *ref_g], [fast_y, *fast_g], exact, strict=True):
        # The weight gradients come back in the parameters' float32 from the input dtype's products.
        scale = 1.0 + flips.get(name, 0.0) / tol if tol else 1.0
        assert_close(name if name == "y" else f"grad {name}", ref, fast, DTYPE, scale=scale)
        fast_err = (fast.double() - ex).norm() / ex.norm()
        ref_err = (ref.double() - ex).norm() / ex.norm()
        assert fast_err <= 1.1 * ref_err + 1e-3, f"{name}: {fast_err:.3e} from exact, the FP8 reference {ref_err:.3e}"


@pytest.mark.parametrize("scaling", ["blockwise", "rowwise"])
def test_fp8_forward_keeps_h_for_backward(scaling):
    """The h the first GEMM's epilogue stores for backward (y is checked elsewhere; a wrong h
    shows only in the gradients)."""
    recipe = FP8Recipe(scaling=scaling, block=BLOCK)
    bank, x, _, _, routing = _inputs(37, 2 * BLOCK, 2 * BLOCK, 4, 2, "random", DTYPE)
    w_in, w_out = bank.w_in.detach(), bank.w_out.detach()
    args = (x, routing.token, routing.weight.detach(), routing.counts, w_in, w_out)
    fast_y, fast_h = fp8_ops._fp8_forward(*args, True, recipe, False, None)
    ref_y, ref_h = fp8_reference.fp8_moe_forward(*args, recipe)
    assert_close("h", ref_h, fast_h)
    assert_close("y", ref_y, fast_y)


@pytest.mark.parametrize("scaling", ["blockwise", "rowwise"])
def test_weights_by_pointer_loads_match_fp8_reference(scaling):
    """The same kernels with the weights read by pointer loads (configs with ``tma=False``)."""
    cfgs = fp8_kernel_configs(torch.device(DEVICE), BLOCK, scaling)
    configs = {name: dataclasses.replace(cfg, tma=False) for name, cfg in cfgs.items()}
    test_fp8_kernels_match_fp8_reference(21, 2 * BLOCK, 2 * BLOCK, 4, 2, "skip_experts", scaling, "e4m3", configs)


def test_fp8_config_overrides_are_checked():
    with pytest.raises(ValueError, match=r"configs\['fp8_gemm'\]: the FP8 kernels read gathered rows directly"):
        fp8_kernel_configs(torch.device(DEVICE), BLOCK, "rowwise", {"fp8_gemm": KernelConfig(16, 16, BLOCK, 4, 1, pregather=True)})
    bad = {"fp8_gemm": KernelConfig(16, 16, 2 * BLOCK, 4, 1)}
    with pytest.raises(ValueError, match=r"configs\['fp8_gemm'\]: each reduction step must be one scale block"):
        fp8_kernel_configs(torch.device(DEVICE), BLOCK, "blockwise", bad)
    assert fp8_kernel_configs(torch.device(DEVICE), BLOCK, "rowwise", bad)["fp8_gemm"] == bad["fp8_gemm"]


DISPATCH_CASES = [(37, 2 * BLOCK, BLOCK, 4, 2, "random", "e4m3"),
                  (20, 2 * BLOCK, 3 * BLOCK, 5, 1, "one_expert", "e5m2")]
if CUDA:
    DISPATCH_CASES += [(2048, 1024, 512, 8, 2, "random", "e4m3"), (2048, 1024, 512, 8, 2, "random", "e5m2")]


@pytest.mark.parametrize("scaling", ["rowwise", "blockwise"])
@pytest.mark.parametrize("T,D,H,E,K,mode,grad_format", DISPATCH_CASES)
def test_fp8_dispatch_within_fp8_rounding_of_reference(T, D, H, E, K, mode, grad_format, scaling):
    bank, x, logits, gy, _ = _inputs(T, D, H, E, K, mode, DTYPE)
    options = TritonOptions(fp8=FP8Recipe(scaling=scaling, grad_format=grad_format, block=BLOCK))

    def run(fn):
        xl = x.detach().clone().requires_grad_()
        lg = logits.detach().clone().requires_grad_()
        torch.manual_seed(7)
        routing = make_routing(T, E, K, mode, lg)
        bank.zero_grad(set_to_none=True)
        y = fn(xl, routing, bank)
        y.backward(gy.float())
        return y.detach(), {"x": xl.grad, "logits": lg.grad, "w_in": bank.w_in.grad, "w_out": bank.w_out.grad}

    # The exact side in float32 throughout (x upcast; the bank is float32).
    ref_y, ref_g = run(lambda xl, r, b: reference_dispatch(xl.float(), r, b))
    fast_y, fast_g = run(lambda xl, r, b: triton_dispatch(xl, r, b, options=options))
    errors = {"y": (ref_y, fast_y), **{n: (ref_g[n], fast_g[n]) for n in ref_g}}
    for name, (ref, fast) in errors.items():
        # bf16's table compares relative error norms; scaled to the FP8 bound (module docstring).
        assert_close(name, ref.float(), fast.float(), torch.bfloat16, scale=_fp8_tol(name, grad_format) / 1.5e-2)
        # ... and not exact: the FP8 path did run.
        assert (fast.double() - ref.double()).norm() > 1e-3 * ref.double().norm()


# A fused optimizer writes the parameters without bumping their version counters: the step
# itself must retire the FP8 copies.
@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.SGD(ps, lr=0.1),
                                      lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True)], ids=["sgd", "adamw_fused"])
def test_layer_trains_with_fp8_and_requantises_after_a_step(monkeypatch, make_opt):
    calls = []
    real = fp8_ops.quantize_weight
    monkeypatch.setattr(fp8_ops, "quantize_weight", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    moe = MoE(2 * BLOCK, 4, BLOCK, k=2, backend="triton", backend_options=TritonOptions(fp8=FP8Recipe(block=BLOCK)))
    opt = make_opt(moe.parameters())
    x = torch.randn(8, 2 * BLOCK)
    for step in range(2):
        for _micro in range(2):  # gradient accumulation: the same quantised weights
            moe(x).float().square().mean().backward()
        assert len(calls) == 2 * (step + 1)
        assert all(torch.isfinite(p.grad).all() for p in moe.experts.parameters())
        opt.step()
        opt.zero_grad()


def test_grouped_backend_refuses_fp8():
    bank, x, logits, _, routing = _inputs(5, 2 * BLOCK, BLOCK, 3, 1, "random", torch.float32)
    torch.set_default_device("cpu")
    bank, x, routing = bank.cpu(), x.cpu(), make_routing(5, 3, 1, "random", logits.cpu())
    with pytest.raises(ValueError, match="grouped backend has no FP8 path"):
        grouped_dispatch(x, routing, bank, TritonOptions(fp8=FP8Recipe()))
    # "auto" on CPU resolves to grouped: the option still is not dropped silently.
    with pytest.raises(ValueError, match="fp8"):
        get_backend("auto", "cpu")(x, routing, bank, options=TritonOptions(fp8=FP8Recipe()))


def test_blockwise_needs_widths_that_are_multiples_of_the_block():
    bank, x, _, _, routing = _inputs(5, BLOCK + 8, BLOCK, 3, 1, "random", DTYPE)
    with pytest.raises(ValueError, match=f"multiples of block={BLOCK}"):
        triton_dispatch(x, routing, bank, options=TritonOptions(fp8=FP8Recipe(scaling="blockwise", block=BLOCK)))
    # The default recipe (rowwise) takes any width.
    assert triton_dispatch(x, routing, bank, options=TritonOptions(fp8=FP8Recipe(block=BLOCK))).shape == x.shape


def test_lora_adapters_refuse_fp8():
    bank, x, _, _, routing = _inputs(5, 2 * BLOCK, BLOCK, 3, 1, "random", DTYPE)
    bank.add_lora(4)
    with pytest.raises(ValueError, match="no LoRA adapter term"):
        get_backend("triton", DEVICE)(x, routing, bank, options=TritonOptions(fp8=FP8Recipe(block=BLOCK)))


def test_unsupported_expert_kind_refuses_instead_of_falling_back():
    bank = ExpertBank(3, 2 * BLOCK, BLOCK, activation="gelu")
    x = torch.randn(5, 2 * BLOCK)
    routing = make_routing(5, 3, 1, "random", torch.randn(5, 3))
    with pytest.raises(ValueError, match="fused Triton kernels only"):
        triton_dispatch(x, routing, bank, options=TritonOptions(fp8=FP8Recipe(block=BLOCK)))


def test_opcheck():
    bank, x, logits, _, routing = _inputs(6, 2 * BLOCK, BLOCK, 3, 2, "random", DTYPE)
    x.requires_grad_()
    r = routing
    for recipe in (FP8Recipe(block=BLOCK), FP8Recipe(block=BLOCK, scaling="rowwise")):
        cfgs = fp8_configs_to_ints({"fp8_gemm": fp8_kernel_configs(torch.device(DEVICE), BLOCK)["fp8_gemm"]})
        args = (x, r.token, r.weight, r.counts, bank.w_in, bank.w_out, recipe.scaling, recipe.grad_format,
                recipe.block, False, cfgs)
        torch.library.opcheck(fp8_ops.moe_glu_fp8_forward, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(not CUDA, reason="torch.compile of Triton kernels needs CUDA")
def test_torch_compile_matches_eager():
    bank, x, _, gy, r = _inputs(256, 2 * BLOCK, BLOCK, 4, 2, "random", DTYPE)
    recipe = FP8Recipe(block=BLOCK)

    def f(x, token, weight, counts, w_in, w_out):
        return fp8_ops.moe_glu_fp8(x, token, weight, counts, w_in, w_out, recipe)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xx = x.clone().requires_grad_()
        bank.zero_grad(set_to_none=True)
        y = fn(xx, r.token, r.weight, r.counts, bank.w_in, bank.w_out)
        y.backward(gy)
        results.append([y, xx.grad, bank.w_in.grad, bank.w_out.grad])
    for name, eager, compiled in zip(["y", "x", "w_in", "w_out"], *results, strict=True):
        assert_close(name, eager.float(), compiled.float(), DTYPE)
