"""LongCat-Flash (`LongcatFlashMoE`): softmax top-k over feed-forward and zero-computation
(identity) experts, with the original router kept (`HFRouterGate`) and the experts as a
`ZeroComputeMoE`.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). float32: outputs, chosen
experts (identity ones included), combine weights and every gradient; bf16: within the
rounding of transformers' own bf16 loop, judged against float32; greedy tokens through the
KV cache; round trips through `to_hf`, `unpatch_model` and ``save_pretrained``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from gatedmoe.interop.hf import from_hf, patch_model, to_hf, unpatch_model  # noqa: E402
from gatedmoe.layers import ZeroComputeMoE  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_error_within_transformers,
    assert_grads_match_in_hf_layout,
    assert_round_trips_to_hf_layout,
)
from interop.hf_tiny import randomize  # noqa: E402

E_F, Z, K, D = 6, 2, 3, 32


def _config():
    return transformers.LongcatFlashConfig(
        hidden_size=D, num_layers=1, num_attention_heads=4, num_key_value_heads=4, ffn_hidden_size=48,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
        moe_topk=K, n_routed_experts=E_F, zero_expert_num=Z, expert_ffn_hidden_size=24, routed_scaling_factor=2.0,
        vocab_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _model():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation="eager")
    return randomize(model).eval()


def _block(dtype=torch.float32):
    return _model().model.layers[0].mlp.to(dtype)


def test_block_fp32_outputs_routing_and_every_gradient():
    ref = _block()
    fast = from_hf(ref)
    assert isinstance(fast.moe, ZeroComputeMoE) and fast.moe.n_zero_experts == Z
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(1))
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_y, fast_y = ref(ref_x), fast(fast_x)
    assert_close("output", ref_y, fast_y)
    with torch.no_grad():
        _, ref_w, ref_i = ref.router(x)
    T = x.shape[0] * x.shape[1]
    ref_mask = torch.zeros(T, E_F + Z, dtype=torch.bool).scatter(1, ref_i, True)
    r = fast.moe.last_routing
    fast_mask = torch.zeros_like(ref_mask).index_put((r.token, r.expert), torch.tensor(True))
    assert torch.equal(ref_mask, fast_mask)
    # The case under test: tokens with and without an identity expert among their k.
    on_identity = ref_mask[:, E_F:].any(-1)
    assert on_identity.any() and not on_identity.all()
    assert_close("combine weights", torch.zeros(T, E_F + Z).scatter(1, ref_i, ref_w), r.combine_matrix())
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref_y.backward(g)
    fast_y.backward(g)
    assert_close("grad input", ref_x.grad, fast_x.grad)
    assert_grads_match_in_hf_layout(ref, fast, missing_is_zero=True)


def test_block_bf16_within_transformers_rounding_and_round_trips():
    ref16 = _block(torch.bfloat16)
    fast16 = from_hf(ref16)
    ref32 = copy.deepcopy(ref16).float()  # the same (bf16-rounded) weights, in float32
    x = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        want, ref_y, fast_y = ref32(x.float()), ref16(x), fast16(x)
    assert fast_y.dtype == torch.bfloat16
    # transformers rounds each expert's weighted output to bf16 and adds them one by one
    # (index_add_ per expert); gatedmoe sums in float32 and rounds once.
    assert_bf16_error_within_transformers(want, ref_y, fast_y)
    assert_round_trips_to_hf_layout(ref16, fast16)


def test_to_hf_refuses_a_layer_without_identity_experts():
    ref = _block()
    fast = from_hf(ref)
    from gatedmoe import MoE

    plain = MoE.from_config(fast.moe.config.replace(n_experts=E_F, gate="topk_softmax"), experts=fast.moe.experts)
    with pytest.raises(ValueError, match="ZeroComputeMoE"):
        to_hf(plain, like=ref)


def test_model_patch_router_logits_generate_save_and_reload(tmp_path):
    ref = _model()
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every MoE block converts
        swaps = patch_model(fast)
    assert [s.family for s in swaps] == ["longcat_flash"]
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_out, fast_out = ref(ids, output_router_logits=True), fast(ids, output_router_logits=True)
    assert_close("logits", ref_out.logits, fast_out.logits)
    assert len(ref_out.router_logits) == len(fast_out.router_logits) == 1
    assert_close("router logits", ref_out.router_logits[0], fast_out.router_logits[0])
    ref16, fast16 = copy.deepcopy(ref).bfloat16(), copy.deepcopy(fast).bfloat16()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ref16.generate(ids[:1], **kw), fast16.generate(ids[:1], **kw))
    fast.save_pretrained(tmp_path)
    back = type(ref).from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert_close("reloaded logits", ref(ids).logits, back(ids).logits)
    assert [s.name for s in unpatch_model(fast)] == [s.name for s in swaps]
    with torch.no_grad():
        assert_close("unpatched logits", ref_out.logits, fast(ids).logits)
