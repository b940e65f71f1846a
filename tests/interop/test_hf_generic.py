"""The generic converter (`gatedmoe.interop.hf.families.GENERIC`): each listed block class on
a tiny random config against transformers' own block and model.

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). float32: outputs,
chosen experts, combine weights and every gradient; bf16: bit-identical outputs and greedy
tokens; round trips through `to_hf`, `unpatch_model` and ``save_pretrained``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from gatedmoe.interop.hf import from_hf, patch_model, unpatch_model  # noqa: E402
from gatedmoe.interop.hf.families import GENERIC  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_error_within_transformers,
    assert_grads_match_in_hf_layout,
    assert_round_trips_to_hf_layout,
)
from interop.hf_tiny import randomize, tiny_block, tiny_config, to_bf16  # noqa: E402

# Families whose bf16 output is not bit-identical, with why; judged against float32: no
# larger an error than transformers' own (`assert_bf16_error_within_transformers`).
BF16_NOT_BITWISE: dict[str, str] = {
    # Step3p7Experts has no @use_experts_implementation: transformers' loop rounds each
    # expert's weighted output to bf16 and adds them one by one; gatedmoe sums in float32.
    "step3p7": "per-expert bf16 index_add in transformers",
}
# Families whose bf16 greedy tokens diverge from transformers' (blocks bit-identical), with why.
GENERATE_DIVERGES: dict[str, str] = {}
CASES = sorted((family, cls) for cls, (family, _) in GENERIC.items())
# A family with two block classes (Qwen3-Omni's thinker and talker) names the class too.
IDS = [family if sum(f == family for f, _ in CASES) == 1 else f"{family}:{cls}" for family, cls in CASES]


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _ids(block, layout, shape):
    """Input ids for a block whose router takes them (DeepSeek-V4's hash layers), else None."""
    if not (layout.token_ids and getattr(block, layout.token_ids)):
        return None
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(4))


def _ref_routing(block, layout, x_TD, ids=None):
    router = getattr(block, layout.router)
    args = [getattr(block, n, None) for n in layout.router_args] + ([] if ids is None else [ids])
    batched = layout.batched_input or layout.router_state
    out = router(x_TD.unsqueeze(0) if batched else x_TD, *args)
    w_TK, i_TK = out[1].reshape(x_TD.shape[0], -1), out[2].reshape(x_TD.shape[0], -1)
    E = block.experts.down_proj.shape[0]
    mask = torch.zeros(x_TD.shape[0], E, dtype=torch.bool).scatter(1, i_TK, True)
    dense = torch.zeros(x_TD.shape[0], E).scatter(1, i_TK, w_TK.float())
    return mask, dense


@pytest.mark.parametrize("family,cls", CASES, ids=IDS)
def test_block_fp32_outputs_routing_and_every_gradient(family, cls):
    ref = tiny_block(family, cls)
    fast = from_hf(ref)
    assert fast.family == family
    D = fast.moe.d_model
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    layout = GENERIC[cls][1]
    ids = _ids(ref, layout, (2, 7))
    kw = {} if ids is None else {"input_ids": ids}
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_out, fast_out = ref(ref_x, **kw), fast(fast_x, **kw)
    ref_y, fast_y = _out(ref_out), _out(fast_out)
    assert_close("output", ref_y, fast_y)
    # The same return convention: a tuple where the original returns one (router scores,
    # logits or the next router state), compared too.
    assert isinstance(ref_out, tuple) == isinstance(fast_out, tuple)
    if isinstance(ref_out, tuple):
        assert_close("second output", ref_out[1], fast_out[1])
    ref_mask, ref_w = _ref_routing(ref, layout, x.reshape(-1, D), ids)
    r = fast.moe.last_routing
    fast_mask = torch.zeros_like(ref_mask).index_put((r.token, r.expert), torch.tensor(True))
    assert_close("chosen experts", ref_mask, fast_mask)
    assert_close("combine weights", ref_w, r.combine_matrix().float())
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref_y.backward(g.reshape(ref_y.shape))
    fast_y.backward(g.reshape(fast_y.shape))
    assert_close("grad input", ref_x.grad, fast_x.grad)
    assert_grads_match_in_hf_layout(ref, fast, missing_is_zero=True)


@pytest.mark.parametrize("family,cls", CASES, ids=IDS)
def test_block_bf16_is_bit_identical_and_round_trips(family, cls):
    ref = to_bf16(tiny_block(family, cls), family)
    fast = from_hf(ref)
    x = torch.randn(3, 11, fast.moe.d_model, generator=torch.Generator().manual_seed(1)).bfloat16()
    ids = _ids(ref, GENERIC[cls][1], (3, 11))
    kw = {} if ids is None else {"input_ids": ids}
    with torch.no_grad():
        ref_y, fast_y = _out(ref(x, **kw)), _out(fast(x, **kw))
    assert fast_y.dtype == torch.bfloat16
    if family in BF16_NOT_BITWISE:
        with torch.no_grad():
            want = _out(copy.deepcopy(ref).float()(x.float(), **kw))
        assert_bf16_error_within_transformers(want, ref_y, fast_y)
    else:
        assert torch.equal(ref_y, fast_y), (ref_y.float() - fast_y.float()).abs().max()
    assert_round_trips_to_hf_layout(ref, fast)


