"""The Triton backend's decode path (`ops.moe_glu_decode`) against the references: each
kernel stage against `gatedmoe.dispatch.triton.reference` with the same arguments, and the
whole path against `reference_dispatch`; the automatic choice by size.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) at tiny sizes in float32
and float16 (the interpreter computes bfloat16 wrongly, large-batch kernels included: bf16
runs on CUDA). The decode path is inference-only, so there are no gradients to compare; a
call that needs gradients must take the large-batch kernels, checked here with every gradient.
Buffers the kernels fill start as NaN.
"""

import pytest
import torch
from routings import make_routing

from gatedmoe.dispatch import TritonOptions, reference_dispatch
from gatedmoe.dispatch.triton import config, reference
from gatedmoe.experts import ExpertBank
from helpers import assert_close, poisoned_empty

pytest.importorskip("triton")
from gatedmoe.dispatch.triton import backend, launchers, ops, triton_dispatch  # noqa: E402
from gatedmoe.dispatch.triton.ops import moe_glu_decode, moe_glu_decode_forward  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
DECODE = TritonOptions(decode=True)


@pytest.fixture(autouse=True)
def _poison_kernel_buffers(monkeypatch):
    """Every buffer a kernel must fill starts as NaN, so an unwritten element fails loudly."""
    monkeypatch.setattr(launchers, "alloc", lambda *shape, device, dtype: poisoned_empty(*shape, dtype=dtype, device=device))


