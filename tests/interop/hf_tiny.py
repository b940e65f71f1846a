"""Tiny random Hugging Face MoE configs and blocks for the interop tests (no downloads).

`tiny_config(model_type)` shrinks the defaults of a transformers config class to a few
experts of width 32; `tiny_block` builds one MoE block of it with O(1) router logits.
"""

from __future__ import annotations

import importlib
import inspect

import torch

# Settings every MoE config family spells one of these ways; only the ones a config class
# knows are passed to it.
SHRINK = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
    max_position_embeddings=64, num_experts=8, n_routed_experts=8, num_local_experts=8, moe_num_experts=8,
    num_experts_per_tok=2, moe_k=2, first_k_dense_replace=0, n_group=2, topk_group=1,
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    decoder_sparse_step=1, mlp_only_layers=[], moe_layer_freq=1, expert_layer_period=1, expert_layer_offset=0,
    attn_layer_period=1, attn_layer_offset=0, linear_num_value_heads=2, linear_num_key_heads=2,
    linear_key_head_dim=8, linear_value_head_dim=8, num_shared_experts=1, n_shared_experts=1,
    moe_num_shared_experts=1, sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

# Per family: settings the defaults leave invalid at this size, or that select the
# variant gatedmoe converts.
EXTRA = {
    "cohere2_moe": {"shared_expert_combination_strategy": "sum"},
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_head": 8},
    "dots3_note": {"num_key_value_heads": 4},
    "glm5_next": {"num_key_value_heads": 4, "qk_rope_head_dim": 0},
    "beam": {"mlp_layer_types": ["sparse", "sparse"]},
    # Multi-head latent attention: as many key/value heads as query heads.
    **{mla: {"num_key_value_heads": 4} for mla in ("deepseek_v2", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "axk2", "axk1")},
}


def _shrunk(cls, extra: dict | None):
    try:
        keys = set(cls().to_dict())
    except Exception:
        keys = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in {**SHRINK, **(extra or {})}.items() if k in keys})


def tiny_config(model_type: str):
    """``(config for AutoModelForCausalLM or None, the config an MoE block takes)``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    sub = getattr(cls, "sub_configs", None) or {}
    if "text_config" in sub:  # multimodal: test the text model's block alone
        return None, _shrunk(sub["text_config"], EXTRA.get(model_type))
    cfg = _shrunk(cls, EXTRA.get(model_type))
    return cfg, cfg


def block_class(model_type: str, class_name: str):
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, class_name)


@torch.no_grad()
def randomize(block: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of std 0.3 (router logits O(1), so routing matters); biases and selection
    biases of either sign; hash-routing tables with k distinct experts per token id."""
    gen = torch.Generator().manual_seed(seed)
    # Buffers other than selection biases (rotary frequencies, masks) keep their values.
    biases = [b for n, b in block.named_buffers() if n.rsplit(".", 1)[-1] in ("e_score_correction_bias", "expert_bias")]
    for t in [*block.parameters(), *biases]:
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    # Hash routers' token -> experts tables (DeepSeek-V4's tid2eid [V, K]): k distinct
    # random experts per token id (the all-zero default sends every token to expert 0 k times).
    for name, t in block.named_buffers():
        if name.rsplit(".", 1)[-1] == "tid2eid":
            E = _owner(block, name).num_experts
            t.copy_(torch.stack([torch.randperm(E, generator=gen)[: t.shape[1]] for _ in range(t.shape[0])]))
    return block


def _owner(module: torch.nn.Module, name: str) -> torch.nn.Module:
    owner_name = name.rpartition(".")[0]
    return module.get_submodule(owner_name) if owner_name else module


def tiny_block(model_type: str, class_name: str, seed: int = 0) -> torch.nn.Module:
    _, cfg = tiny_config(model_type)
    # What a block inside a model runs by default (a bare block would run "eager").
    cfg._experts_implementation = "grouped_mm"
    cls = block_class(model_type, class_name)
    torch.manual_seed(seed)
    try:
        block = cls(cfg)
    except TypeError:
        block = cls(cfg, layer_idx=0)
    return randomize(block, seed).eval()
