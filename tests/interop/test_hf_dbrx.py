"""DBRX (`DbrxFFN`): softmax top-k with the kept weights divided by their Lp norm
(`HFLpNormRouterGate`, the original router module kept) and flat per-expert GLU weights.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe).
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from transformers.models.dbrx.modeling_dbrx import DbrxFFN  # noqa: E402

from gatedmoe.interop.hf import from_hf  # noqa: E402
from gatedmoe.interop.hf.adapter import HFLpNormRouterGate  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_greedy_tokens_match,
    assert_fp32_block_matches,
    assert_patched_copy_matches,
    assert_reloads_and_unpatches,
    assert_round_trips_to_hf_layout,
    assert_topk_routing_matches,
)
from interop.hf_tiny import randomize  # noqa: E402

E, D, K = 6, 32, 3


def _config(norm_p=2.0):
    ffn = {"ffn_hidden_size": 24, "moe_num_experts": E, "moe_top_k": K, "moe_normalize_expert_weights": norm_p}
    return transformers.DbrxConfig(
        d_model=D, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=64, attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config=ffn, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _block(norm_p=2.0, dtype=torch.float32):
    torch.manual_seed(0)
    return randomize(DbrxFFN(_config(norm_p))).to(dtype).eval()


def test_gate_formula_against_a_direct_computation():
    # g_e = p_e / ||p_topk||_p, p = softmax(x W^T): computed here from its definition.
    router = torch.nn.Linear(D, E, bias=False)
    x = torch.randn(9, D, dtype=torch.float64)
    for p in (1.0, 2.0, 3.5):
        gate = HFLpNormRouterGate(router.double(), d_model=D, n_experts=E, k=K, norm_p=p)
        probs = torch.softmax(x @ router.weight.T, -1)
        top, idx = probs.topk(K, -1)
        want = torch.zeros(9, E, dtype=torch.float64).scatter(1, idx, top / (top**p).sum(-1, keepdim=True) ** (1 / p))
        assert_close(f"weights p={p}", want, gate(x).combine_matrix())
    with pytest.raises(ValueError, match="norm_p"):
        HFLpNormRouterGate(router, d_model=D, n_experts=E, k=K, norm_p=0.0)


@pytest.mark.parametrize("norm_p", [1.0, 2.0, None])
def test_block_fp32_outputs_routing_and_every_gradient(norm_p):
    ref = _block(norm_p)
    fast = from_hf(ref)
    assert isinstance(fast.moe.gate, HFLpNormRouterGate) and fast.moe.gate.norm_p == norm_p

    def check_routing(x, r):
        ref_w, ref_i = ref.route_tokens_to_experts(ref.router(x.clone()))
        assert_topk_routing_matches(ref_w, ref_i, r, E)

    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    assert_fp32_block_matches(ref, fast, x, check_routing)


def test_block_bf16_agrees_and_round_trips():
    ref = _block(dtype=torch.bfloat16)
    fast = from_hf(ref)
    x = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        ref_y, fast_y = ref(x), fast(x)
    assert fast_y.dtype == torch.bfloat16
    # transformers adds each token's k weighted expert outputs one by one in bf16
    # (index_add_); gatedmoe sums them in float32 and rounds once: within bf16 rounding.
    assert_close("output", ref_y, fast_y, dtype=torch.bfloat16)
    assert_round_trips_to_hf_layout(ref, fast)


def test_model_patch_generate_router_logits_save_and_reload(tmp_path):
    torch.manual_seed(0)
    ref = randomize(transformers.DbrxForCausalLM(_config())).eval()
    run = assert_patched_copy_matches(ref, ["dbrx", "dbrx"], router_logit_layers=2)
    assert_close("aux loss", run.ref_out.aux_loss, run.fast_out.aux_loss)
    assert_bf16_greedy_tokens_match(run, max_new_tokens=8)
    assert_reloads_and_unpatches(run, tmp_path)
