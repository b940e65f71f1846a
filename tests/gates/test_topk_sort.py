"""The counting sort of given top-k choices (`gatedmoe.gates.topk_sort`) against the plain
path of `Routing.from_topk`, on CUDA where there is one, else in Triton's interpreter on the
CPU: token, expert, weight, counts and the gradient of the weights, all exactly (the sort only
moves values). Ids are drawn with many ties (small E, duplicates within a row)."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton")

from gatedmoe import Routing  # noqa: E402
from gatedmoe.gates import registry  # noqa: E402
from gatedmoe.gates import topk_sort as ts  # noqa: E402
from helpers import poisoned_empty  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("token", "expert", "weight", "counts")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ts, "_empty", lambda *shape, device, dtype: poisoned_empty(*shape, dtype=dtype, device=device))


def _assert_same(ref: tuple, fast: tuple) -> None:
    for name, r, f in zip(NAMES, ref, fast, strict=True):
        assert r.dtype == f.dtype and r.shape == f.shape, f"{name}: {f.dtype} {tuple(f.shape)} != {r.dtype} {tuple(r.shape)}"
        assert torch.equal(r, f), f"{name} differs"


CASES = [
    # T, K, E (blocks of ts._BN = 256 assignments; one program up to ts._ONE_PROGRAM_N = 256, one block)
    (0, 2, 4),
    (1, 1, 1),
    (1, 3, 5),
    (7, 1, 3),
    (63, 3, 4),
    (40, 4, 4),  # K = E
    (33, 6, 2),  # K > E: every row names an expert several times
    (3, 16, 4096),  # the largest E and K
    (85, 3, 100),  # N = 255, E not a power of two: one program, its block one short
    (64, 4, 8),  # N = 256: the most one program sorts, one full block
    (257, 1, 5),  # N = 257: histogram, scan and sort kernels; the second block holds one assignment
    (200, 3, 64),  # three blocks; rows straddle the blocks (256 % 3 != 0)
    (205, 5, 3),  # N = 1025: the fifth block holds one assignment
    (300, 8, 256),  # DeepSeek-V3's E and K, ten blocks
    (2100, 1, 1),  # E = 1, K = 1: every assignment ties
    (1000, 2, 16),  # rows straddle no block, many ties across blocks
    (80, 16, 4096),  # the largest E and K with three launches
]


def test_cases_cover_both_launch_plans():
    sizes = {T * K for T, K, _ in CASES}
    assert {ts._ONE_PROGRAM_N, ts._ONE_PROGRAM_N + 1} <= sizes
    assert any(n % ts._BN and n > ts._BN for n in sizes)  # a partial block after full ones


@pytest.mark.parametrize("T,K,E", CASES)
@pytest.mark.parametrize("id_dtype,w_dtype", [(torch.int64, torch.float32), (torch.int32, torch.bfloat16),
                                              (torch.int64, torch.float16)])
def test_sort_topk_matches_the_plain_path(T, K, E, id_dtype, w_dtype):
    experts = torch.randint(0, E, (T, K), dtype=id_dtype, device=DEVICE)
    ref_w = torch.randn(T, K, device=DEVICE).to(w_dtype).requires_grad_()
    fast_w = ref_w.detach().clone().requires_grad_()
    ref = ts.sort_topk_reference(ref_w, experts, E)
    fast = ts.sort_topk(fast_w, experts, E)
    _assert_same(ref, fast)
    g = torch.randn(T * K, device=DEVICE).to(w_dtype)
    ref[2].backward(g)
    fast[2].backward(g)
    assert torch.equal(ref_w.grad, fast_w.grad)


@pytest.mark.parametrize("T", [3, 300])  # one program, three launches
def test_inference_takes_the_launches_without_autograd(T):
    """Without gradients (a decode step) the same launches run outside the autograd Function:
    the same routing, and no graph recorded."""
    experts = torch.randint(0, 16, (T, 4), device=DEVICE)
    w = torch.rand(T, 4, device=DEVICE, requires_grad=True)
    with_grad = ts.sort_topk(w, experts, 16)
    assert with_grad[2].grad_fn is not None
    with torch.no_grad():
        without = ts.sort_topk(w, experts, 16)
    assert without[2].grad_fn is None and not without[2].requires_grad
    _assert_same(with_grad, without)
    _assert_same(ts.sort_topk_reference(w.detach(), experts, 16), ts.sort_topk(w.detach(), experts, 16))


@pytest.mark.parametrize("T", [70, 700])  # one program, three launches
def test_all_rows_on_one_expert_and_experts_without_rows(T):
    w = torch.rand(T, 2, device=DEVICE)
    for experts in (torch.full((T, 2), 5, device=DEVICE), torch.tensor([3, 11], device=DEVICE).repeat(T, 1)):
        fast = ts.sort_topk(w, experts, 16)
        _assert_same(ts.sort_topk_reference(w, experts, 16), fast)
    assert fast[3].tolist() == [0, 0, 0, T] + [0] * 7 + [T] + [0] * 4


def test_noncontiguous_inputs():
    w = torch.rand(2, 9, device=DEVICE)[:, ::3].t()  # [3, 2], strided
    experts = torch.randint(0, 3, (2, 3), device=DEVICE).t()
    _assert_same(ts.sort_topk_reference(w, experts, 3), ts.sort_topk(w, experts, 3))


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA bad ids stop the sort with a device-side assertion, sticky for the process")
@pytest.mark.parametrize("T", [5, 300, 700])  # one block (one program), three blocks, six blocks
@pytest.mark.parametrize("E", [3, 4])  # with E a power of two the bad bucket E lies past the histogram's bins
def test_bad_ids_are_left_out_of_the_counts(T, E):
    """Ids outside [0, E) write nothing out of bounds: they come last, in order, with their
    own values, and `Routing.validate` reports the missing counts (on CUDA the sort also
    asserts on the device)."""
    K = 2
    experts = torch.randint(0, E, (T, K), device=DEVICE)
    experts[1, 1], experts[T - 1, 0], experts[2, 0] = 7, -1, E
    w = torch.rand(T, K, device=DEVICE)
    token, expert, weight, counts = ts.sort_topk(w, experts, E)
    good = (experts >= 0) & (experts < E)
    assert counts.sum() == good.sum() == T * K - 3
    assert torch.equal(counts, torch.bincount(experts[good], minlength=E))
    assert token[-3:].tolist() == [1, 2, T - 1] and expert[-3:].tolist() == [7, E, -1]
    assert not torch.isnan(weight).any() and (token >= 0).all()  # every slot written
    n_good = T * K - 3
    order = torch.argsort(torch.where(good, experts, E).reshape(-1), stable=True)[:n_good]
    assert torch.equal(token[:n_good], order // K) and torch.equal(expert[:n_good], experts.reshape(-1)[order])
    assert torch.equal(weight[:n_good], w.reshape(-1)[order])
    with pytest.raises(ValueError, match="counts sums to"):
        Routing(token=token, expert=expert, weight=weight, counts=counts, n_tokens=T).validate()


@pytest.mark.parametrize("T", [5, 300])  # one program, three launches
@pytest.mark.parametrize("bad", [False, True])
def test_ok_flag_says_whether_every_id_is_in_range(T, bad):
    """The flag the id check asserts on: 1 with every id in [0, E), 0 with one outside (the
    sort's own launches, no assertion, so also on CUDA)."""
    experts = torch.randint(0, 6, (T, 2), device=DEVICE)
    if bad:
        experts[T // 2, 1] = 6
    *_, counts, _, ok = ts._launch_sort(torch.rand(T, 2, device=DEVICE), experts, 6)
    assert ok.tolist() == [0 if bad else 1] and counts[6].item() == int(bad)


@pytest.mark.parametrize("T", [5, 700])  # one launch, three
@pytest.mark.parametrize("grad", [False, True])
def test_trusted_ids_skip_the_id_check_only(T, grad, monkeypatch):
    """Ids a user hands in (the default) get the device-side range check; trusted ids (the
    gates' own torch.topk) leave out its launches and sort the same, gradient included."""
    checks = []
    real = ts._assert_ids_in_range
    monkeypatch.setattr(ts, "_assert_ids_in_range", lambda *a: checks.append(1) or real(*a))
    w = torch.rand(T, 3, device=DEVICE, requires_grad=grad)
    experts = torch.randint(0, 16, (T, 3), device=DEVICE)
    checked = ts.sort_topk(w, experts, 16)
    assert checks == [1]
    trusted = ts.sort_topk(w, experts, 16, trusted_ids=True)
    assert checks == [1]
    _assert_same(checked, trusted)
    if grad:
        g = torch.randn(T * 3, device=DEVICE)
        (g_checked,) = torch.autograd.grad(checked[2], w, g)
        (g_trusted,) = torch.autograd.grad(trusted[2], w, g)
        assert torch.equal(g_checked, g_trusted)


def test_trusted_ids_keep_the_cpu_check_of_from_topk():
    """On the CPU the range check reads the ids on the host anyway: bad ids are a ValueError
    whatever the caller claims."""
    w, experts = torch.rand(3, 2), torch.tensor([[0, 1], [2, 5], [1, 0]])
    for trusted in (False, True):
        with pytest.raises(ValueError, match="expert ids"):
            Routing.from_topk(w, experts, 4, trusted_ids=trusted)


@pytest.mark.parametrize(
    "name,kw", [("topk_softmax", {"k": 2}), ("sigmoid", {"k": 2}), ("group_limited", {"k": 2, "n_group": 4, "topk_group": 2}),
                ("cosine", {"k": 2})]
)
def test_gates_hand_their_topk_ids_as_trusted(name, kw, monkeypatch):
    """The gates' ids come from torch.topk over E scores (their plain path; the fused one
    sorts without the check): `Routing.from_topk` gets ``trusted_ids=True``."""
    seen = []
    from_topk = Routing.from_topk.__func__
    monkeypatch.setattr(
        Routing, "from_topk", classmethod(lambda cls, *a, **k: seen.append(k.get("trusted_ids")) or from_topk(cls, *a, **k))
    )
    gate = registry.get(name)(16, 8, **kw).to(DEVICE)
    module = sys.modules[type(gate).__module__]
    if hasattr(module, "fused_topk_applies"):  # on CUDA: the plain path
        monkeypatch.setattr(module, "fused_topk_applies", lambda *a, **k: False)
    gate(torch.randn(5, 16, device=DEVICE))
    assert seen == [True]


def test_rejects_bad_arguments():
    w, e = torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.long)
    for args, match in (
        ((w, e, 0), "n_experts"),
        ((w, e, 5000), "n_experts"),
        ((w, e.float(), 3), "experts_TK"),
        ((w, e.short(), 3), "experts_TK"),
        ((w[:, :1], e, 3), "experts_TK"),
        ((w.long(), e, 3), "weights_TK"),
        ((torch.rand(4, 17), torch.zeros(4, 17, dtype=torch.long), 3), "K must"),
    ):
        with pytest.raises(ValueError, match=match):
            ts.sort_topk(*args)


def test_applies_only_to_cuda_within_the_limits():
    w, e = torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.long)
    assert not ts.sort_topk_applies(w, e, 3)  # CPU: `Routing.from_topk` keeps the plain path
    if DEVICE == "cuda":
        wc, ec = w.cuda(), e.cuda()
        assert ts.sort_topk_applies(wc, ec, 3)
        assert not ts.sort_topk_applies(wc, ec, 5000)
        assert not ts.sort_topk_applies(torch.rand(4, 17, device="cuda"), torch.zeros(4, 17, dtype=torch.long, device="cuda"), 32)
        assert not ts.sort_topk_applies(wc, e, 3)  # ids on another device
        assert not ts.sort_topk_applies(wc, ec.short(), 3)
        assert not ts.sort_topk_applies(wc.double(), ec, 3)  # float64 weights: not compile-checked


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
# (T, K, E, kernels): the kernels run wherever they apply (measured faster at every size), the
# plain path beyond their limits (E > 4096); the routing is the same either way.
@pytest.mark.parametrize("T,K,E,kernels", [(1, 8, 256, True), (8, 8, 256, True), (1, 2, 8, True), (64, 2, 8, True),
                                           (4096, 8, 256, True), (16384, 8, 256, True), (0, 4, 16, True),
                                           (8, 2, 5000, False)])