def _model(family):
    cfg, _ = tiny_config(family)
    if cfg is None:
        pytest.skip(f"{family}: multimodal, its block is tested alone")
    torch.manual_seed(0)
    try:
        model = randomize(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")).eval()
        with torch.no_grad():
            model(torch.randint(3, 64, (1, 4)))
    except (ValueError, TypeError) as err:  # transformers itself cannot build or run this tiny config
        pytest.skip(f"{family}: the tiny causal LM does not run in transformers ({type(err).__name__}); block tested alone")
    return model


@pytest.mark.parametrize("family,cls", CASES, ids=IDS)
def test_model_patch_generate_save_and_reload(family, cls, tmp_path):
    ref = _model(family)
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every MoE block of these models converts
        swaps = patch_model(fast)
    assert swaps and {s.family for s in swaps} == {family}
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close("logits", ref(ids).logits, fast(ids).logits)
    # bf16: the same greedy tokens through the KV cache (a prefill and four cached steps: bf16
    # decoding on the CPU costs ~0.2 s a token, and this runs for every family).
    ref16, fast16 = copy.deepcopy(ref).bfloat16(), copy.deepcopy(fast).bfloat16()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    try:
        ref_tokens = ref16.generate(ids[:1], **kw)
    except ValueError:  # transformers' cache of this tiny hybrid model (linear attention only)
        ref_tokens = None
    if ref_tokens is not None and family not in GENERATE_DIVERGES:
        assert torch.equal(ref_tokens, fast16.generate(ids[:1], **kw))
    # save_pretrained of the patched model writes the original layout.
    fast.save_pretrained(tmp_path)
    back = type(ref).from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert_close("reloaded logits", ref(ids).logits, back(ids).logits)
    assert [s.name for s in unpatch_model(fast)] == [s.name for s in swaps]


def test_zaya_skip_class_routes_to_no_expert():
    # ZAYA1's extra router class: a token that picks it gets no expert (output 0).
    ref = tiny_block("zaya", "ZayaSparseMoeBlock")
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = ref.gate(x)[0].softmax(-1)
        # Only expert 0 and the skip class can win; half the tokens prefer each.
        ref.gate.balancing_biases[:] = 0.0
        ref.gate.balancing_biases[0] = 10.0
        ref.gate.balancing_biases[-1] = 10.0 + (p[:, 0] - p[:, -1]).median()
    fast = from_hf(ref)
    (ref_y, ref_state), (fast_y, fast_state) = ref(x), fast(x)
    skipped = fast.moe.last_routing.combine_matrix().sum(-1) == 0
    assert skipped.any() and not skipped.all()
    assert torch.equal(fast_y.reshape(-1, fast.moe.d_model)[skipped], torch.zeros_like(fast_y.reshape(-1, fast.moe.d_model)[skipped]))
    assert_close("output", ref_y, fast_y)
    assert_close("router state", ref_state, fast_state)


def test_privacy_filter_encoder_patch_save_and_reload(tmp_path):
    # OpenAI's privacy filter is a token-classification encoder (no generate, and its output
    # has no router logits): logits, save_pretrained / from_pretrained and unpatch.
    cfg, _ = tiny_config("openai_privacy_filter")
    torch.manual_seed(0)
    ref = randomize(transformers.AutoModelForTokenClassification.from_config(cfg)).eval()
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swaps = patch_model(fast)
    assert swaps and {s.family for s in swaps} == {"openai_privacy_filter"}
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_out, fast_out = ref(ids), fast(ids)
    assert_close("logits", ref_out.logits, fast_out.logits)
    fast.save_pretrained(tmp_path)
    back = type(ref).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close("reloaded logits", ref_out.logits, back(ids).logits)
    assert [s.name for s in unpatch_model(fast)] == [s.name for s in swaps]


def test_ernie_vl_modality_block_runs_converted_text_and_vision_blocks():
    # Ernie-4.5-VL's modality-isolated block stays and hands each converted per-modality block
    # its tokens (masked, flattened): outputs, router logits and gradients as the original.
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeMoeBlock

    _, cfg = tiny_config("ernie4_5_vl_moe")
    torch.manual_seed(0)
    ref = randomize(Ernie4_5_VLMoeMoeBlock(cfg)).eval()
    for sub in (ref.text_moe, ref.vision_moe):
        sub.experts.config._experts_implementation = "grouped_mm"
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swaps = patch_model(fast)
    assert sorted(s.name for s in swaps) == ["text_moe", "vision_moe"]
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    types = torch.rand(2, 7, generator=torch.Generator().manual_seed(2)) < 0.4  # vision tokens
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref_y, ref_logits), (fast_y, fast_logits) = ref(ref_x, types), fast(fast_x, types)
    assert_close("output", ref_y, fast_y)
    assert_close("router logits", ref_logits, fast_logits)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ref_y.backward(g)
    fast_y.backward(g)
    assert_close("grad input", ref_x.grad, fast_x.grad)
