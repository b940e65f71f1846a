"""Muse-Spark (`MuseSparkMoE`): experts at their own width between two projections, each
expert's output normalised before it is weighted (`HFProjectedExpertsMoE`), the original
router kept (`HFRouterGate`).

Sides are named ``ref_*`` (transformers) and ``fast_*`` (gatedmoe). float32: outputs, chosen
experts, combine weights and every gradient; bf16: within transformers' own bf16 error; the
text model's hidden states and router logits; round trips through `to_hf`, `unpatch_model`
and ``save_pretrained``. (Muse-Spark has no text-only causal LM to generate with.)
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig  # noqa: E402
from transformers.models.muse_spark.modeling_muse_spark import MuseSparkTextModel  # noqa: E402

from gatedmoe.interop.hf import from_hf  # noqa: E402
from gatedmoe.interop.hf.adapter import HFProjectedExpertsMoE  # noqa: E402
from interop.hf_checks import (  # noqa: E402
    assert_bf16_block_within_transformers_error_and_round_trips,
    assert_combine_weights_match,
    assert_fp32_block_matches,
    assert_patched_copy_matches,
    assert_reloads_and_unpatches,
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

    def check_routing(x, r):
        _, ref_w, ref_i = ref.gate(x)
        assert_combine_weights_match(torch.zeros(14, E).scatter(1, ref_i, ref_w), r)

    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    assert_fp32_block_matches(ref, fast, x, check_routing, missing_is_zero=True)


def test_block_bf16_within_transformers_rounding_and_round_trips():
    # gatedmoe sums the weighted, normalised expert outputs in float32 and rounds once.
    assert_bf16_block_within_transformers_error_and_round_trips(_block(torch.bfloat16), D)


def test_text_model_patch_router_logits_save_and_reload(tmp_path):
    ref = _model()
    run = assert_patched_copy_matches(
        ref, ["muse_spark", "muse_spark"], router_logit_layers=2, output=lambda out: out.last_hidden_state, what="hidden states"
    )
    assert_reloads_and_unpatches(run, tmp_path)
