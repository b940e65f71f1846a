"""Doge (`DogeCDMoE`): product-key routing over single-unit experts (`HFProductKeyGate`), a
shared gated MLP, and the block's ``(hidden, router_logits)`` return.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). float32: outputs, router
logits, chosen experts, combine weights and every gradient; bf16: within transformers' own
bf16 error; greedy tokens through the KV cache; ``output_router_logits``; round trips
through `to_hf`, `unpatch_model` and ``save_pretrained``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from gatedmoe.interop.hf import from_hf, patch_model, unpatch_model  # noqa: E402
from gatedmoe.interop.hf.adapter import HFProductKeyGate  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_error_within_transformers,
    assert_grads_match_in_hf_layout,
    assert_round_trips_to_hf_layout,
)
from interop.hf_tiny import randomize  # noqa: E402

E, K, D = 16, 3, 32


def _model(mlp_bias: bool = False):
    cfg = transformers.DogeConfig(
        vocab_size=64, hidden_size=D, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, is_moe=True, num_experts=E, num_experts_per_tok=K,
        mlp_bias=mlp_bias, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return randomize(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")).eval()


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
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref_y, ref_logits), (fast_y, fast_logits) = ref(ref_x), fast(fast_x)
    assert_close("output", ref_y, fast_y)
    assert_close("router logits", ref_logits, fast_logits)
    with torch.no_grad():
        want = _ref_routing(ref, x.reshape(-1, D))
    r = fast.moe.last_routing
    assert torch.equal(want > 0, r.combine_matrix() > 0)
    assert_close("combine weights", want, r.combine_matrix())
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref_y.backward(g)
    fast_y.backward(g)
    assert_close("grad input", ref_x.grad, fast_x.grad)
    assert_grads_match_in_hf_layout(ref, fast, missing_is_zero=True)


def test_block_bf16_within_transformers_rounding_and_round_trips():
    ref16 = _model().model.layers[0].mlp.bfloat16()
    fast16 = from_hf(ref16)
    ref32 = copy.deepcopy(ref16).float()
    x = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        want, ref_y, fast_y = ref32(x.float())[0], ref16(x)[0], fast16(x)[0]
    assert fast_y.dtype == torch.bfloat16
    # transformers mixes the k units by two batched matmuls in bf16; gatedmoe runs them as
    # experts and sums in float32.
    assert_bf16_error_within_transformers(want, ref_y, fast_y)
    assert_round_trips_to_hf_layout(ref16, fast16)


def test_model_patch_router_logits_generate_save_and_reload(tmp_path):
    ref = _model()
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every MoE block converts
        swaps = patch_model(fast)
    assert [s.family for s in swaps] == ["doge", "doge"]
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_out, fast_out = ref(ids, output_router_logits=True), fast(ids, output_router_logits=True)
    assert_close("logits", ref_out.logits, fast_out.logits)
    assert len(ref_out.router_logits) == len(fast_out.router_logits) == 2
    for a, b in zip(ref_out.router_logits, fast_out.router_logits, strict=True):
        assert_close("router logits", a, b)
    assert ref_out.aux_loss is not None
    assert_close("aux loss", ref_out.aux_loss, fast_out.aux_loss)
    ref16, fast16 = copy.deepcopy(ref).bfloat16(), copy.deepcopy(fast).bfloat16()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ref16.generate(ids[:1], **kw), fast16.generate(ids[:1], **kw))
    fast.save_pretrained(tmp_path)
    back = type(ref).from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert_close("reloaded logits", ref_out.logits, back(ids).logits)
    assert [s.name for s in unpatch_model(fast)] == [s.name for s in swaps]
    with torch.no_grad():
        assert_close("unpatched logits", ref_out.logits, fast(ids).logits)
