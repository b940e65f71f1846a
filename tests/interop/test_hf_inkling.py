"""Inkling (`InklingMoE`): the original router kept (`HFSharedGammaRouterGate`), its shared
experts routed to every token with the weights the router gives them, as experts of the
same bank.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). float32: outputs, chosen
experts, combine weights (routed and shared) and every gradient; bf16: within transformers'
own bf16 error; greedy tokens through the KV cache; round trips through `to_hf`,
`unpatch_model` and ``save_pretrained``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.inkling.configuration_inkling import InklingTextConfig  # noqa: E402
from transformers.models.inkling.modeling_inkling import InklingForCausalLM  # noqa: E402

from gatedmoe.interop.hf import from_hf  # noqa: E402
from gatedmoe.interop.hf.adapter import HFSharedGammaRouterGate  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_block_within_transformers_error_and_round_trips,
    assert_bf16_greedy_tokens_match,
    assert_combine_weights_match,
    assert_fp32_block_matches,
    assert_patched_copy_matches,
    assert_reloads_and_unpatches,
)
from interop.hf_tiny import randomize  # noqa: E402

E, S, K, D = 6, 2, 2, 32


def _config():
    return InklingTextConfig(
        vocab_size=64, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=16,
        max_position_embeddings=64, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=E,
        num_experts_per_tok=K, n_shared_experts=S, route_scale=2.0, mlp_layer_types=["sparse", "sparse"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _model():
    torch.manual_seed(0)
    return randomize(InklingForCausalLM(_config())).eval()


def _block(dtype=torch.float32):
    block = _model().model.layers[0].mlp
    block.to(dtype)
    # A bf16 model keeps the router's weight in float32 (_keep_in_fp32_modules_strict).
    block.gate.float()
    return block


def test_block_fp32_outputs_routing_and_every_gradient():
    ref = _block()
    fast = from_hf(ref)
    assert isinstance(fast.moe.gate, HFSharedGammaRouterGate) and fast.moe.gate.k == K + S

    def check_routing(x, r):
        _, ref_w, ref_i, ref_g = ref.gate(x)
        want = torch.zeros(14, E + S).scatter(1, ref_i, ref_w)
        want[:, E:] = ref_g
        assert_combine_weights_match(want, r, "combine weights (routed and shared)")

    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    assert_fp32_block_matches(ref, fast, x, check_routing, missing_is_zero=True)


def test_block_bf16_within_transformers_rounding_and_round_trips():
    # transformers scales the shared experts' hidden activations by their weight and sums
    # their outputs separately; gatedmoe weighs their outputs with the routed ones.
    assert_bf16_block_within_transformers_error_and_round_trips(_block(torch.bfloat16), D)


def test_model_patch_generate_save_and_reload(tmp_path):
    ref = _model()
    run = assert_patched_copy_matches(ref, ["inkling", "inkling"])
    assert_bf16_greedy_tokens_match(run, max_new_tokens=5)
    assert_reloads_and_unpatches(run, tmp_path)
