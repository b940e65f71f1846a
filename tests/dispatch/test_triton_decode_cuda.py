"""The Triton decode path on CUDA: against the reference at realistic widths, without host
synchronisation, captured in a CUDA graph, and inside a patched Hugging Face model's
``generate()`` with a static KV cache compiled with ``mode="reduce-overhead"`` (CUDA graphs).

These run on the lent GPU (CI has none).
"""

from __future__ import annotations

import pytest
import torch
from routings import make_routing

from gatedmoe import Routing
from gatedmoe.dispatch import TritonOptions, reference_dispatch
from gatedmoe.experts import ExpertBank
from helpers import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

pytest.importorskip("triton")
from gatedmoe.dispatch.triton import backend, triton_dispatch  # noqa: E402
from gatedmoe.dispatch.triton.config import use_decode  # noqa: E402

DECODE = TritonOptions(decode=True)

# (T, D, H, E, K, mode): T=1 with k = 6 and 1; k = 2, 3, 4, 8 at other T; widths that are not
# powers of two; empty experts; everything on one expert; the top of the range (T=256) with
# many and few experts: row tiles of 16, 32 (32 rows per expert) and 64 rows (64 per expert).
CASES = [
    (1, 512, 1408, 64, 6, "random"),
    (1, 2880, 360, 32, 1, "random"),
    (3, 1024, 768, 16, 2, "random"),
    (8, 2048, 768, 128, 8, "random"),
    (63, 1000, 520, 12, 3, "skip_experts"),
    (64, 768, 1536, 8, 2, "one_expert"),
    (256, 1024, 1536, 32, 4, "random"),
    (256, 512, 256, 256, 8, "random"),
    (256, 512, 384, 8, 2, "random"),
]


def _problem(T, D, H, E, K, mode, dtype, seed=0):
    torch.manual_seed(seed)
    bank = ExpertBank(E, D, H).to("cuda", dtype)
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    routing = make_routing(T, E, K, mode, torch.randn(T, E)).to("cuda")
    return bank, x, routing


# bf16 on every case; float16 and float32 (the untuned CUDA config) on three.
DTYPED = [(*case, torch.bfloat16) for case in CASES] + [
    (*CASES[i], dtype) for i in (0, 4, 6) for dtype in (torch.float16, torch.float32)
]


@pytest.mark.parametrize("T,D,H,E,K,mode,dtype", DTYPED)
def test_decode_path_matches_reference(T, D, H, E, K, mode, dtype):
    bank, x, routing = _problem(T, D, H, E, K, mode, dtype)
    with torch.no_grad():
        ref_y = reference_dispatch(x, routing, bank)
        fast_y = triton_dispatch(x, routing, bank, options=DECODE)
    assert_close("y", ref_y, fast_y, dtype)


# The large-batch kernels at these sizes without gradients: their forward products take the
# 64-row tiles of `config.FEW_ROWS_CONFIGS_BF16` up to 32 rows per expert (every case but the
# last), the training tables above.
@pytest.mark.parametrize("T,D,H,E,K,mode", CASES)
def test_large_path_inference_matches_reference(T, D, H, E, K, mode):
    bank, x, routing = _problem(T, D, H, E, K, mode, torch.bfloat16)
    with torch.no_grad():
        assert_close("y", reference_dispatch(x, routing, bank),
                     triton_dispatch(x, routing, bank, options=TritonOptions(decode=False)), torch.bfloat16)


# The automatic choice: Qwen3-30B's narrow experts at T=8 take the decode path; experts at the
# size cut (`config.DECODE_MAX_EXPERT_ELEMENTS`) with 16 experts x 24 column blocks
# (`config.DECODE_WIDE_MIN_LARGE_PROGRAMS`) take the large-batch kernels at one row per expert.
@pytest.mark.parametrize("T,D,H,E,K,decode_calls", [(8, 2048, 768, 128, 8, 1), (8, 4096, 3072, 16, 2, 0)])
def test_automatic_choice_between_decode_and_large_path(monkeypatch, T, D, H, E, K, decode_calls):
    seen = []
    decode = backend.moe_glu_decode
    monkeypatch.setattr(backend, "moe_glu_decode", lambda *a: seen.append(a) or decode(*a))
    bank, x, routing = _problem(T, D, H, E, K, "random", torch.bfloat16)
    with torch.no_grad():
        assert_close("y", reference_dispatch(x, routing, bank), triton_dispatch(x, routing, bank), torch.bfloat16)
    assert len(seen) == decode_calls


def _experts_forward(x, top_k_index, top_k_weights, bank):
    """What the Hugging Face experts implementation does per call: sort, then dispatch."""
    routing = Routing.from_topk(top_k_weights, top_k_index, n_experts=bank.n_experts)
    return triton_dispatch(x, routing, bank)


