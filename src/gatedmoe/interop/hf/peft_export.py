"""Export the expert LoRA adapters of a patched Hugging Face model in PEFT's layout.

`gatedmoe.experts.lora.ExpertLoRA` adapters trained on the experts of a model converted
by `patch_model` are written as a PEFT LoRA adapter that targets the fused expert
parameters with ``target_parameters`` (PEFT >= 0.17, ``peft.tuners.lora.ParamWrapper``),
so ``PeftModel.from_pretrained(original_model, directory)`` runs the same function on the
unpatched model.

PEFT's layout for one 3-D parameter ``P [E, d1, d2]`` with rank R (read from
``ParamWrapper.update_layer`` / ``get_delta_weight`` in PEFT 0.21):

* ``lora_A.weight [E * R, in]``, row ``e * R + j`` (expert-major);
* ``lora_B.weight [out, R * E]``, column ``j * E + e`` (rank-major: PEFT reshapes it to
  ``[out, R, E]``);
* when the experts module has no ``is_transposed = True`` attribute, PEFT reads ``P`` as
  ``[E, out, in]`` and adds ``s * B_e A_e``; with it, as ``[E, in, out]`` and adds the
  transpose. ``s = lora_alpha / r``, as ours.
* Several parameters of one module are nested wrappers: the parameter the module
  registers first is wrapped first, so it is innermost and its keys carry one
  ``base_layer.`` per parameter wrapped after it.

Ours: ``w_in [E, H', D] += s B_in A_in``, ``w_out [E, D, H] += s B_out A_out``. For
families that store ``gate_up_proj [E, 2H, D]`` / ``down_proj [E, D, H]`` (Mixtral,
Qwen2/3-MoE, OLMoE, DeepSeek-V3 and the generic families of `families.GENERIC`: gate rows
first, as ours) the factors are PEFT's as they are, up to the reshapes above. Llama 4
stores them transposed without the attribute, so PEFT's B is our A transposed and its A
our B transposed. GPT-OSS, DBRX, Switch Transformers and JetMoE are not mapped.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from gatedmoe.experts.bank import ExpertBank
from gatedmoe.interop.hf.adapter import HFMoEBlock

__all__ = ["peft_lora_state_dict", "save_peft_adapter"]

# Families whose converter does not read the bank from ``gate_up_proj [E, 2H, D]`` /
# ``down_proj [E, D, H]`` as they are, and why; Llama 4 stores them transposed
# ([E, in, out]) without telling PEFT (no ``is_transposed``). Every other family is
# converted by ``families._fused_experts``: the bank is the HF parameter as it is.
_UNMAPPED = {
    "gpt_oss": "interleaved gate/up columns, is_transposed and expert biases",
    "dbrx": "flat per-expert weights (w1, v1, w2)",
    "switch_transformers": "one pair of nn.Linear per expert",
    "jetmoe": "input and output expert weights of its own layout",
}
_TRANSPOSED = {"llama4"}
_TARGETS = ("gate_up_proj", "down_proj")


def _peft_factors(A_ERI: Tensor, B_EOR: Tensor) -> tuple[Tensor, Tensor]:
    """Our ``A [E, R, in]``, ``B [E, out, R]`` as PEFT's ``lora_A.weight [E*R, in]`` and
    ``lora_B.weight [out, R*E]``."""
    E, R, _ = A_ERI.shape
    return A_ERI.reshape(E * R, -1), B_EOR.permute(1, 2, 0).reshape(B_EOR.shape[1], R * E)


def _block_tensors(name: str, block: HFMoEBlock) -> tuple[dict[str, Tensor], list[str]]:
    bank: ExpertBank = block.moe.experts
    lora = bank.lora
    if lora.merged:
        raise ValueError(f"{name}: the LoRA adapters are merged into the experts; unmerge_lora() before exporting")
    experts = getattr(block.template, "experts", None) if block.template is not None else None
    hf_params = dict(experts.named_parameters(recurse=False)) if experts is not None else {}
    if block.family in _UNMAPPED or not all(t in hf_params for t in _TARGETS):
        why = _UNMAPPED.get(block.family, "no experts.gate_up_proj / experts.down_proj")
        raise ValueError(f"{name}: PEFT export does not map {block.hf_class} ({why})")
    if getattr(experts, "is_transposed", False):
        raise ValueError(f"{name}: {type(experts).__name__} sets is_transposed, which this export does not map")
    factors = {"gate_up_proj": (lora.A_in, lora.B_in, bank.w_in), "down_proj": (lora.A_out, lora.B_out, bank.w_out)}
    # PEFT nests one wrapper per parameter in the module's registration order.
    order = [n for n in hf_params if n in _TARGETS]
    out: dict[str, Tensor] = {}
    for i, param in enumerate(order):
        A, B, W = factors[param]
        hf_shape = tuple(hf_params[param].shape)
        if block.family in _TRANSPOSED:
            # P_e = W_e^T and PEFT adds s B' A' to P_e: B' = A_e^T, A' = B_e^T.
            A, B = B.transpose(1, 2), A.transpose(1, 2)
            W = W.transpose(1, 2)
        if tuple(W.shape) != hf_shape:
            raise ValueError(f"{name}: experts.{param} is {hf_shape} in the model, {tuple(W.shape)} here")
        lora_A, lora_B = _peft_factors(A.detach(), B.detach())
        prefix = f"base_model.model.{name}.experts." + "base_layer." * (len(order) - 1 - i)
        out[prefix + "lora_A.weight"] = lora_A.contiguous()
        out[prefix + "lora_B.weight"] = lora_B.contiguous()
    return out, [f"{name}.experts.{p}" for p in order]


def peft_lora_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict]:
    """The expert LoRA adapters of ``model`` as a PEFT adapter: ``(tensors, config)``.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face model after `patch_model`, with ``add_lora`` called on the experts
        of one or more of its `HFMoEBlock` s (``block.moe.experts.add_lora(rank, alpha)``),
        all with the same rank and alpha, none merged.

    Returns
    -------
    tensors : dict
        PEFT's saved keys (``base_model.model.<block>.experts[.base_layer].lora_{A,B}.weight``)
        to detached tensors in the adapters' dtype: ``lora_A [E*R, in]``, ``lora_B [out, R*E]``.
    config : dict
        The ``adapter_config.json`` of a ``LoraConfig`` with ``r``, ``lora_alpha`` and
        ``target_parameters`` (the full names of the adapted ``experts.gate_up_proj`` and
        ``experts.down_proj``), no ``target_modules``, dropout 0, no bias.

    Raises ValueError when no block has adapters, when ranks or alphas differ, for merged
    adapters, for families whose expert layout is not mapped (GPT-OSS, DBRX, Switch,
    JetMoE) and when a block's expert shapes differ from the model's.
    """
    tensors: dict[str, Tensor] = {}
    targets: list[str] = []
    settings: set[tuple[int, float]] = set()
    for name, module in model.named_modules():
        if isinstance(module, HFMoEBlock) and module.moe.experts.lora is not None:
            lora = module.moe.experts.lora
            settings.add((lora.rank, lora.alpha))
            block_tensors, block_targets = _block_tensors(name, module)
            tensors.update(block_tensors)
            targets += block_targets
    if not tensors:
        raise ValueError("no HFMoEBlock with LoRA adapters in the model (patch_model, then moe.experts.add_lora)")
    if len(settings) > 1:
        raise ValueError(f"PEFT export needs one rank and alpha for every block, got {sorted(settings)}")
    ((rank, alpha),) = settings
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": [],
        "target_parameters": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return tensors, config


def save_peft_adapter(model: nn.Module, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write `peft_lora_state_dict` of ``model`` as ``adapter_model.safetensors`` and
    ``adapter_config.json`` in ``directory`` (created), what ``PeftModel.from_pretrained``
    reads. Returns the directory.

    Examples
    --------
    >>> patch_model(model)  # doctest: +SKIP
    >>> for block in model.modules():  # doctest: +SKIP
    ...     if isinstance(block, HFMoEBlock):
    ...         block.moe.experts.add_lora(rank=8, alpha=16)
    >>> ...  # train the adapters  # doctest: +SKIP
    >>> save_peft_adapter(model, "adapter")  # doctest: +SKIP
    >>> peft_model = PeftModel.from_pretrained(original_model, "adapter")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    tensors, config = peft_lora_state_dict(model)
    config["base_model_name_or_path"] = base_model_name_or_path
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: t.cpu() for k, t in tensors.items()}, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory

