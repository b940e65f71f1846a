"""Muse-Spark (`MuseSparkMoE`): experts at their own width between two projections, each
expert's output normalised before it is weighted (`HFProjectedExpertsMoE`), the original
router kept (`HFRouterGate`).

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). float32: outputs, chosen
experts, combine weights and every gradient; bf16: within transformers' own bf16 error; the
text model's hidden states and router logits; round trips through `to_hf`, `unpatch_model`
and ``save_pretrained``. (Muse-Spark has no text-only causal LM to generate with.)
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig  # noqa: E402
from transformers.models.muse_spark.modeling_muse_spark import MuseSparkTextModel  # noqa: E402

from gatedmoe.interop.hf import from_hf, patch_model, unpatch_model  # noqa: E402
from gatedmoe.interop.hf.adapter import HFProjectedExpertsMoE  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_error_within_transformers,
    assert_grads_match_in_hf_layout,
    assert_round_trips_to_hf_layout,
)
from interop.hf_tiny import _shrunk, randomize  # noqa: E402

D, M, E = 32, 24, 8


def _model():
    cfg = _shrunk(MuseSparkTextConfig, {"moe_hidden_size": M})
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    return randomize(MuseSparkTextModel(cfg)).eval()


def _block(dtype=torch.float32):
    block = _model().layers[0].mlp.to(dtype)
    block.gate.float()  # _keep_in_fp32_modules_strict: "mlp.gate.weight"
    return block


def test_block_fp32_outputs_routing_and_every_gradient():
    ref = _block()
    fast = from_hf(ref)
    assert isinstance(fast.moe, HFProjectedExpertsMoE) and fast.moe.experts.d_model == M
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_y, fast_y = ref(ref_x), fast(fast_x)
    assert_close("output", ref_y, fast_y)
    with torch.no_grad():
        _, ref_w, ref_i = ref.gate(x)
    want = torch.zeros(14, E).scatter(1, ref_i, ref_w)
    r = fast.moe.last_routing
    assert torch.equal(want > 0, r.combine_matrix() > 0)
    assert_close("combine weights", want, r.combine_matrix())
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
    # gatedmoe sums the weighted, normalised expert outputs in float32 and rounds once.
    assert_bf16_error_within_transformers(want, ref_y, fast_y)
    assert_round_trips_to_hf_layout(ref16, fast16)


def test_text_model_patch_router_logits_save_and_reload(tmp_path):
    ref = _model()
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every MoE block converts
        swaps = patch_model(fast)
    assert [s.family for s in swaps] == ["muse_spark", "muse_spark"]
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_out, fast_out = ref(ids, output_router_logits=True), fast(ids, output_router_logits=True)
    assert_close("hidden states", ref_out.last_hidden_state, fast_out.last_hidden_state)
    assert len(ref_out.router_logits) == len(fast_out.router_logits) == 2
    for a, b in zip(ref_out.router_logits, fast_out.router_logits, strict=True):
        assert_close("router logits", a, b)
    fast.save_pretrained(tmp_path)
    back = MuseSparkTextModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close("reloaded hidden states", ref_out.last_hidden_state, back(ids).last_hidden_state)
    assert [s.name for s in unpatch_model(fast)] == [s.name for s in swaps]
