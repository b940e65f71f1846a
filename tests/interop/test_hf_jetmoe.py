"""JetMoE (`JetMoeMoE`, the MLP mixture): its own router kept (`HFJetMoeRouterGate`), fused GLU
experts and an output bias (`HFOutputBias` as `MoE.shared`). JetMoE's attention mixture
(`JetMoeMoA`) is not converted: `patch_model` names it in its warning.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE  # noqa: E402

from gatedmoe.interop.hf import from_hf, patch_model, unpatch_model  # noqa: E402
from gatedmoe.interop.hf.adapter import HFJetMoeRouterGate, HFOutputBias  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_block_bit_identical_and_round_trips,
    assert_grads_match_in_hf_layout,
)
from interop.hf_tiny import randomize  # noqa: E402

E, D, K = 6, 32, 2


def _config():
    return transformers.JetMoeConfig(
        hidden_size=D, intermediate_size=24, num_local_experts=E, num_experts_per_tok=K, num_hidden_layers=2,
        num_key_value_heads=2, kv_channels=8, vocab_size=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _block(dtype=torch.float32):
    torch.manual_seed(0)
    return randomize(JetMoeMoE(_config())).to(dtype).eval()


def test_block_fp32_outputs_routing_and_every_gradient():
    ref = _block()
    fast = from_hf(ref)
    assert isinstance(fast.moe.gate, HFJetMoeRouterGate) and isinstance(fast.moe.shared, HFOutputBias)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_y, fast_y = ref(ref_x), fast(fast_x)
    assert_close("output", ref_y, fast_y)
    # The router's formula, from its definition: top-k of the logits, softmax over the kept.
    with torch.no_grad():
        logits = x.reshape(-1, D) @ ref.router.layer.weight.T
    top, idx = logits.topk(K, dim=1)
    ref_mask = torch.zeros(14, E, dtype=torch.bool).scatter(1, idx, True)
    r = fast.moe.last_routing
    fast_mask = torch.zeros_like(ref_mask).index_put((r.token, r.expert), torch.tensor(True))
    assert torch.equal(ref_mask, fast_mask)
    assert_close("combine weights", torch.zeros(14, E).scatter(1, idx, top.softmax(1)), r.combine_matrix())
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref_y.backward(g)
    fast_y.backward(g)
    assert_close("grad input", ref_x.grad, fast_x.grad)
    assert_grads_match_in_hf_layout(ref, fast)


def test_block_bf16_is_bit_identical_and_round_trips():
    assert_bf16_block_bit_identical_and_round_trips(_block(torch.bfloat16), D)


def test_model_patch_generate_router_logits_save_and_reload(tmp_path):
    torch.manual_seed(0)
    ref = randomize(transformers.JetMoeForCausalLM(_config())).eval()
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        swaps = patch_model(fast)
    assert [s.name for s in swaps] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert {s.family for s in swaps} == {"jetmoe"}
    # Only the attention mixtures are left, and named.
    (left,) = [w for w in caught if "left" in str(w.message)]
    assert "model.layers.0.self_attention (JetMoeAttention" in str(left.message)
    assert len(swaps.skipped) == 2 and {c for _, c, _ in swaps.skipped} == {"JetMoeAttention"}
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_out, fast_out = ref(ids, output_router_logits=True), fast(ids, output_router_logits=True)
    assert_close("logits", ref_out.logits, fast_out.logits)
    assert len(ref_out.router_logits) == len(fast_out.router_logits) == 4  # attention and MLP routers
    for a, b in zip(ref_out.router_logits, fast_out.router_logits, strict=True):
        assert_close("router logits", a, b)
    assert_close("aux loss", ref_out.aux_loss, fast_out.aux_loss)
    ref16, fast16 = copy.deepcopy(ref).bfloat16(), copy.deepcopy(fast).bfloat16()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ref16.generate(ids[:1], **kw), fast16.generate(ids[:1], **kw))
    fast.save_pretrained(tmp_path)
    back = transformers.JetMoeForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close("reloaded logits", ref(ids).logits, back(ids).logits)
    assert [s.name for s in unpatch_model(fast)] == [s.name for s in swaps]
    with torch.no_grad():
        assert_close("unpatched logits", ref_out.logits, fast(ids).logits)
