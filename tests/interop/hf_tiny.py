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
    # Hybrid models: full attention only (what is tested is the MoE; their linear-attention
    # layers run a slow reference implementation without flash-linear-attention, and with no
    # attention layer transformers' cache cannot tell the sequence length).
    "qwen3_next": {"layer_types": ["full_attention", "full_attention"]},
    "nemotron_h": {"layers_block_type": ["attention", "moe"]},
    "kimi_linear": {"layer_types": ["full_attention", "full_attention"], "num_key_value_heads": 4},
    "dots3_note": {"num_key_value_heads": 4},
    "glm5_next": {"num_key_value_heads": 4, "qk_rope_head_dim": 0},
    "beam": {"mlp_layer_types": ["sparse", "sparse"]},
    "aria": {"moe_topk": 2},
    "zaya": {"router_hidden_size": 16, "num_experts_per_tok": 1},
    # Text and vision experts' widths.
    "ernie4_5_vl_moe": {"moe_intermediate_size": [32, 24]},
    # Multimodal rotary sections summing to qk_rope_head_dim / 2 = 4.
    "hy_v4_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
    "bailing_hybrid": {
        "mlp_layer_types": ["sparse", "sparse"], "num_experts_per_token": 2, "num_expert_group": 2,
        "layer_types": ["full_attention", "full_attention"], "num_key_value_heads": 4,
    },
    # Multi-head latent attention: as many key/value heads as query heads.
    **{mla: {"num_key_value_heads": 4} for mla in ("deepseek_v2", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "axk2", "axk1")},
}


# Settings a block needs that its config class does not declare (transformers 5.24's
# Qwen3-Omni talker config lacks the shared expert's width its block reads).
BLOCK_EXTRA = {"Qwen3OmniMoeTalkerTextSparseMoeBlock": {"shared_expert_intermediate_size": 48}}
# Arguments a block takes besides its config.
BLOCK_KW = {"Ernie4_5_VLMoeSparseMoeBlock": {"intermediate_size": 24}}

# Blocks built from a config class other than their folder's main one (folder, class name).
BLOCK_CONFIG = {
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": ("qwen3_omni_moe", "Qwen3OmniMoeTextConfig"),
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": ("qwen3_omni_moe", "Qwen3OmniMoeTalkerTextConfig"),
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
    if model_type in {folder for folder, _ in BLOCK_CONFIG.values()}:  # nested multimodal
        return None, None
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
    selection = ("e_score_correction_bias", "expert_bias", "balancing_biases")
    biases = [b for n, b in block.named_buffers() if n.rsplit(".", 1)[-1] in selection]
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
    if class_name in BLOCK_CONFIG:
        folder, config_name = BLOCK_CONFIG[class_name]
        module = importlib.import_module(f"transformers.models.{folder}.configuration_{folder}")
        cfg = _shrunk(getattr(module, config_name), EXTRA.get(model_type))
    else:
        _, cfg = tiny_config(model_type)
    for key, value in BLOCK_EXTRA.get(class_name, {}).items():
        setattr(cfg, key, value)
    # What a block inside a model runs by default (a bare block would run "eager").
    cfg._experts_implementation = "grouped_mm"
    cls = block_class(model_type, class_name)
    torch.manual_seed(seed)
    try:
        block = cls(cfg, **BLOCK_KW.get(class_name, {}))
    except TypeError:
        block = cls(cfg, layer_idx=0)
    return randomize(block, seed).eval()


def to_bf16(block: torch.nn.Module, model_type: str) -> torch.nn.Module:
    """``block`` in bf16 as a bf16 model holds it: parameters its model class keeps in float32
    (``_keep_in_fp32_modules(_strict)``, matched under ``mlp.``) stay float32."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    keep = set()
    for obj in vars(module).values():
        if inspect.isclass(obj) and obj.__name__.endswith("PreTrainedModel"):
            keep |= set(getattr(obj, "_keep_in_fp32_modules_strict", None) or [])
            keep |= set(getattr(obj, "_keep_in_fp32_modules", None) or [])
    block.to(torch.bfloat16)
    for name, p in block.named_parameters():
        if any(k in f"mlp.{name}" for k in keep if k.startswith("mlp.")):
            p.data = p.data.float()
    return block
