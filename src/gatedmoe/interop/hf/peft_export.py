"""Export the expert LoRA adapters of a patched Hugging Face model in PEFT's layout, and
load PEFT's adapters into them.

`gatedmoe.experts.lora.ExpertLoRA` adapters trained on the experts of a model converted
by `patch_model` are written as a PEFT LoRA adapter that targets the fused expert
parameters with ``target_parameters`` (``peft.tuners.lora.ParamWrapper``; tested with PEFT 0.21),
so ``PeftModel.from_pretrained(original_model, directory)`` runs the same function on the
unpatched model; `load_peft_adapter` reads such an adapter (PEFT's own ``save_pretrained``
included) into the experts of a patched model.

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

Ours: ``w_in [E, H', D] += s B_in A_in``, ``w_out [E, D, H] += s B_out A_out``. Three
cases, by how the family stores the weights:

* ``gate_up_proj [E, 2H, D]`` / ``down_proj [E, D, H]`` (Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V3 and the generic families of `families.GENERIC`: gate rows first, as ours):
  the factors are PEFT's as they are, up to the reshapes above;
* transposed, ``[E, in, out]``, with ``is_transposed = True`` (GPT-OSS): the factors as
  they are too, PEFT transposes the product; GPT-OSS interleaves gate and up columns
  (``is_concatenated = False``), so the rows of ``B_in`` are interleaved the same way;
* transposed without the attribute (Llama 4): PEFT's B is our A transposed and its A our
  B transposed.

DBRX, Switch Transformers and JetMoE are not mapped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gatedmoe.experts.lora import ExpertLoRA
from gatedmoe.interop.hf.adapter import HFMoEBlock

__all__ = ["load_peft_adapter", "peft_lora_state_dict", "save_peft_adapter"]

# Families whose expert weights are not fused gate_up_proj / down_proj parameters, and why.
_UNMAPPED = {
    "dbrx": "flat per-expert weights (w1, v1, w2)",
    "switch_transformers": "one pair of nn.Linear per expert",
    "jetmoe": "input and output expert weights of its own layout",
}
# Families whose converter transposes the HF weights ([E, in, out]) although the experts
# module does not say so (no ``is_transposed``): PEFT reads them as [E, out, in].
_TRANSPOSED_UNTOLD = {"llama4"}
_TARGETS = ("gate_up_proj", "down_proj")


def _peft_factors(A_ERI: Tensor, B_EOR: Tensor) -> tuple[Tensor, Tensor]:
    """Our ``A [E, R, in]``, ``B [E, out, R]`` as PEFT's ``lora_A.weight [E*R, in]`` and
    ``lora_B.weight [out, R*E]``."""
    E, R, _ = A_ERI.shape
    return A_ERI.reshape(E * R, -1), B_EOR.permute(1, 2, 0).reshape(B_EOR.shape[1], R * E)


def _from_peft_factors(lora_A: Tensor, lora_B: Tensor, E: int) -> tuple[Tensor, Tensor]:
    """Inverse of `_peft_factors`: ``A [E, R, in]``, ``B [E, out, R]``."""
    R = lora_A.shape[0] // E
    return lora_A.reshape(E, R, -1), lora_B.reshape(lora_B.shape[0], R, E).permute(2, 0, 1)


@dataclass(frozen=True)
class _Param:
    """How one adapted HF parameter maps to our factors."""

    name: str  # "gate_up_proj" or "down_proj"
    prefix: str  # PEFT's key prefix, "base_model.model.<block>.experts.[base_layer.]"
    swap: bool  # PEFT's A is our B transposed and its B our A transposed (Llama 4)
    rows: Tensor | None  # PEFT's B row c is our B row rows[c] (GPT-OSS's interleaving)


def _block_layout(name: str, block: HFMoEBlock) -> list[_Param]:
    """Each adapted fused expert parameter of ``block`` at ``name``, in PEFT's nesting
    order; ValueError for what is not mapped."""
    experts = getattr(block.template, "experts", None) if block.template is not None else None
    hf_params = dict(experts.named_parameters(recurse=False)) if experts is not None else {}
    if block.family in _UNMAPPED or not all(t in hf_params for t in _TARGETS):
        why = _UNMAPPED.get(block.family, "no experts.gate_up_proj / experts.down_proj")
        raise ValueError(f"{name}: PEFT export does not map {block.hf_class} ({why})")
    bank = block.moe.experts
    told = bool(getattr(experts, "is_transposed", False))
    untold = block.family in _TRANSPOSED_UNTOLD
    interleaved = getattr(experts, "is_concatenated", True) is False
    # PEFT nests one wrapper per parameter in the module's registration order.
    order = [n for n in hf_params if n in _TARGETS]
    layout = []
    for i, param in enumerate(order):
        ours = bank.w_in if param == "gate_up_proj" else bank.w_out
        ours_shape = tuple(ours.transpose(1, 2).shape if told or untold else ours.shape)
        if ours_shape != tuple(hf_params[param].shape):
            raise ValueError(f"{name}: experts.{param} is {tuple(hf_params[param].shape)} in the model, {ours_shape} here")
        rows = None
        if interleaved and param == "gate_up_proj":
            # HF column c is gate c // 2 (c even) or up c // 2 (odd); ours: [gate | up].
            c = torch.arange(ours.shape[1])
            rows = c // 2 + (c % 2) * (ours.shape[1] // 2)
        prefix = f"base_model.model.{name}.experts." + "base_layer." * (len(order) - 1 - i)
        layout.append(_Param(param, prefix, untold, rows))
    return layout


def _factors(lora: ExpertLoRA, param: str) -> tuple[Tensor, Tensor]:
    return (lora.A_in, lora.B_in) if param == "gate_up_proj" else (lora.A_out, lora.B_out)


def _block_tensors(name: str, block: HFMoEBlock) -> tuple[dict[str, Tensor], list[str]]:
    lora = block.moe.experts.lora
    if lora.merged:
        raise ValueError(f"{name}: the LoRA adapters are merged into the experts; unmerge_lora() before exporting")
    out: dict[str, Tensor] = {}
    targets = []
    for p in _block_layout(name, block):
        A, B = (t.detach() for t in _factors(lora, p.name))
        if p.rows is not None:
            B = B[:, p.rows.to(B.device)]
        if p.swap:
            # P_e = W_e^T and PEFT adds s B' A' to P_e: B' = A_e^T, A' = B_e^T.
            A, B = B.transpose(1, 2), A.transpose(1, 2)
        lora_A, lora_B = _peft_factors(A, B)
        out[p.prefix + "lora_A.weight"] = lora_A.contiguous()
        out[p.prefix + "lora_B.weight"] = lora_B.contiguous()
        targets.append(f"{name}.experts.{p.name}")
    return out, targets


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
    adapters, for families whose expert layout is not mapped (DBRX, Switch, JetMoE) and
    when a block's expert shapes differ from the model's.
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



@torch.no_grad()
def load_peft_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Load a PEFT LoRA adapter on the fused expert weights (PEFT's ``save_pretrained`` of
    a ``LoraConfig`` with ``target_parameters``, or `save_peft_adapter`) into the experts of
    ``model``, a Hugging Face model after `patch_model`: the inverse of
    `peft_lora_state_dict`. Blocks without adapters get them (``add_lora(r, lora_alpha)``,
    base weights frozen); blocks with adapters must have the same rank (their alpha becomes
    the file's). Returns the names of the blocks loaded.

    Raises ValueError for a config this mapping does not express (not LoRA, dropout, DoRA,
    rsLoRA, LoRA biases, rank or alpha patterns, ``target_modules``), for blocks the export
    does not map, and for tensors of the file that no block takes (nothing is loaded then).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    unsupported = {
        "peft_type": config.get("peft_type") != "LORA",
        "lora_dropout": bool(config.get("lora_dropout")),
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "lora_bias": bool(config.get("lora_bias")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "target_modules": bool(config.get("target_modules")),
    }
    bad = [f"{k}={config.get(k)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"load_peft_adapter: {directory} has settings the expert LoRA does not express: {', '.join(bad)}")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    plan = []
    for name, block in model.named_modules():
        if not isinstance(block, HFMoEBlock):
            continue
        layout = _block_layout(name, block) if block.family not in _UNMAPPED else []
        keys = [p.prefix + f"lora_{ab}.weight" for p in layout for ab in "AB"]
        if layout and all(k in tensors for k in keys):
            plan.append((name, block, layout))
    used = {p.prefix + f"lora_{ab}.weight" for _, _, layout in plan for p in layout for ab in "AB"}
    left = sorted(set(tensors) - used)
    if left or not plan:
        raise ValueError(f"load_peft_adapter: no expert block of the model takes {left[:4] or sorted(tensors)[:4]}")
    # Everything converted and checked before anything is written.
    writes = []
    for name, block, layout in plan:
        bank = block.moe.experts
        if bank.lora is not None and (bank.lora.rank != rank or bank.lora.merged):
            raise ValueError(f"{name}: its adapters have rank {bank.lora.rank} (merged={bank.lora.merged}), the file {rank}")
        E, D, H = bank.n_experts, bank.d_model, bank.d_hidden
        for p in layout:
            lora_A, lora_B = tensors[p.prefix + "lora_A.weight"], tensors[p.prefix + "lora_B.weight"]
            if lora_A.shape[0] != E * rank or lora_B.shape[1] != E * rank:
                raise ValueError(f"{name}: {p.prefix}lora_* hold {lora_A.shape[0]} rows for {E} experts of rank {rank}")
            A_p, B_p = _from_peft_factors(lora_A, lora_B, E)
            A, B = (B_p.transpose(1, 2), A_p.transpose(1, 2)) if p.swap else (A_p, B_p)
            if p.rows is not None and B.shape[1] == p.rows.numel():
                B = B[:, torch.argsort(p.rows)]
            want = ((E, rank, D), (E, bank.w_in.shape[1], rank)) if p.name == "gate_up_proj" else ((E, rank, H), (E, D, rank))
            if (tuple(A.shape), tuple(B.shape)) != want:
                raise ValueError(f"{name}: the file's {p.name} factors are {tuple(A.shape)}, {tuple(B.shape)}; the experts need {want}")
            writes.append((block, p.name, A, B))
    for block, param, A, B in writes:
        bank = block.moe.experts
        lora = bank.lora if bank.lora is not None else bank.add_lora(rank, alpha)
        lora.alpha, lora.scale = alpha, alpha / rank
        ours_A, ours_B = _factors(lora, param)
        ours_A.copy_(A)
        ours_B.copy_(B)
    return [name for name, _, _ in plan]