def _topk(T, E, K, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(T, E, device="cuda", generator=gen)
    w, i = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    return w, i


@pytest.mark.parametrize("T,E,K", [(1, 64, 6), (16, 128, 8), (200, 32, 4)])
def test_no_host_sync(T, E, K):
    bank = ExpertBank(E, 1024, 768).to("cuda", torch.bfloat16)
    x = torch.randn(T, 1024, device="cuda", dtype=torch.bfloat16)
    w, i = _topk(T, E, K, 0)
    with torch.no_grad():
        _experts_forward(x, i, w, bank)  # warm-up: kernels compile
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _experts_forward(x, i, w, bank)
        finally:
            torch.cuda.set_sync_debug_mode(0)


# (200, 32, 4): 25 rows per expert, beyond the decode path: the large-batch kernels, whose
# combine adds rows with atomics, are compared within the dtype's bound instead of bit for bit.
@pytest.mark.parametrize("T,E,K", [(1, 64, 6), (16, 128, 8), (200, 128, 4), (200, 32, 4)])
def test_cuda_graph_replay_equals_eager(T, E, K):
    bank = ExpertBank(E, 1024, 768).to("cuda", torch.bfloat16)
    static_x = torch.randn(T, 1024, device="cuda", dtype=torch.bfloat16)
    static_w, static_i = _topk(T, E, K, 0)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            for _ in range(2):
                _experts_forward(static_x, static_i, static_w, bank)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = _experts_forward(static_x, static_i, static_w, bank)
        # New tokens and a new routing into the captured buffers; the replay must equal an
        # eager call on them, bit for bit where the decode path runs (its combine is
        # deterministic).
        deterministic = use_decode(T, T * K, E, 1024, 768)
        for seed in (1, 2):
            x = torch.randn(T, 1024, device="cuda", dtype=torch.bfloat16)
            w, i = _topk(T, E, K, seed)
            static_x.copy_(x)
            static_w.copy_(w)
            static_i.copy_(i)
            graph.replay()
            eager = _experts_forward(x, i, w, bank)
            torch.cuda.synchronize()
            if deterministic:
                assert torch.equal(static_y, eager)
            else:
                assert_close("y", eager, static_y)
            assert_close("y", reference_dispatch(x, Routing.from_topk(w, i, n_experts=E), bank), static_y)


def _tiny_qwen3_moe(dtype: torch.dtype):
    transformers = pytest.importorskip("transformers")
    from interop.hf_tiny import randomize, tiny_config

    cfg, _ = tiny_config("qwen3_moe")
    cfg.max_position_embeddings = 128
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    # Every weight of std 0.3 (not the 0.02 init): routing matters, and the logits are far
    # apart, so greedy tokens are decided by the model, not by bf16 rounding (inductor may
    # round its fused norms differently from eager).
    return randomize(model).to("cuda", dtype).eval()


# "cudagraphs": CUDA graphs of the traced graph, eager kernels (the same numerics as eager, so
# tokens must be identical); "inductor" with mode="reduce-overhead": what `generate()` does by
# default with a static cache (inductor's own kernels around ours, in CUDA graphs; in float32
# too, where inductor's different rounding of its fused norms cannot decide a token).
@pytest.mark.parametrize("batch,compile_backend,dtype", [(1, "inductor", torch.float32), (4, "cudagraphs", torch.bfloat16),
                                                         (4, "inductor", torch.bfloat16)])
def test_generate_static_cache_compiled_equals_eager(monkeypatch, batch, compile_backend, dtype):
    from transformers import CompileConfig

    from gatedmoe.interop.hf import patch_model

    model = _tiny_qwen3_moe(dtype)
    assert patch_model(model)
    seen = []
    decode = backend.moe_glu_decode
    monkeypatch.setattr(backend, "moe_glu_decode", lambda *a: seen.append(a[0].shape[0]) or decode(*a))
    ids = torch.randint(3, model.config.vocab_size, (batch, 7), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(3))
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, cache_implementation="static")
    eager = model.generate(ids, disable_compile=True, **kw)
    assert batch in seen  # the decode steps (T = batch tokens) ran the decode path
    monkeypatch.undo()  # no Python side effects inside the compiled region
    torch._dynamo.reset()
    cc = CompileConfig(backend=compile_backend, mode="reduce-overhead" if compile_backend == "inductor" else None)
    compiled = model.generate(ids, compile_config=cc, **kw)
    again = model.generate(ids, compile_config=cc, **kw)  # the captured graphs replayed
    assert torch.equal(eager, compiled), (eager, compiled)
    assert torch.equal(eager, again)
