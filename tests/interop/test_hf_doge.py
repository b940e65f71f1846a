"""Doge (`DogeCDMoE`): product-key routing over single-unit experts (`HFProductKeyGate`), a
shared gated MLP, and the block's ``(hidden, router_logits)`` return.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). float32: outputs, router
logits, chosen experts, combine weights and every gradient; bf16: within transformers' own
bf16 error; greedy tokens through the KV cache; ``output_router_logits``; round trips
through `to_hf`, `unpatch_model` and ``save_pretrained``.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from gatedmoe.interop.hf import from_hf  # noqa: E402
from gatedmoe.interop.hf.adapter import HFProductKeyGate  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_block_within_transformers_error_and_round_trips,
    assert_bf16_greedy_tokens_match,
    assert_combine_weights_match,
    assert_fp32_block_matches,
    assert_patched_copy_matches,
    assert_reloads_and_unpatches,
    tiny_eager_causal_lm,
)

E, K, D = 16, 3, 32


def _model(mlp_bias: bool = False):
    cfg = transformers.DogeConfig(
        vocab_size=64, hidden_size=D, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, is_moe=True, num_experts=E, num_experts_per_tok=K,
        mlp_bias=mlp_bias, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return tiny_eager_causal_lm(cfg)


def _ref_routing(block, x_TD):
    # The product-key rule written out: candidates i_x * n + i_y, scores s_x + s_y.
    T, n = x_TD.shape[0], 4
    l2 = block.router_gate(x_TD).view(2, T, n)
    sx, ix = l2[0].topk(n, -1)
    sy, iy = l2[1].topk(n, -1)
    scores = (sx[:, :, None] + sy[:, None, :]).reshape(T, -1)
    ids = (ix[:, :, None] * n + iy[:, None, :]).reshape(T, -1)
    top, pos = scores.topk(K, -1)
    return torch.zeros(T, E).scatter(1, ids.gather(1, pos), top.softmax(-1))


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_block_fp32_outputs_routing_and_every_gradient(mlp_bias):
    ref = _model(mlp_bias).model.layers[0].mlp
    fast = from_hf(ref)
    assert isinstance(fast.moe.gate, HFProductKeyGate) and fast.moe.experts.d_hidden == 1
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    assert_fp32_block_matches(
        ref, fast, x, lambda x, r: assert_combine_weights_match(_ref_routing(ref, x.reshape(-1, D)), r),
        returns_router_logits=True, missing_is_zero=True,
    )  # fmt: skip


def test_block_bf16_within_transformers_rounding_and_round_trips():
    # transformers mixes the k units by two batched matmuls in bf16; gatedmoe runs them as
    # experts and sums in float32.
    ref16 = _model().model.layers[0].mlp.bfloat16()
    assert_bf16_block_within_transformers_error_and_round_trips(ref16, D, returns_router_logits=True)


def test_model_patch_router_logits_generate_save_and_reload(tmp_path):
    ref = _model()
    run = assert_patched_copy_matches(ref, ["doge", "doge"], router_logit_layers=2)
    assert run.ref_out.aux_loss is not None
    assert_close("aux loss", run.ref_out.aux_loss, run.fast_out.aux_loss)
    assert_bf16_greedy_tokens_match(run, max_new_tokens=5)
    assert_reloads_and_unpatches(run, tmp_path, attn_implementation="eager")
