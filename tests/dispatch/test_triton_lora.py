"""LoRA adapters fused into the Triton backend (`dispatch/triton/lora_ops.py`) against the
reference dispatch (which adds ``s B_e A_e`` to each weight): outputs and every gradient
(input, routing weights, the four adapter factors; the base weights when they train), on
awkward shapes; each launcher against its plain PyTorch version (`lora_reference.py`).

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, conftest.py) at tiny
sizes in float32; on CUDA the same tests run compiled, plus bf16 and larger shapes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from routings import assert_second_backward_refused, make_routing, run_with_grads

from gatedmoe import MoE
from gatedmoe.dispatch import TritonOptions, get_backend, grouped_dispatch, reference_dispatch
from gatedmoe.dispatch.triton.config import CONFIG_INTERPRETER, KernelConfig
from gatedmoe.experts import ExpertBank
from helpers import assert_close, poisoned_empty

pytest.importorskip("triton")
from gatedmoe.dispatch.triton import launchers, lora_ops, lora_reference, triton_dispatch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
# (T, D, H, E, K, mode, R): T=1; rows not a multiple of the 16-row tile and a rank above the
# interpreter's 16-rank block (two rounds of the rank loop); experts without rows; one expert
# with every row; k = E; a rank of 1.
CASES = [
    (1, 16, 16, 3, 1, "random", 4),
    (63, 24, 40, 5, 2, "random", 20),
    (33, 16, 24, 6, 3, "skip_experts", 8),
    (40, 32, 16, 4, 1, "one_expert", 3),
    (17, 16, 16, 3, 3, "all", 1),
]
if CUDA:
    CASES += [(1000, 264, 328, 8, 2, "random", 16), (517, 128, 96, 16, 6, "skip_experts", 64),
              (300, 128, 64, 4, 2, "one_expert", 72)]


@pytest.fixture(autouse=True)
def _poison_kernel_buffers(monkeypatch):
    """Every buffer a kernel must fill starts as NaN, so an unwritten element fails loudly."""
    monkeypatch.setattr(launchers, "alloc", lambda *shape, device, dtype: poisoned_empty(*shape, dtype=dtype, device=device))


def _bank(E, D, H, R, dtype, freeze_base=True) -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(E, D, H)
    lora = bank.add_lora(R, alpha=2.0 * R, freeze_base=freeze_base)
    with torch.no_grad():  # B starts at zero, which would hide a wrong product; 0.1: a trained adapter's size
        lora.B_in.normal_(std=0.1)
        lora.B_out.normal_(std=0.1)
    return bank.to(DEVICE, dtype)


def _compare(T, D, H, E, K, mode, R, dtype, *, options=None, freeze_base=True, x_grad=True):
    bank = _bank(E, D, H, R, dtype, freeze_base)
    x = torch.randn(T, D, dtype=dtype, device=DEVICE)
    logits, gy = torch.randn(T, E), torch.randn(T, D, dtype=dtype, device=DEVICE)
    ref_y, ref_g = run_with_grads(reference_dispatch, bank, x, logits, T, E, K, mode, gy, x_grad=x_grad)

    def fast_fn(x, routing, bank):
        return triton_dispatch(x, routing, bank, options=options)

    fast_y, fast_g = run_with_grads(fast_fn, bank, x, logits, T, E, K, mode, gy, x_grad=x_grad)
    assert_close("y", ref_y, fast_y, dtype)
    assert sorted(ref_g) == sorted(fast_g)
    # A weight gradient sums over all of its expert's rows, in another order than the
    # reference: float32 rounding grows about as the root of the rows summed (600 rows of one
    # expert on the H200: 2.8e-5 against the table's 2e-5).
    wscale = max(1.0, (T * K / 256) ** 0.5) if dtype == torch.float32 else 1.0
    for name in ref_g:
        assert (ref_g[name] is None) == (fast_g[name] is None), name
        if ref_g[name] is not None:
            assert_close(f"grad {name}", ref_g[name], fast_g[name], dtype, wscale if name not in ("x", "logits") else 1.0)
    return fast_g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,H,E,K,mode,R", CASES)
def test_triton_lora_matches_reference(T, D, H, E, K, mode, R, dtype):
    grads = _compare(T, D, H, E, K, mode, R, dtype)
    assert sorted(grads) == ["logits", "lora.A_in", "lora.A_out", "lora.B_in", "lora.B_out", "x"]


@pytest.mark.parametrize("T,D,H,E,K,mode,R", [(33, 16, 24, 6, 3, "skip_experts", 20)])
def test_trainable_base_weights_match_reference(T, D, H, E, K, mode, R):
    # add_lora(freeze_base=False): the base weights train beside the adapters.
    grads = _compare(T, D, H, E, K, mode, R, torch.float32, freeze_base=False)
    assert "w_in" in grads and "w_out" in grads


def test_frozen_base_computes_no_base_weight_gradient(monkeypatch):
    # The base weights' gradients are the largest products of a backward: with the base
    # frozen they must not run at all, and an input without requires_grad gets no dL/dx.
    def refuse(*args, **kwargs):
        raise AssertionError("a base weight gradient was computed for a frozen base")

    monkeypatch.setattr(launchers, "weight_grad", refuse)
    grads = _compare(33, 16, 24, 6, 3, "skip_experts", 8, torch.float32, x_grad=False)
    assert grads["x"] is None


# Pointer loads everywhere: the interpreter otherwise reads the weights (and ungathered rows)
# through TMA descriptors wherever the widths allow (`lora_ops._tma_ok`).
NO_TMA = {k: replace(CONFIG_INTERPRETER, tma=False) for k in ("glu_fwd", "gemm_fwd", "glu_bwd", "gemm_bwd")}
# x and gy gathered into a copy first (on CUDA the rule for wide experts), read through TMA.
PREGATHER = {k: replace(CONFIG_INTERPRETER, pregather=True) for k in ("glu_fwd", "glu_bwd")}


@pytest.mark.parametrize("options", [TritonOptions(fp32_scatter=True),
                                     TritonOptions(configs={"gemm_fwd": KernelConfig(16, 32, 16, 4, 1, group_m=1),
                                                            "glu_fwd": KernelConfig(32, 16, 32, 4, 1),
                                                            "wgrad": KernelConfig(32, 16, 16, 4, 1)}),
                                     TritonOptions(configs=NO_TMA),
                                     TritonOptions(configs=PREGATHER)])
def test_triton_lora_with_options_matches_reference(options):
    _compare(33, 16, 24, 6, 3, "skip_experts", 20, torch.bfloat16 if CUDA else torch.float32, options=options)


def test_inference_matches_reference_and_merged_bank():
    bank = _bank(5, 24, 40, 6, torch.float32)
    x = torch.randn(30, 24, device=DEVICE)
    r = make_routing(30, 5, 2, "random", torch.randn(30, 5)).to(DEVICE)
    with torch.no_grad():
        fast = triton_dispatch(x, r, bank)
        assert_close("y", reference_dispatch(x, r, bank), fast)
        bank.merge_lora()  # the plain kernels on W + s B A
        assert_close("merged y", fast, triton_dispatch(x, r, bank))


def test_layer_uses_the_fused_path_and_trains_adapters_only(monkeypatch):
    calls = []
    fused = lora_ops.moe_glu_lora
    monkeypatch.setattr(lora_ops, "moe_glu_lora", lambda *a: calls.append(1) or fused(*a))
    torch.manual_seed(0)
    moe = MoE(16, 4, 24, k=2, backend="triton").to(DEVICE)
    moe.experts.add_lora(4)
    with torch.no_grad():
        moe.experts.lora.B_in.normal_(std=0.1)
    x = torch.randn(12, 16, device=DEVICE)
    y = moe(x)
    routing = moe.last_routing
    assert_close("y", grouped_dispatch(x, routing, moe.experts).detach(), y.detach())
    y.square().mean().backward()
    assert calls == [1]
    assert all((p.grad is not None) == n.startswith("lora.") for n, p in moe.experts.named_parameters())


def test_second_backward_is_refused_not_wrong():
    assert_second_backward_refused(triton_dispatch, _bank(3, 16, 16, 4, torch.float32))


def _op_args(T=21, D=16, H=24, E=4, R=5, mode="skip_experts"):
    bank = _bank(E, D, H, R, torch.float32, freeze_base=False)
    r = make_routing(T, E, 2, mode, torch.randn(T, E)).to(DEVICE)
    L = bank.lora
    return bank, r, (torch.randn(T, D, device=DEVICE), r.token, r.weight.detach().clone(), r.counts, bank.w_in,
                     bank.w_out, L.A_in, L.B_in, L.A_out, L.B_out, L.scale)


def test_eager_path_equals_custom_op():
    # Eager mode runs an autograd.Function around the same code as the custom ops that
    # torch.compile sees: outputs and every gradient identical (base weights training too).
    bank, r, args = _op_args()
    gy = torch.randn_like(args[0])
    results = []
    for fn in (lora_ops.moe_glu_lora, lambda *a: lora_ops.moe_glu_lora_forward(*a)[0]):
        x, w = args[0].clone().requires_grad_(), args[2].clone().requires_grad_()
        bank.zero_grad(set_to_none=True)
        fn(x, args[1], w, *args[3:]).backward(gy)
        results.append([x.grad, w.grad, *(p.grad for p in bank.parameters())])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_opcheck():
    _, _, args = _op_args()
    x = args[0].requires_grad_()
    for need_h in (True, False):
        torch.library.opcheck(lora_ops.moe_glu_lora_forward, (x, *args[1:], need_h),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    cfgs = lora_ops.config.configs_to_ints({"gemm_fwd": CONFIG_INTERPRETER})
    torch.library.opcheck(lora_ops.moe_glu_lora_forward, (x, *args[1:], True, True, cfgs),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(not CUDA, reason="torch.compile of Triton kernels needs CUDA")
def test_torch_compile():
    bank, r, args = _op_args(T=128, D=64, H=64, R=8, mode="random")
    bank.to(torch.bfloat16)
    L = bank.lora
    x = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn_like(x)

    def f(x):
        return lora_ops.moe_glu_lora(x, r.token, r.weight, r.counts, bank.w_in, bank.w_out, L.A_in, L.B_in,
                                     L.A_out, L.B_out, L.scale)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xx = x.clone().requires_grad_()
        bank.zero_grad(set_to_none=True)
        fn(xx).backward(gy)
        results.append([xx.grad, *(p.grad for p in bank.parameters())])
    for a, b in zip(*results, strict=True):
        assert_close("compiled grad", a, b, torch.bfloat16)


# ------------------------------------------------------------------- launchers vs their references
def _rows(T, E, K, mode):
    r = make_routing(T, E, K, mode, torch.randn(T, E)).to(DEVICE)
    return r.token, r.weight.detach(), r.counts


@pytest.mark.parametrize("T,E,K,mode", [(63, 5, 2, "random"), (33, 6, 3, "skip_experts"), (40, 4, 1, "one_expert")])
@pytest.mark.parametrize("store_h,tma,gathered", [(True, True, False), (False, True, False), (True, False, False),
                                                   (True, True, True)])
def test_glu_fwd_launcher_matches_reference(T, E, K, mode, store_h, tma, gathered):
    if gathered and CUDA:
        pytest.skip("gathered rows are read through TMA, on CUDA 16-bit only (the float32 test runs interpreted)")
    D, H, R = 24, 40, 20
    token, _, counts = _rows(T, E, K, mode)
    N = token.numel()
    x = torch.randn(T, D, device=DEVICE)
    w_in, b_in = torch.randn(E, 2 * H, D, device=DEVICE), torch.randn(E, 2 * H, R, device=DEVICE)
    z = torch.randn(N, R, device=DEVICE)
    outs = []
    for launch in (lora_reference.lora_glu_fwd, lora_ops.launch_lora_glu_fwd):
        h = launchers.alloc(N if store_h else 0, 2 * H, device=x.device, dtype=x.dtype)
        a = launchers.alloc(N, H, device=x.device, dtype=x.dtype)
        launch(x[token] if gathered else x, token, w_in, z, b_in, h, a, counts, N, D, H, R,
               replace(CONFIG_INTERPRETER, tma=tma), "ieee", gathered=gathered, store_h=store_h)
        outs.append((h, a))
    for name, ref, fast in zip(("h", "a"), *outs, strict=True):
        assert_close(name, ref, fast, scale=10)  # sums of 24 + 20 products of N(0, 1) values: ~10x larger


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("gather,scale,scatter,lora,b_rows_are_k", [
    (True, False, False, False, False), (False, True, True, True, False), (True, False, False, True, True),
    (False, False, True, True, True)])
def test_gemm_launcher_matches_reference(gather, scale, scatter, lora, b_rows_are_k, tma):
    # Both weight layouts of the descriptor path (B's rows are output columns, or k; the
    # latter needs BK | K: 32 here); a rank-width output (no adapter term) with pointer loads.
    T, E, K, K_dim, C, R, s = 40, 5, 2, 32, 36, 18, 1.5
    token, weight, counts = _rows(T, E, K, "skip_experts")
    N = token.numel()
    a = torch.randn(T if gather else N, K_dim, device=DEVICE)
    if b_rows_are_k:
        b = torch.randn(E, K_dim, C, device=DEVICE)
        b_strides = b.stride()
    else:
        b = torch.randn(E, C, K_dim, device=DEVICE)  # read transposed: element [e, k, n] at b[e, n, k]
        b_strides = (C * K_dim, 1, K_dim)
    extra = {}
    if lora:
        l_ = torch.randn(E, R, C, device=DEVICE)
        extra = {"z": torch.randn(N, R, device=DEVICE), "l_": l_, "l_strides": l_.stride()}
    outs = []
    for launch in (lora_reference.lora_gemm, lora_ops.launch_lora_gemm):
        c = torch.zeros(T, C, device=DEVICE) if scatter else launchers.alloc(N, C, device=a.device, dtype=a.dtype)
        launch(a, b, b_strides, c, token, weight, counts, N, K_dim, C, gather=gather, scale=scale, scatter=scatter,
               cfg=replace(CONFIG_INTERPRETER, tma=tma), prec="ieee", alpha=s, rank_out=not lora, **extra)
        outs.append(c)
    assert_close("c", *outs, scale=10)  # sums of ~40 products of N(0, 1) values


@pytest.mark.parametrize("gather_l,gather_r", [(False, True), (True, False), (False, False)])
def test_wgrad_launcher_matches_reference(gather_l, gather_r):
    T, E, K, P, Q = 40, 6, 3, 5, 36
    token, _, counts = _rows(T, E, K, "skip_experts")
    N = token.numel()
    lhs = torch.randn(T if gather_l else N, P, device=DEVICE)
    rhs = torch.randn(T if gather_r else N, Q, device=DEVICE)
    ref, fast = (launch(lhs, rhs, token, counts, E, gather_l=gather_l, gather_r=gather_r, cfg=CONFIG_INTERPRETER,
                        prec="ieee") for launch in (lora_reference.lora_wgrad, lora_ops.launch_lora_wgrad))
    assert_close("out", ref, fast, scale=10)  # sums of up to ~20 products of N(0, 1) values
    assert torch.equal(fast[1::2], torch.zeros_like(fast[1::2]))  # odd experts have no rows: exact zeros


def test_fp8_with_lora_is_refused():
    from gatedmoe.dispatch import FP8Recipe

    bank = _bank(3, 16, 16, 4, torch.float32)
    r = make_routing(5, 3, 1, "random", torch.randn(5, 3)).to(DEVICE)
    with pytest.raises(ValueError, match="no LoRA adapter term"):
        get_backend("triton", DEVICE)(torch.randn(5, 16, device=DEVICE), r, bank,
                                      options=TritonOptions(fp8=FP8Recipe()))
