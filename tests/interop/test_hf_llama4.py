"""Llama 4 (`Llama4TextMoe`): sigmoid top-k router whose scores scale the experts' inputs,
plus one shared expert, converted to `InputScaledMoE` with `HFSigmoidTopKGate`.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). float32: outputs, router
logits, chosen experts, combine weights and every gradient; bf16: bit-identical outputs and
greedy tokens; round trips through `to_hf`, `unpatch_model` and ``save_pretrained``.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from gatedmoe.interop.hf import from_hf, to_hf  # noqa: E402
from gatedmoe.layers import InputScaledMoE  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_greedy_tokens_match,
    assert_grads_match_in_hf_layout,
    assert_patched_copy_matches,
    assert_reloads_and_unpatches,
    assert_round_trips_to_hf_layout,
    tiny_eager_causal_lm,
)


def _config(k: int):
    # Every layer an MoE layer (interleave_moe_layer_step=1), k experts per token.
    return transformers.Llama4TextConfig(
        hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
        max_position_embeddings=64, num_local_experts=8, num_experts_per_tok=k,
        interleave_moe_layer_step=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _model(k: int = 1):
    return tiny_eager_causal_lm(_config(k))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_block_fp32_outputs_routing_and_every_gradient(k):
    ref = _model(k).model.layers[0].feed_forward
    fast = from_hf(ref)
    assert isinstance(fast.moe, InputScaledMoE)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref_y, ref_logits), (fast_y, fast_logits) = ref(ref_x), fast(fast_x)
    assert_close("output", ref_y, fast_y)
    assert_close("router logits", ref_logits, fast_logits)
    # Routing: Llama4Router's scores [T, E] (sigmoid of the kept logits, 0 elsewhere).
    ref_scores, _ = ref.router(x.reshape(-1, 32))
    r = fast.moe.last_routing
    assert_close("chosen experts", ref_scores > 0, r.combine_matrix() > 0)
    assert_close("combine weights", ref_scores, r.combine_matrix())
    g = torch.randn(ref_y.shape, generator=torch.Generator().manual_seed(2))
    (ref_y * g).sum().backward()
    (fast_y * g).sum().backward()
    assert_close("grad input", ref_x.grad, fast_x.grad)
    assert_grads_match_in_hf_layout(ref, fast)


@pytest.mark.parametrize("k", [1, 2])
def test_block_bf16_is_bit_identical_and_round_trips(k):
    ref = _model(k).model.layers[0].feed_forward.to(torch.bfloat16)
    fast = from_hf(ref)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        (ref_y, ref_logits), (fast_y, fast_logits) = ref(x), fast(x)
    assert fast_y.dtype == torch.bfloat16
    assert torch.equal(ref_y, fast_y) and torch.equal(ref_logits, fast_logits)
    assert_round_trips_to_hf_layout(ref, fast)


def test_to_hf_refuses_an_output_weighted_moe():
    ref = _model(1).model.layers[0].feed_forward
    fast = from_hf(ref)
    from gatedmoe import MoE

    plain = MoE.from_config(fast.moe.config, gate=fast.moe.gate, experts=fast.moe.experts, shared=fast.moe.shared)
    with pytest.raises(ValueError, match="InputScaledMoE"):
        to_hf(plain, like=ref)


def test_model_patch_router_logits_generate_save_and_reload(tmp_path):
    ref = _model(1)
    run = assert_patched_copy_matches(ref, ["llama4", "llama4"], router_logit_layers=2)
    assert_bf16_greedy_tokens_match(run, max_new_tokens=8)
    assert_reloads_and_unpatches(run, tmp_path, attn_implementation="eager")


def test_sigmoid_topk_gate_is_the_unnormalised_sigmoid_gate():
    from gatedmoe.gates import SigmoidGate
    from gatedmoe.interop.hf.adapter import HFSigmoidTopKGate

    torch.manual_seed(0)
    ref = SigmoidGate(16, 6, k=2, normalize=False)
    fast = HFSigmoidTopKGate(16, 6, k=2)
    with torch.no_grad():
        fast.weight.copy_(ref.weight)
    x = torch.randn(13, 16)
    ref_r, fast_r = ref(x), fast(x)
    assert_close("combine weights", ref_r.combine_matrix(), fast_r.combine_matrix())
    assert_close("expert", ref_r.expert, fast_r.expert)
    # The formula itself: g_e = sigmoid(l_e) for the k largest logits, 0 elsewhere.
    logits = x @ ref.weight.T
    top = logits.topk(2, dim=-1)
    want = torch.zeros_like(logits).scatter(1, top.indices, torch.sigmoid(top.values))
    assert_close("formula", want, fast_r.combine_matrix())
