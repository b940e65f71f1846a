"""``experts_implementation="gatedmoe"`` (`gatedmoe.interop.hf.kernels`): transformers' own
models, unpatched, with their experts executed by gatedmoe's dispatch.

Sides are named ``ref_*`` (transformers' default ``grouped_mm``, and ``eager``) and ``fast_*``
(gatedmoe). float32: logits and every parameter gradient; bf16: bit-identical logits to
``grouped_mm`` and the same greedy tokens through the KV cache.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

import gatedmoe.interop.hf  # noqa: E402,F401  (registers "gatedmoe")
from gatedmoe.interop.hf import kernels  # noqa: E402
from interop.hf_tiny import randomize, tiny_config  # noqa: E402

# Layouts: concatenated SwiGLU (mixtral), + gated shared expert (qwen2_moe), sigmoid
# group-limited router + shared experts (deepseek_v3), transposed interleaved clamped SwiGLU
# with biases (gpt_oss), non-GLU experts (nemotron_h), a generic-path family (glm4_moe), and
# Gemma-4, whose router and experts the decoder layer calls itself (no block patch_model could
# swap: this is how gatedmoe runs its experts).
FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "nemotron_h", "glm4_moe", "gemma4"]
_EXTRA = {
    "deepseek_v3": {"num_key_value_heads": 4},  # multi-head latent attention
    "gemma4": {"enable_moe_block": True, "top_k_experts": 2, "hidden_size_per_layer_input": 0},
}


def _model(family: str, experts_implementation: str = "grouped_mm"):
    from interop import hf_tiny

    saved = dict(hf_tiny.EXTRA)
    hf_tiny.EXTRA.update(_EXTRA)
    try:
        cfg, text_cfg = tiny_config(family)
        cfg = cfg or text_cfg  # multimodal (Gemma-4): its text model
    finally:
        hf_tiny.EXTRA.clear()
        hf_tiny.EXTRA.update(saved)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation=experts_implementation
    )
    return randomize(model).eval()


@pytest.fixture
def spy(monkeypatch):
    """Counts the experts calls gatedmoe executes."""
    calls = []
    view = kernels.experts_view
    monkeypatch.setattr(kernels, "experts_view", lambda e: calls.append(type(e).__name__) or view(e))
    return calls


def test_registered_name_is_accepted_by_transformers():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert kernels.NAME in ALL_EXPERTS_FUNCTIONS
    model = _model("mixtral", experts_implementation="gatedmoe")
    assert model.config._experts_implementation == "gatedmoe"
    with pytest.raises(ValueError, match="gatedmoe"):  # transformers lists it among the valid names
        model.set_experts_implementation("no_such_kernels")


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_and_every_gradient_match_transformers(family, spy):
    ref = _model(family)
    fast = copy.deepcopy(ref)
    fast.set_experts_implementation("gatedmoe")
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    ref_logits, fast_logits = ref(ids).logits, fast(ids).logits
    assert spy, "gatedmoe's experts forward did not run"
    assert_close("logits", ref_logits, fast_logits)
    g = torch.randn(ref_logits.shape, generator=torch.Generator().manual_seed(4))
    ref_logits.backward(g)
    fast_logits.backward(g)
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        q = fast_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(f"grad {name}", p.grad, q.grad)
    eager = copy.deepcopy(ref)
    eager.set_experts_implementation("eager")
    with torch.no_grad():
        assert_close("logits vs eager", eager(ids).logits, fast_logits.detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_bit_identical_to_grouped_mm(family, spy):
    ref = _model(family).bfloat16()
    fast = copy.deepcopy(ref)
    fast.set_experts_implementation("gatedmoe")
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_logits, fast_logits = ref(ids).logits, fast(ids).logits
    assert spy
    assert torch.equal(ref_logits, fast_logits), (ref_logits.float() - fast_logits.float()).abs().max()


def test_generate_and_reload_with_experts_implementation(tmp_path, spy):
    ref = _model("qwen2_moe").bfloat16()
    ref.save_pretrained(tmp_path)
    fast = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="gatedmoe"
    ).eval()
    assert fast.config._experts_implementation == "gatedmoe"
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(ids, **kw), fast.generate(ids, **kw))
    assert spy


def test_post_expert_norm_falls_back_to_grouped_mm_logged(caplog, spy):
    ref = _model("mixtral")
    fast = copy.deepcopy(ref)
    fast.set_experts_implementation("gatedmoe")
    for model in (ref, fast):
        for layer in model.model.layers:
            experts = layer.mlp.experts
            experts.has_post_expert_norm = True
            experts.post_expert_norm = torch.nn.LayerNorm(experts.hidden_dim, elementwise_affine=False)
    kernels._fallback_logged.clear()
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert torch.equal(ref(ids).logits, fast(ids).logits)
    assert not spy
    assert "has_post_expert_norm" in caplog.text


def test_register_other_name_and_backend():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    try:
        assert kernels.register_experts_implementation("gatedmoe_grouped", backend="grouped") == "gatedmoe_grouped"
        assert "gatedmoe_grouped" in ALL_EXPERTS_FUNCTIONS
        with pytest.raises(ValueError, match="unknown backend"):
            kernels.register_experts_implementation("x", backend="nope")
    finally:
        ExpertsInterface._global_mapping.pop("gatedmoe_grouped", None)


def test_autocast_runs_the_experts_as_transformers_eager_does(spy):
    """Under autocast transformers' eager experts (linear layers) multiply in bf16; gatedmoe's
    experts forward does too, and returns the input's dtype."""
    ref, fast = _model("mixtral", "eager"), _model("mixtral", "gatedmoe")
    experts_ref = next(m for m in ref.modules() if type(m).__name__.endswith("Experts"))
    experts_fast = next(m for m in fast.modules() if type(m).__name__.endswith("Experts"))
    torch.manual_seed(1)
    x = torch.randn(12, ref.config.hidden_size)
    weights, index = torch.rand(12, 2).softmax(-1), torch.randint(0, ref.config.num_local_experts, (12, 2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref_y = experts_ref(x, index, weights)
        fast_y = experts_fast(x, index, weights)
    assert spy and fast_y.dtype == torch.float32
    assert_close("y", ref_y.float(), fast_y, torch.bfloat16)
    # ... and not the float32 products: the bf16 rounding shows.
    exact = experts_ref(x, index, weights)
    assert (fast_y - exact).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["eager", "grouped_mm", "batched_mm", "", 3])
def test_register_refuses_transformers_own_names_and_non_strings(name):
    from transformers.integrations.moe import ExpertsInterface

    before = dict(ExpertsInterface._global_mapping)
    with pytest.raises(ValueError, match="name"):
        kernels.register_experts_implementation(name)
    assert ExpertsInterface._global_mapping == before