def test_from_topk_on_cuda_takes_the_kernels_where_they_apply(T, K, E, kernels, monkeypatch):
    calls = []
    real = ts.sort_topk
    monkeypatch.setattr(ts, "sort_topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = torch.rand(T, K, device="cuda", requires_grad=True)
    experts = torch.randint(0, E, (T, K), device="cuda", dtype=torch.int32)
    r = Routing.from_topk(w, experts, E)
    assert bool(calls) == kernels, "Routing.from_topk took the wrong path"
    _assert_same(ts.sort_topk_reference(w, experts, E), (r.token, r.expert, r.weight, r.counts))
    r.validate()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_from_topk_on_cuda_checks_all_but_trusted_ids(monkeypatch):
    checks = []
    real = ts._assert_ids_in_range
    monkeypatch.setattr(ts, "_assert_ids_in_range", lambda *a: checks.append(1) or real(*a))
    w, experts = torch.rand(16, 8, device="cuda"), torch.randint(0, 256, (16, 8), device="cuda")
    checked = Routing.from_topk(w, experts, 256)
    assert checks == [1]
    trusted = Routing.from_topk(w, experts, 256, trusted_ids=True)
    assert checks == [1]
    _assert_same((checked.token, checked.expert, checked.weight, checked.counts),
                 (trusted.token, trusted.expert, trusted.weight, trusted.counts))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 32, 33, 4096])  # one launch up to 256 assignments, three after (K=8)
def test_from_topk_on_cuda_never_syncs(T):
    w = torch.rand(T, 8, device="cuda", requires_grad=True)
    experts = torch.randint(0, 256, (T, 8), device="cuda")
    g = torch.randn(T * 8, device="cuda")
    Routing.from_topk(w, experts, 256)  # compile the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = Routing.from_topk(w, experts, 256)
        r.weight.backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(w.grad.reshape(-1)[torch.argsort(experts.reshape(-1), stable=True)], g)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 4096])  # one launch, three (E=256)
def test_from_topk_on_cuda_replays_in_a_graph(T):
    """Captured once, replayed on new top-k choices written into the same inputs: the routing
    of the new choices (a decode step captured with its routing build)."""
    E, K = 256, 8
    w = torch.rand(T, K, device="cuda")
    experts = torch.randint(0, E, (T, K), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        Routing.from_topk(w, experts, E)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r = Routing.from_topk(w, experts, E)
    w.copy_(torch.rand(T, K, device="cuda"))
    experts.copy_(torch.randint(0, E, (T, K), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(ts.sort_topk_reference(w, experts, E), (r.token, r.expert, r.weight, r.counts))
