"""PEFT export of expert LoRA (`gatedmoe.interop.hf.peft_export`).

``fast_*``: a tiny random Hugging Face MoE model after `patch_model`, with gatedmoe's
`ExpertLoRA` on every block (random non-zero factors). ``ref_*``: the original model with
the exported adapter loaded by PEFT itself (``PeftModel.from_pretrained``, ParamWrapper on
``experts.gate_up_proj`` / ``experts.down_proj``). float32: logits and the gradient of
every adapter factor; the saved keys and shapes are those PEFT's own ``get_peft_model``
gives for the same config.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gatedmoe.interop.hf import (  # noqa: E402
    HFMoEBlock,
    load_peft_adapter,
    patch_model,
    peft_lora_state_dict,
    save_peft_adapter,
)
from interop.hf_tiny import randomize, tiny_config  # noqa: E402

RANK, ALPHA = 3, 5.0


def _hf_model(model_type: str):
    if model_type == "llama4":
        # Every layer an MoE layer; the text model alone.
        cfg = transformers.Llama4TextConfig(
            hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
            max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    else:
        cfg, _ = tiny_config(model_type)
    if model_type == "deepseek_v3":
        cfg.num_key_value_heads = cfg.num_attention_heads  # multi-head latent attention
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return randomize(model).eval()


def _with_lora(model):
    fast = copy.deepcopy(model)
    patch_model(fast)
    gen = torch.Generator().manual_seed(1)
    for block in fast.modules():
        if isinstance(block, HFMoEBlock):
            lora = block.moe.experts.add_lora(RANK, ALPHA)
            with torch.no_grad():
                for p in lora.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return fast


def _lora_grads_as_peft(fast):
    """The same layout map applied to the adapters' gradients instead of their values."""
    saved = {}
    for block in fast.modules():
        if isinstance(block, HFMoEBlock):
            for p in block.moe.experts.lora.parameters():
                saved[p] = p.data
                p.data = p.grad
    try:
        return peft_lora_state_dict(fast)[0]
    finally:
        for p, data in saved.items():
            p.data = data


# The three layouts: [E, out, in] (Qwen3-MoE's converter is OLMoE's too; GLM-4-MoE stands
# for the generic families), [E, in, out] without is_transposed (Llama 4) and with it and
# interleaved gate/up columns (GPT-OSS).
@pytest.mark.parametrize(
    "model_type", ["qwen3_moe", "mixtral", "llama4", "gpt_oss", "qwen2_moe", "deepseek_v3", "glm4_moe"]
)
def test_peft_loads_the_export_and_computes_the_same(model_type, tmp_path):
    ref_base = _hf_model(model_type)
    fast = _with_lora(ref_base)
    save_peft_adapter(fast, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (RANK, 5, [])

    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_logits = ref_base(ids).logits
    ref = peft.PeftModel.from_pretrained(ref_base, tmp_path, is_trainable=True)
    # Keys and shapes: what PEFT itself builds for this config (it warns, not fails, on a
    # missing key).
    expected = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(ref).items()}
    exported, _ = peft_lora_state_dict(fast)
    assert {k: tuple(v.shape) for k, v in exported.items()} == expected

    ref_logits, fast_logits = ref(ids).logits, fast(ids).logits
    assert_close("logits", ref_logits, fast_logits)
    # The adapter matters: without it the logits are those of the base model.
    assert not torch.allclose(base_logits, fast_logits, atol=1e-3)

    g = torch.randn(ref_logits.shape, generator=torch.Generator().manual_seed(3))
    (ref_logits * g).sum().backward()
    (fast_logits * g).sum().backward()
    ref_grads = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if "lora_" in n}
    fast_grads = _lora_grads_as_peft(fast)
    assert set(ref_grads) == set(fast_grads)
    for name in ref_grads:
        assert_close(f"grad {name}", ref_grads[name], fast_grads[name])


@pytest.mark.parametrize("model_type", ["qwen3_moe", "llama4", "gpt_oss"])
def test_loads_what_peft_saves(model_type, tmp_path):
    """An adapter made and saved by PEFT itself (random factors) loads into the patched
    model: same logits as PEFT's model, and exporting it again gives PEFT's tensors."""
    from safetensors.torch import load_file

    ref_base = _hf_model(model_type)
    fast = copy.deepcopy(ref_base)
    patch_model(fast)
    config = peft.LoraConfig(r=RANK, lora_alpha=7, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    ref = peft.get_peft_model(ref_base, config)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ref.save_pretrained(tmp_path)
    loaded = load_peft_adapter(fast, tmp_path)
    assert len(loaded) == 2
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    assert_close("logits", ref(ids).logits, fast(ids).logits)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    exported, _ = peft_lora_state_dict(fast)
    assert set(saved) == set(exported)
    for k in saved:
        assert torch.equal(saved[k], exported[k]), k


def test_load_refuses_what_it_cannot_express(tmp_path):
    fast = _with_lora(_hf_model("qwen3_moe"))
    save_peft_adapter(fast, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(ValueError, match="use_rslora"):
        load_peft_adapter(_with_lora(_hf_model("qwen3_moe")), tmp_path)
    other = _hf_model("mixtral")
    patch_model(other)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the experts need"):
        load_peft_adapter(other, tmp_path)
    assert all(b.moe.experts.lora is None for b in other.modules() if isinstance(b, HFMoEBlock))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(3, 32)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="no expert block of the model takes"):
        load_peft_adapter(_with_lora(_hf_model("qwen3_moe")), tmp_path)


def test_export_refuses_what_it_cannot_map():
    model = _hf_model("qwen3_moe")
    patch_model(model)
    with pytest.raises(ValueError, match="no HFMoEBlock with LoRA"):
        peft_lora_state_dict(model)
    blocks = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    blocks[0].moe.experts.add_lora(2)
    blocks[1].moe.experts.add_lora(4)
    with pytest.raises(ValueError, match="one rank and alpha"):
        peft_lora_state_dict(model)
    blocks[1].moe.experts.merge_lora()
    with pytest.raises(ValueError, match="unmerge_lora"):
        peft_lora_state_dict(model)
