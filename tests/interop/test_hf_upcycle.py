"""Upcycling Hugging Face dense models (Llama, Qwen2) into gatedmoe MoE layers: one MLP
and a whole tiny model in one call, the same logits at step 0."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gatedmoe import MoE, aux_loss  # noqa: E402
from gatedmoe.interop.hf import is_dense_mlp, upcycle_mlp, upcycle_model  # noqa: E402
from helpers import assert_close  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)  # fmt: skip


def _model(family: str) -> torch.nn.Module:
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**TINY)).eval()


@pytest.mark.parametrize("G", [1, 2])
def test_upcycle_mlp(G):
    mlp = _model("llama").model.layers[0].mlp
    assert is_dense_mlp(mlp)
    moe = upcycle_mlp(mlp, 8, k=2, granularity=G)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert_close("y", mlp(x), moe(x))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_upcycle_model_keeps_the_logits_at_step_0(family):
    model = _model(family)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    names = upcycle_model(model, n_experts=4, k=2, granularity=2)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(model.get_submodule(n), MoE) for n in names)
    with torch.no_grad():
        fast = model(ids).logits
    assert_close("logits", ref, fast)
    assert aux_loss(model) > 0
    with pytest.raises(ValueError, match="no dense gated MLP"):
        upcycle_model(model, n_experts=4)
