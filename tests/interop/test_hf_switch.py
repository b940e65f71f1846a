"""Switch Transformers (`SwitchTransformersSparseMLP`): top-1 routing with per-sequence
expert capacity, converted with its own router (`HFSwitchRouterGate`) and plain ReLU experts.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). A capacity of 2 slots
per expert and sequence makes the router drop tokens in every test.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from transformers.models.switch_transformers.modeling_switch_transformers import (  # noqa: E402
    SwitchTransformersSparseMLP,
)

from gatedmoe.interop.hf import from_hf, patch_model, unpatch_model  # noqa: E402
from gatedmoe.interop.hf.adapter import HFSwitchRouterGate  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_block_bit_identical_and_round_trips,
    assert_grads_match_in_hf_layout,
)
from interop.hf_tiny import randomize  # noqa: E402

E, D = 4, 32


def _config(dropout_rate=0.0):
    return transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=D, d_kv=8, d_ff=48, num_heads=4, num_experts=E, expert_capacity=2,
        num_layers=2, num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1,
        dropout_rate=dropout_rate, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip


def _block(dtype=torch.float32):
    torch.manual_seed(0)
    return randomize(SwitchTransformersSparseMLP(_config())).to(dtype).eval()


def _ref_choice(ref, x):
    """The router's kept one-hot choices ``[T, E]`` and each kept token's weight."""
    mask, probs, _ = ref.router(x)
    mask = mask.reshape(-1, E).bool()
    return mask, torch.where(mask, probs.reshape(-1, 1).float(), 0.0)


def test_block_fp32_outputs_routing_capacity_and_every_gradient():
    ref = _block()
    fast = from_hf(ref)
    assert isinstance(fast.moe.gate, HFSwitchRouterGate)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_y, fast_y = ref(ref_x), fast(fast_x)
    assert_close("output", ref_y, fast_y)
    ref_mask, ref_w = _ref_choice(ref, x)
    r = fast.moe.last_routing
    assert r.n_dropped > 0 and r.n_dropped == int((~ref_mask.any(-1)).sum())
    fast_mask = torch.zeros_like(ref_mask).index_put((r.token, r.expert), torch.tensor(True))
    assert torch.equal(ref_mask, fast_mask)
    # Capacity is per sequence: at most 2 tokens of each sequence on each expert.
    assert int(fast_mask.reshape(3, 7, E).sum(1).max()) <= 2
    assert_close("combine weights", ref_w, r.combine_matrix().float())
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref_y.backward(g)
    fast_y.backward(g)
    assert_close("grad input", ref_x.grad, fast_x.grad)
    assert_grads_match_in_hf_layout(ref, fast)


def test_block_bf16_is_bit_identical_and_round_trips():
    assert_bf16_block_bit_identical_and_round_trips(_block(torch.bfloat16), D)


def test_training_with_expert_dropout_refuses():
    torch.manual_seed(0)
    fast = from_hf(SwitchTransformersSparseMLP(_config(dropout_rate=0.1)).eval())
    fast.train()
    with pytest.raises(RuntimeError, match="dropout"):
        fast(torch.randn(1, 3, D))
    fast.eval()(torch.randn(1, 3, D))


def test_model_patch_generate_router_logits_save_and_reload(tmp_path):
    torch.manual_seed(0)
    cls = transformers.SwitchTransformersForConditionalGeneration
    ref = randomize(cls(_config())).eval()
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swaps = patch_model(fast)
    assert len(swaps) == 2 and {s.family for s in swaps} == {"switch_transformers"}
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    dec = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(input_ids=ids, decoder_input_ids=dec, output_router_logits=True)
    with torch.no_grad():
        ref_out, fast_out = ref(**kw), fast(**kw)
    assert_close("logits", ref_out.logits, fast_out.logits)
    for name in ("encoder_router_logits", "decoder_router_logits"):
        ref_l, fast_l = getattr(ref_out, name), getattr(fast_out, name)
        assert len(ref_l) == len(fast_l) > 0
        for a, b in zip(ref_l, fast_l, strict=True):
            assert_close(name, a, b)
    ref16, fast16 = copy.deepcopy(ref).bfloat16(), copy.deepcopy(fast).bfloat16()
    gen = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(ref16.generate(ids[:1], **gen), fast16.generate(ids[:1], **gen))
    fast.save_pretrained(tmp_path)
    back = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close("reloaded logits", ref(input_ids=ids, decoder_input_ids=dec).logits, back(input_ids=ids, decoder_input_ids=dec).logits)
    assert [s.name for s in unpatch_model(fast)] == [s.name for s in swaps]
    with torch.no_grad():
        assert_close("unpatched logits", ref_out.logits, fast(**kw).logits)
