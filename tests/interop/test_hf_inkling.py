"""Inkling (`InklingMoE`): the original router kept (`HFSharedGammaRouterGate`), its shared
experts routed to every token with the weights the router gives them, as experts of the
same bank.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). float32: outputs, chosen
experts, combine weights (routed and shared) and every gradient; bf16: within transformers'
own bf16 error; greedy tokens through the KV cache; round trips through `to_hf`,
`unpatch_model` and ``save_pretrained``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from transformers.models.inkling.configuration_inkling import InklingTextConfig  # noqa: E402
from transformers.models.inkling.modeling_inkling import InklingForCausalLM  # noqa: E402

from gatedmoe.interop.hf import from_hf, patch_model, unpatch_model  # noqa: E402
from gatedmoe.interop.hf.adapter import HFSharedGammaRouterGate  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_error_within_transformers,
    assert_grads_match_in_hf_layout,
    assert_round_trips_to_hf_layout,
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
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_y, fast_y = ref(ref_x), fast(fast_x)
    assert_close("output", ref_y, fast_y)
    with torch.no_grad():
        _, ref_w, ref_i, ref_g = ref.gate(x)
    want = torch.zeros(14, E + S).scatter(1, ref_i, ref_w)
    want[:, E:] = ref_g
    r = fast.moe.last_routing
    assert torch.equal(want > 0, r.combine_matrix() > 0)
    assert_close("combine weights (routed and shared)", want, r.combine_matrix())
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref_y.backward(g)
    fast_y.backward(g)
    assert_close("grad input", ref_x.grad, fast_x.grad)
    assert_grads_match_in_hf_layout(ref, fast, missing_is_zero=True)


def test_block_bf16_within_transformers_rounding_and_round_trips():
    ref16 = _block(torch.bfloat16)
    fast16 = from_hf(ref16)
    ref32 = copy.deepcopy(ref16).float()
    x = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        want, ref_y, fast_y = ref32(x.float()), ref16(x), fast16(x)
    assert fast_y.dtype == torch.bfloat16
    # transformers scales the shared experts' hidden activations by their weight and sums
    # their outputs separately; gatedmoe weighs their outputs with the routed ones.
    assert_bf16_error_within_transformers(want, ref_y, fast_y)
    assert_round_trips_to_hf_layout(ref16, fast16)


def test_model_patch_generate_save_and_reload(tmp_path):
    ref = _model()
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every MoE block converts
        swaps = patch_model(fast)
    assert [s.family for s in swaps] == ["inkling", "inkling"]
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_logits, fast_logits = ref(ids).logits, fast(ids).logits
    assert_close("logits", ref_logits, fast_logits)
    ref16, fast16 = copy.deepcopy(ref).bfloat16(), copy.deepcopy(fast).bfloat16()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ref16.generate(ids[:1], **kw), fast16.generate(ids[:1], **kw))
    fast.save_pretrained(tmp_path)
    back = InklingForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close("reloaded logits", ref_logits, back(ids).logits)
    assert [s.name for s in unpatch_model(fast)] == [s.name for s in swaps]
    with torch.no_grad():
        assert_close("unpatched logits", ref_logits, fast(ids).logits)
