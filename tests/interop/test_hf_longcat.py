"""LongCat-Flash (`LongcatFlashMoE`): softmax top-k over feed-forward and zero-computation
(identity) experts, with the original router kept (`HFRouterGate`) and the experts as a
`ZeroComputeMoE`.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). float32: outputs, chosen
experts (identity ones included), combine weights and every gradient; bf16: within the
rounding of transformers' own bf16 loop, judged against float32; greedy tokens through the
KV cache; round trips through `to_hf`, `unpatch_model` and ``save_pretrained``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gatedmoe.interop.hf import from_hf, to_hf  # noqa: E402
from gatedmoe.layers import ZeroComputeMoE  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_block_within_transformers_error_and_round_trips,
    assert_bf16_greedy_tokens_match,
    assert_fp32_block_matches,
    assert_patched_copy_matches,
    assert_reloads_and_unpatches,
    assert_topk_routing_matches,
    tiny_eager_causal_lm,
)

E_F, Z, K, D = 6, 2, 3, 32


def _config():
    return transformers.LongcatFlashConfig(
        hidden_size=D, num_layers=1, num_attention_heads=4, num_key_value_heads=4, ffn_hidden_size=48,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
        moe_topk=K, n_routed_experts=E_F, zero_expert_num=Z, expert_ffn_hidden_size=24, routed_scaling_factor=2.0,
        vocab_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _model():
    return tiny_eager_causal_lm(_config())


def _block(dtype=torch.float32):
    return _model().model.layers[0].mlp.to(dtype)


def test_block_fp32_outputs_routing_and_every_gradient():
    ref = _block()
    fast = from_hf(ref)
    assert isinstance(fast.moe, ZeroComputeMoE) and fast.moe.n_zero_experts == Z

    def check_routing(x, r):
        _, ref_w, ref_i = ref.router(x)
        ref_mask = assert_topk_routing_matches(ref_w, ref_i, r, E_F + Z)
        # The case under test: tokens with and without an identity expert among their k.
        on_identity = ref_mask[:, E_F:].any(-1)
        assert on_identity.any() and not on_identity.all()

    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(1))
    assert_fp32_block_matches(ref, fast, x, check_routing, missing_is_zero=True)


def test_block_bf16_within_transformers_rounding_and_round_trips():
    # transformers rounds each expert's weighted output to bf16 and adds them one by one
    # (index_add_ per expert); gatedmoe sums in float32 and rounds once.
    assert_bf16_block_within_transformers_error_and_round_trips(_block(torch.bfloat16), D)


def test_to_hf_refuses_a_layer_without_identity_experts():
    ref = _block()
    fast = from_hf(ref)
    from gatedmoe import MoE

    plain = MoE.from_config(fast.moe.config.replace(n_experts=E_F, gate="topk_softmax"), experts=fast.moe.experts)
    with pytest.raises(ValueError, match="ZeroComputeMoE"):
        to_hf(plain, like=ref)


def test_model_patch_router_logits_generate_save_and_reload(tmp_path):
    ref = _model()
    run = assert_patched_copy_matches(ref, ["longcat_flash"], router_logit_layers=1)
    assert_bf16_greedy_tokens_match(run, max_new_tokens=5)
    assert_reloads_and_unpatches(run, tmp_path, attn_implementation="eager")