def _nan(*shape, dtype):
    return poisoned_empty(*shape, dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------------------- stages
# (T, D, H, counts): T=1 with one assignment; widths that are not powers of two with empty
# experts; every row on one expert; more rows than one 16-row tile on one expert.
STAGE_CASES = [
    (1, 16, 16, [0, 1, 0]),
    (13, 24, 40, [3, 0, 7, 0, 4]),
    (9, 40, 24, [0, 0, 11]),
    (5, 16, 48, [2, 19, 0, 1]),
]


def _stage_problem(T, D, H, counts, dtype):
    torch.manual_seed(0)
    counts = torch.tensor(counts, device=DEVICE)
    N, E = int(counts.sum()), counts.numel()
    token = torch.randint(0, T, (N,), device=DEVICE)
    weight = torch.rand(N, device=DEVICE)
    cfgs = config.decode_configs(dtype, torch.device(DEVICE), N, E, D, H)
    return counts, N, E, token, weight, cfgs, launchers.precision(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,H,counts", STAGE_CASES)
def test_decode_glu_matches_reference(T, D, H, counts, dtype):
    counts, N, E, token, _, cfgs, prec = _stage_problem(T, D, H, counts, dtype)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype)
    w_in = (torch.randn(E, 2 * H, D, device=DEVICE) / D**0.5).to(dtype)
    ref_a, fast_a = _nan(N, H, dtype=dtype), _nan(N, H, dtype=dtype)
    reference.decode_glu(x, token, w_in, ref_a, counts, N, D, H, cfgs["decode_glu"], prec)
    launchers.launch_decode_glu(x, token, w_in, fast_a, counts, N, D, H, cfgs["decode_glu"], prec)
    assert_close("a", ref_a, fast_a, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,H,counts", STAGE_CASES)
def test_decode_down_matches_reference(T, D, H, counts, dtype):
    counts, N, E, token, weight, cfgs, prec = _stage_problem(T, D, H, counts, dtype)
    a = torch.randn(N, H, device=DEVICE, dtype=dtype)
    w_out = (torch.randn(E, D, H, device=DEVICE) / H**0.5).to(dtype)
    ref_o, fast_o = _nan(N, D, dtype=torch.float32), _nan(N, D, dtype=torch.float32)
    reference.decode_down(a, w_out, weight, ref_o, counts, N, H, D, cfgs["decode_down"], prec)
    launchers.launch_decode_down(a, w_out, weight, fast_o, counts, N, H, D, cfgs["decode_down"], prec)
    # float32 output of 16-bit products: the tolerance of the inputs' dtype.
    assert_close("o", ref_o, fast_o, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,H,counts", STAGE_CASES)
def test_decode_combine_matches_reference(T, D, H, counts, dtype):
    counts, N, E, token, _, _, _ = _stage_problem(T, D, H, counts, dtype)
    o = torch.randn(N, D, device=DEVICE)
    ref_y, fast_y = _nan(T, D, dtype=dtype), _nan(T, D, dtype=dtype)
    reference.decode_combine(o, token, ref_y, N, D)
    launchers.launch_decode_combine(o, token, fast_y, N, D)
    assert_close("y", ref_y, fast_y, dtype)
    assert (fast_y[~torch.isin(torch.arange(T, device=DEVICE), token)] == 0).all()  # tokens with no assignment


@pytest.mark.parametrize("spread", ["random", "one_token"])
def test_decode_combine_scans_past_one_chunk(spread):
    # More assignments than one scan step (CN) and more hits in a step than one gather (G):
    # a token's rows in several chunks, or every row on one token (others get zeros).
    torch.manual_seed(0)
    T, D, N = 5, 24, 77
    token = torch.randint(0, T, (N,), device=DEVICE) if spread == "random" else torch.full((N,), 3, device=DEVICE)
    o = torch.randn(N, D, device=DEVICE)
    ref_y, fast_y = _nan(T, D, dtype=torch.float32), _nan(T, D, dtype=torch.float32)
    reference.decode_combine(o, token, ref_y, N, D)
    launchers.launch_decode_combine(o, token, fast_y, N, D)
    assert_close("y", ref_y, fast_y)


# ---------------------------------------------------------------------------- whole path
# (T, D, H, E, K, mode): T=1 for k = 1, 2, 3; T=3; T=63; widths that are not powers of two;
# experts with no tokens; every token on one expert (63 rows: four row tiles of one expert).
CASES = [
    (1, 16, 16, 3, 1, "random"),
    (1, 24, 40, 5, 2, "random"),
    (1, 16, 24, 6, 3, "skip_experts"),
    (3, 24, 40, 5, 2, "random"),
    (63, 16, 24, 6, 3, "skip_experts"),
    (63, 32, 16, 4, 2, "one_expert"),
]
if CUDA:
    CASES += [(256, 264, 328, 8, 2, "random"), (200, 128, 96, 64, 6, "skip_experts")]


def _bank_and_inputs(T, D, H, E, K, mode, dtype):
    torch.manual_seed(0)
    bank = ExpertBank(E, D, H).to(DEVICE, dtype)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype)
    routing = make_routing(T, E, K, mode, torch.randn(T, E)).to(DEVICE)
    return bank, x, routing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,H,E,K,mode", CASES)
def test_decode_path_matches_reference(T, D, H, E, K, mode, dtype):
    bank, x, routing = _bank_and_inputs(T, D, H, E, K, mode, dtype)
    with torch.no_grad():
        ref_y = reference_dispatch(x, routing, bank)
        fast_y = triton_dispatch(x, routing, bank, options=DECODE)
    assert_close("y", ref_y, fast_y, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_op_matches_its_plain_reference(dtype):
    # Same signature on both sides: `ops.moe_glu_decode` and `reference.moe_glu_decode`.
    bank, x, r = _bank_and_inputs(21, 24, 40, 6, 3, "skip_experts", dtype)
    args = (x, r.token, r.weight, r.counts, bank.w_in.detach(), bank.w_out.detach())
    assert_close("y", reference.moe_glu_decode(*args), moe_glu_decode(*args), dtype)


def test_decode_path_reads_transposed_weights_in_place(monkeypatch):
    # Weights stored [E, D, 2H] / [E, H, D] and viewed transposed (as some Hugging Face experts
    # are): read through their strides, never copied per call.
    torch.manual_seed(0)
    E, D, H, T, K = 5, 24, 40, 7, 2
    w_in = (torch.randn(E, D, 2 * H, device=DEVICE) / D**0.5).transpose(1, 2)
    w_out = (torch.randn(E, H, D, device=DEVICE) / H**0.5).transpose(1, 2)
    x = torch.randn(T, D, device=DEVICE)
    r = make_routing(T, E, K, "random", torch.randn(T, E)).to(DEVICE)
    bank = ExpertBank(E, D, H).to(DEVICE)
    with torch.no_grad():
        bank.w_in.copy_(w_in)
        bank.w_out.copy_(w_out)
        ref_y = reference_dispatch(x, r, bank)
    seen = {}
    glu, down = launchers.launch_decode_glu, launchers.launch_decode_down
    # launch_decode_glu(x, token, w_in, ...), launch_decode_down(a, w_out, ...)
    monkeypatch.setattr(launchers, "launch_decode_glu", lambda *a: seen.update(w_in=a[2]) or glu(*a))
    monkeypatch.setattr(launchers, "launch_decode_down", lambda *a: seen.update(w_out=a[1]) or down(*a))
    fast_y = moe_glu_decode(x, r.token, r.weight, r.counts, w_in, w_out)
    assert_close("y", ref_y, fast_y)
    assert seen["w_in"] is w_in and seen["w_out"] is w_out  # the stored tensors themselves, no copies


def test_decode_path_is_deterministic():
    bank, x, routing = _bank_and_inputs(63, 24, 40, 5, 3, "random", torch.float32)
    with torch.no_grad():
        first = triton_dispatch(x, routing, bank, options=DECODE)
        assert torch.equal(first, triton_dispatch(x, routing, bank, options=DECODE))


def test_decode_path_with_no_assignments():
    bank = ExpertBank(3, 16, 16).to(DEVICE)
    routing = make_routing(0, 3, 2, "random", torch.randn(0, 3)).to(DEVICE)
    with torch.no_grad():
        assert triton_dispatch(torch.randn(0, 16, device=DEVICE), routing, bank, options=DECODE).shape == (0, 16)
    # Tokens present, assignments none: zeros.
    x = torch.randn(4, 16, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    y = moe_glu_decode(x, empty, empty.float(), torch.zeros(3, dtype=torch.long, device=DEVICE), bank.w_in.detach(),
                       bank.w_out.detach())
    assert torch.equal(y, torch.zeros_like(x))


@pytest.mark.parametrize("BM", [16, 32])
def test_decode_configs_override_through_options(BM):
    # Given configs reach the kernels: 16-column blocks, and the 32-row tiles CUDA takes for
    # 17-32 rows per expert (the interpreter's own config has 16).
    cfg = config.KernelConfig(BM, 16, 16, 4, 1, group_m=1, tma=False)
    options = TritonOptions(decode=True, configs={"decode_glu": cfg, "decode_down": cfg})
    bank, x, routing = _bank_and_inputs(20, 24, 40, 5, 2, "random", torch.float32)
    with torch.no_grad():
        assert_close("y", reference_dispatch(x, routing, bank), triton_dispatch(x, routing, bank, options=options))
    assert config.decode_configs(torch.float32, torch.device(DEVICE), 40, 5, 24, 40, options.configs)["decode_glu"] == cfg


# ------------------------------------------------------------------------------ choice
def test_use_decode_is_a_size_rule():
    qwen3 = (2048, 768)  # D, H
    assert config.use_decode(1, 8, 128, *qwen3) and config.use_decode(256, 2048, 256, *qwen3)
    assert not config.use_decode(config.DECODE_MAX_TOKENS + 1, config.DECODE_MAX_TOKENS + 1, 1024, *qwen3)
    # Many rows per expert (large-batch kernels' regime), and no tokens at all.
    assert not config.use_decode(256, 512, 4, *qwen3) and not config.use_decode(0, 0, 8, *qwen3)
    # Wide experts: the large-batch kernels even at one row per expert (DeepSeek-V3 T=8, Mixtral
    # T=1), unless those would run too few programs (DeepSeek-V3 T=1: 8 experts x 16 columns).
    cut = config.DECODE_MAX_EXPERT_ELEMENTS
    assert not config.use_decode(8, 64, 256, 7168, 2048) and not config.use_decode(1, 2, 8, 4096, 14336)
    assert config.use_decode(1, 8, 256, 7168, 2048)
    assert config.use_decode(1, 8, 64, 1, cut - 1) and not config.use_decode(1, 8, 64, 1, cut)
    bn = config.FEW_ROWS_CONFIGS_BF16["glu_fwd"].BN
    few = config.DECODE_WIDE_MIN_LARGE_PROGRAMS
    assert config.use_decode(1, 1, 8, cut // (few - 1) // bn + 1, (few - 1) * bn)
    assert not config.use_decode(1, 1, 8, cut // few // bn + 1, few * bn)


def test_few_rows_per_expert_take_64_row_tiles_for_inference_only():
    cuda, bf16 = torch.device("cuda"), torch.bfloat16  # a pure function of sizes: no GPU needed
    few = config.kernel_configs(bf16, cuda, 768, rows_per_expert=config.FEW_ROWS_MAX_ROWS_PER_EXPERT)
    assert {k: few[k] for k in config.FEW_ROWS_CONFIGS_BF16} == dict(config.FEW_ROWS_CONFIGS_BF16)
    assert few["glu_bwd"] == config.kernel_configs(bf16, cuda, 768)["glu_bwd"]  # backward kernels untouched
    many = config.kernel_configs(bf16, cuda, 768, rows_per_expert=config.FEW_ROWS_MAX_ROWS_PER_EXPERT + 1)
    assert many == config.kernel_configs(bf16, cuda, 768)  # the training tables (None: keeps h)
    assert many["glu_fwd"].BM == 128
    # Overrides still win; float32 and the interpreter keep their one config.
    mine = config.KernelConfig(32, 32, 32, 4, 2)
    assert config.kernel_configs(bf16, cuda, 768, {"glu_fwd": mine}, rows_per_expert=1)["glu_fwd"] == mine
    assert config.kernel_configs(torch.float32, cuda, 768, rows_per_expert=1)["glu_fwd"] == config.CONFIG_FP32
    assert config.kernel_configs(bf16, torch.device("cpu"), 768, rows_per_expert=1)["glu_fwd"] == config.CONFIG_INTERPRETER


def test_large_path_forward_passes_rows_per_expert_only_without_h(monkeypatch):
    # The few-rows configs reach inference calls only: the forward asks for configs with the
    # mean rows per routed expert when it keeps no h, without them when backward needs h.
    seen = []
    kernel_configs = config.kernel_configs
    monkeypatch.setattr(ops.config, "kernel_configs", lambda *a: seen.append(a[4:]) or kernel_configs(*a))
    bank, x, routing = _bank_and_inputs(6, 24, 40, 5, 2, "random", torch.float32)
    options = TritonOptions(decode=False)
    with torch.no_grad():
        y = triton_dispatch(x, routing, bank, options=options)
    assert_close("y", reference_dispatch(x, routing, bank), y)
    assert seen == [(12 / 5,)]
    seen.clear()
    x.requires_grad_(True)
    triton_dispatch(x, routing, bank, options=options).sum().backward()
    assert seen and all(extra == (None,) for extra in seen)  # forward and backward: training configs


@pytest.mark.parametrize("BM", [16, 32, 64])
@pytest.mark.parametrize("N,E", [(1, 8), (8, 256), (63, 4), (200, 16), (512, 8)])
def test_decode_row_tiles_bound_every_routing(N, E, BM):
    # The grid comes from sizes alone; it must cover the worst split of N rows over E experts:
    # as many experts as possible holding one row, the rest on one expert.
    m = min(N, E)
    worst = m - 1 + -(-(N - m + 1) // BM)
    spread = sum(-(-c // BM) for c in [N // E + (i < N % E) for i in range(E)])
    assert config.decode_row_tiles(N, E, BM) >= max(worst, spread)


@pytest.mark.parametrize("grad,options,expect", [
    (False, None, "decode"),  # small and no gradient: the decode path, automatically
    (True, None, "large"),  # gradients: always the large-batch kernels
    (True, DECODE, "large"),
    (False, TritonOptions(decode=False), "large"),
])
def test_backend_choice(monkeypatch, grad, options, expect):
    seen = []
    decode, large = backend.moe_glu_decode, backend.moe_glu
    monkeypatch.setattr(backend, "moe_glu_decode", lambda *a: seen.append("decode") or decode(*a))
    monkeypatch.setattr(backend, "moe_glu", lambda *a: seen.append("large") or large(*a))
    bank, x, routing = _bank_and_inputs(3, 16, 16, 4, 2, "random", torch.float32)
    with torch.set_grad_enabled(grad):
        triton_dispatch(x, routing, bank, options=options)
    assert seen == [expect]


def test_small_call_with_gradients_matches_reference_in_every_gradient():
    # T=1 with gradients enabled: not the decode path; outputs and all gradients as the reference.
    bank, x, _ = _bank_and_inputs(1, 24, 40, 5, 2, "random", torch.float32)
    logits = torch.randn(1, 5, device=DEVICE)
    gy = torch.randn(1, 24, device=DEVICE)
    sides = {}
    for side, fn in (("ref", reference_dispatch), ("fast", lambda *a: triton_dispatch(*a, options=DECODE))):
        xx, ll = x.clone().requires_grad_(), logits.clone().requires_grad_()
        torch.manual_seed(7)
        routing = make_routing(1, 5, 2, "random", ll)
        bank.zero_grad(set_to_none=True)
        y = fn(xx, routing, bank)
        y.backward(gy)
        sides[side] = [y.detach(), xx.grad, ll.grad, bank.w_in.grad, bank.w_out.grad]
    for name, ref, fast in zip(("y", "grad x", "grad logits", "grad w_in", "grad w_out"), *sides.values(), strict=True):
        assert_close(name, ref, fast)


# --------------------------------------------------------------------------- custom op
def test_opcheck():
    bank, x, r = _bank_and_inputs(6, 16, 16, 3, 2, "random", torch.float32)
    w_in, w_out = bank.w_in.detach(), bank.w_out.detach()
    cfgs = config.configs_to_ints({"decode_glu": config.CONFIG_INTERPRETER})
    for configs in (None, cfgs):
        torch.library.opcheck(moe_glu_decode_forward, (x, r.token, r.weight, r.counts, w_in, w_out, configs),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_custom_op_equals_eager_call_and_refuses_backward():
    bank, x, r = _bank_and_inputs(9, 16, 24, 4, 2, "random", torch.float32)
    w_in, w_out = bank.w_in.detach(), bank.w_out.detach()
    eager = moe_glu_decode(x, r.token, r.weight, r.counts, w_in, w_out)
    assert torch.equal(eager, moe_glu_decode_forward(x, r.token, r.weight, r.counts, w_in, w_out))
    y = moe_glu_decode_forward(x.requires_grad_(), r.token, r.weight, r.counts, w_in, w_out)
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


def test_decode_impl_makes_no_host_reads(monkeypatch):
    # No .item()/.tolist()/bool(tensor) on the path: a read of a device value would show
    # here as a call of Tensor.__bool__/item/tolist (the CUDA test checks sync debug mode).
    bank, x, r = _bank_and_inputs(5, 16, 24, 4, 2, "random", torch.float32)
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: calls.append(_n) or _o(self, *a))
    ops._decode_impl(x, r.token, r.weight, r.counts, bank.w_in.detach(), bank.w_out.detach(), None)
    assert calls == []
