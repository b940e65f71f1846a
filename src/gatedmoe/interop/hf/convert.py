"""Converting Hugging Face MoE blocks and whole models: `from_hf`, `to_hf`, `patch_model`,
`unpatch_model` and the `Swap` records they return.

* `from_hf(block)`: an `HFMoEBlock` (gatedmoe's `MoE` plus what the family needs) that
  computes what ``block`` computes, with the same call signature and return convention.
* `to_hf(moe, like=block)`: the Hugging Face block class again, with gatedmoe's weights.
* `patch_model(model)`: swap every supported MoE block of a model in place; returns the
  list of swaps. `unpatch_model(model)` swaps them back.

Supported blocks (transformers >= 5.20, fused 3-D expert weights): Mixtral, Qwen2-MoE (gated
shared expert), Qwen3-MoE, OLMoE, DeepSeek-V3 (sigmoid group-limited routing, correction
bias, routed scaling, shared experts), GPT-OSS (router bias, clamped SwiGLU, expert
biases), Llama 4, Switch Transformers (top-1 with per-sequence capacity), DBRX (Lp-normalised
top-k), JetMoE's MLP mixture (output bias), LongCat-Flash (zero-computation experts),
Inkling (router-weighted shared experts), Doge (product keys), Muse-Spark (projected,
normalised experts) and the families of `families.GENERIC` (original router kept as the
gate; clamped and soft-capped GLUs, token-id and stateful routers, routed scaling, a norm
after the block, transposed or plain experts). transformers itself is never imported here:
blocks are recognised by class name.

Examples
--------
>>> import torch
>>> from transformers import MixtralConfig, MixtralForCausalLM  # doctest: +SKIP
>>> model = MixtralForCausalLM(MixtralConfig(hidden_size=32, ...))  # doctest: +SKIP
>>> swaps = patch_model(model)  # doctest: +SKIP
>>> [s.name for s in swaps]  # doctest: +SKIP
['model.layers.0.mlp', 'model.layers.1.mlp']
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from gatedmoe.dispatch import check_backend_name
from gatedmoe.interop.hf.adapter import HFMoEBlock
from gatedmoe.interop.hf.families import FAMILIES, family_of, meta_copy
from gatedmoe.layers.moe import MoE
from gatedmoe.validation import boolean

__all__ = ["from_hf", "to_hf", "patch_model", "unpatch_model", "supported_blocks", "Swap", "PatchReport"]

log = logging.getLogger(__name__)


def supported_blocks() -> list[str]:
    """Class names of the Hugging Face MoE blocks gatedmoe converts."""
    return sorted(FAMILIES)


def from_hf(block: nn.Module, *, backend: str = "auto", check_inputs: bool = True) -> HFMoEBlock:
    """Convert one Hugging Face MoE block to gatedmoe.

    Parameters
    ----------
    block : nn.Module
        A block whose class is in `supported_blocks` (e.g. ``MixtralSparseMoeBlock``).
        Its weights are copied (same dtype, device and ``requires_grad``); it is not changed.
    backend : str
        Dispatch backend of the new `MoE` (default "auto").
    check_inputs : bool
        Let the `MoE` raise on NaN/inf inputs (one device sync per forward; default True).

    Returns
    -------
    HFMoEBlock
        Same forward signature and return value as ``block``; the gatedmoe layer is its
        ``.moe``. Raises TypeError for an unsupported block or layout. Its ``state_dict``
        is in the original block's layout (keys and shapes), and ``load_state_dict``
        accepts that layout too, so checkpoints of patched and unpatched models are
        interchangeable (``save_pretrained`` writes what ``from_pretrained`` reads);
        ``adapter.moe.state_dict()`` gives gatedmoe's own layout.

    Examples
    --------
    >>> gm = from_hf(model.model.layers[0].mlp)  # doctest: +SKIP
    >>> torch.testing.assert_close(gm(x), model.model.layers[0].mlp(x))  # doctest: +SKIP
    """
    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
    check_backend_name(backend)
    boolean("check_inputs", check_inputs)
    _check_not_meta(block, f"from_hf({type(block).__name__})")
    adapter = family_of(block).read(block, backend, check_inputs)
    adapter.register_state_dict_post_hook(_hf_layout_state_dict)
    adapter.register_load_state_dict_pre_hook(_load_hf_layout)
    return adapter


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _check_not_meta(block: nn.Module, what: str) -> None:
    """ValueError if ``block`` holds a tensor on the meta device: conversion copies weights,
    and a meta tensor has none (a model built under ``torch.device("meta")``)."""
    for name, t in [*block.named_parameters(), *block.named_buffers()]:
        if t.is_meta:
            raise ValueError(
                f"{what}: {name} is on the meta device (no weights to copy); load or materialize "
                "the model (from_pretrained, to_empty + load_state_dict) before converting it"
            )


def to_hf(moe: HFMoEBlock | MoE, like: nn.Module | None = None) -> nn.Module:
    """Convert back to a Hugging Face block of the class of ``like``.

    Parameters
    ----------
    moe : HFMoEBlock or MoE
        An `HFMoEBlock` from `from_hf` or `patch_model`, or a bare `MoE` whose gate and
        experts match the family (e.g. a top-k softmax `MoE` into a Mixtral block).
    like : nn.Module, optional
        A block of the target class and configuration; it is not changed (only its
        structure is copied). Optional for an `HFMoEBlock`, which remembers its original.

    Returns
    -------
    nn.Module
        A new block of ``type(like)`` holding copies of gatedmoe's weights. ValueError if
        the two sides would not compute the same function (top-k, normalisation, shapes,
        activation, shared experts, ...).
    """
    if isinstance(moe, HFMoEBlock):
        adapter = moe
        like = adapter.template if like is None else like
        if like is None:
            raise ValueError("to_hf: this HFMoEBlock has no template; pass like=<a Hugging Face block>")
    elif isinstance(moe, MoE):
        if like is None:
            raise ValueError("to_hf: converting a bare MoE needs like=<a Hugging Face block>")
        adapter = HFMoEBlock(moe, family=family_of(like).name, hf_class=type(like).__name__)
    else:
        raise TypeError(f"moe must be an HFMoEBlock or MoE, got {type(moe).__name__}")
    family = family_of(like)
    block = meta_copy(like)
    family.write(adapter, block)
    for name, t in [*block.named_parameters(), *block.named_buffers()]:
        if t.is_meta:
            raise RuntimeError(f"to_hf({type(like).__name__}): {name} was not written")
    return block.train(adapter.training)


@dataclass(frozen=True)
class Swap:
    """One module replaced by `patch_model` or `unpatch_model`."""

    name: str
    """Qualified name in the model, e.g. ``model.layers.0.mlp``."""
    hf_class: str
    """Class name of the Hugging Face block."""
    family: str
    """Converter family, e.g. ``mixtral``."""
    n_experts: int
    k: int


class PatchReport(list):
    """What `patch_model` did: a list of the `Swap` s made, in module order, and in
    ``skipped`` the ``(name, class name, reason)`` of every MoE block left as it was."""

    def __init__(self, swaps: list[Swap] = (), skipped: list[tuple[str, str, str]] = ()) -> None:
        super().__init__(swaps)
        self.skipped: list[tuple[str, str, str]] = list(skipped)


# ----------------------------------------------------------- checkpoints in HF layout
def _hf_layout_state_dict(module: HFMoEBlock, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post hook: replace gatedmoe's keys under ``prefix`` by the original
    block's (what `to_hf` would hold), so a patched model saves the Hugging Face layout."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    with torch.no_grad():
        block = to_hf(module)
    for key, t in block.state_dict().items():
        state_dict[prefix + key] = t.detach()


def _load_hf_layout(
    module: HFMoEBlock, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """Load-state-dict pre hook: a state dict in the original block's layout (all of its
    keys under ``prefix``) is converted to gatedmoe's keys before loading."""
    template = module.template
    if template is None:
        return
    hf_keys = list(template.state_dict())
    if not hf_keys or not all(prefix + k in state_dict for k in hf_keys):
        return
    block = meta_copy(template)
    block.load_state_dict({k: state_dict.pop(prefix + k) for k in hf_keys}, strict=True, assign=True)
    with torch.no_grad():
        converted = family_of(block).read(block, module.moe.backend, module.moe.check_inputs)
    for key, t in converted.state_dict(prefix=prefix).items():
        state_dict[key] = t


# ------------------------------------------------------------ transformers' output hooks
def _has_capture_hook(module: nn.Module) -> bool:
    return any(getattr(h, "__name__", "") == "output_capturing_hook" for h in module._forward_hooks.values())


def _capture_tasks(owner: nn.Module) -> list:
    """``(key, OutputRecorder)`` pairs of a transformers model's ``_can_record_outputs``,
    normalised as transformers' ``install_all_output_capturing_hooks`` does."""
    from transformers.utils.output_capturing import OutputRecorder

    tasks = []
    for key, specs in (getattr(owner, "_can_record_outputs", None) or {}).items():
        for spec in specs if isinstance(specs, list) else [specs]:
            if not isinstance(spec, OutputRecorder):
                index = 0 if "hidden_states" in key else 1
                named = isinstance(spec, str)
                spec = OutputRecorder(target_class=None if named else spec, index=index, class_name=spec if named else None)
            tasks.append((key, spec))
    return tasks


def _rehook(model: nn.Module, names: list[str]) -> None:
    """transformers installs its output-capturing forward hooks (``router_logits``,
    ``hidden_states``, ...) once, at a model's first forward that records outputs. Modules
    swapped in after that get the hooks their owner's ``_can_record_outputs`` asks for
    (routers rebuilt by `unpatch_model`, router taps and routers of `patch_model`);
    modules that carry one already (copied with their hooks) are left alone."""
    owners = [(n, m) for n, m in model.named_modules() if getattr(m, "_output_capturing_hooks_installed", False)]
    if not owners or not names:
        return
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:  # pragma: no cover - other transformers versions
        log.warning("could not hook transformers' output recording into the swapped blocks")
        return
    for name in names:
        inside = [(n, m) for n, m in owners if not n or name.startswith(n + ".")]
        if not inside:
            continue
        owner = max(inside, key=lambda nm: len(nm[0]))[1]
        tasks = _capture_tasks(owner)
        for sub_name, sub in model.get_submodule(name).named_modules():
            full = "." + name + ("." + sub_name if sub_name else "")
            if _has_capture_hook(sub):
                continue
            for key, spec in tasks:
                hit = (spec.target_class is not None and isinstance(sub, spec.target_class)) or (
                    spec.class_name is not None and full.endswith(spec.class_name)
                )
                if hit and spec.layer_name is not None:
                    hit = "." + spec.layer_name.strip(".") + "." in full + "."
                if hit:
                    install_output_capuring_hook(sub, key, spec.index, spec.capture_initial_hidden_state)


def _swap_in(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _looks_like_moe_block(module: nn.Module) -> bool:
    """A module holding an ``experts`` submodule (transformers' MoE blocks all do)."""
    return isinstance(getattr(module, "experts", None), nn.Module)


def patch_model(model: nn.Module, *, backend: str = "auto", check_inputs: bool = True) -> PatchReport:
    """Replace every supported Hugging Face MoE block in ``model`` by `from_hf` of it.

    The model keeps its forward, outputs, losses (``output_router_logits=True`` included),
    and its state dict: keys and layout of the original (see `from_hf`), so
    ``save_pretrained`` writes a checkpoint ``from_pretrained`` reloads as the same model.
    Optimizers built before the call still hold the old blocks' parameters: build them after.

    Warns (UserWarning) naming every MoE block it leaves as it is (an unsupported class, or
    a setting gatedmoe does not express), and when it converts nothing. Blocks patched
    by an earlier call are left as they are, without a warning: patching twice is a no-op.

    Returns
    -------
    PatchReport
        A list of the `Swap` s made, in module order, with ``.skipped`` listing the MoE
        blocks not converted and why; also logged.

    Examples
    --------
    >>> swaps = patch_model(model)  # doctest: +SKIP
    >>> swaps[0]  # doctest: +SKIP
    Swap(name='model.layers.0.mlp', hf_class='MixtralSparseMoeBlock', family='mixtral', n_experts=8, k=2)
    """
    _check_module(model)
    check_backend_name(backend)
    boolean("check_inputs", check_inputs)
    report = PatchReport()
    # Blocks converted by an earlier call: left as they are, and nothing inside them (their
    # gatedmoe `MoE` holds ``experts`` too) is reported as an unconverted MoE block.
    patched = [n for n, m in model.named_modules() if isinstance(m, HFMoEBlock)]
    for name, module in list(model.named_modules()):
        done = [*patched, *(s.name for s in report), *(s[0] for s in report.skipped)]
        if any(name == d or name.startswith(d + ".") for d in done):
            continue
        cls = type(module).__name__
        if cls not in FAMILIES:
            if _looks_like_moe_block(module):
                report.skipped.append((name, cls, "no gatedmoe converter for this class"))
            continue
        if not name:
            raise ValueError("patch_model: model is itself an MoE block; use from_hf(model)")
        # Raised, not skipped: no block of a meta-device model can be converted.
        _check_not_meta(module, f"patch_model: {name}")
        try:
            new = from_hf(module, backend=backend, check_inputs=check_inputs)
        except (TypeError, ValueError) as err:
            report.skipped.append((name, cls, str(err)))
            continue
        _swap_in(model, name, new)
        report.append(Swap(name, new.hf_class, new.family, new.moe.n_experts, new.moe.gate.k))
    _rehook(model, [s.name for s in report])
    log.info("patch_model: swapped %d MoE blocks: %s", len(report), ", ".join(s.name for s in report))
    if report.skipped:
        listed = "; ".join(f"{n} ({c}: {why})" for n, c, why in report.skipped)
        warnings.warn(f"patch_model: left {len(report.skipped)} MoE blocks as they were: {listed}", stacklevel=2)
    if patched:
        log.info("patch_model: %d MoE blocks were already patched: %s", len(patched), ", ".join(patched))
    if not report and not patched:
        warnings.warn(
            f"patch_model: converted no MoE block of {type(model).__name__} "
            f"(supported: {', '.join(supported_blocks())})",
            stacklevel=2,
        )
    return report


def unpatch_model(model: nn.Module) -> list[Swap]:
    """Undo `patch_model`: replace every `HFMoEBlock` by `to_hf` of it. Returns the swaps.

    If transformers already hooked the model for output recording, the rebuilt blocks are
    hooked too (``output_router_logits=True`` keeps working)."""
    _check_module(model)
    swaps: list[Swap] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, HFMoEBlock):
            _swap_in(model, name, to_hf(module))
            swaps.append(Swap(name, module.hf_class, module.family, module.moe.n_experts, module.moe.gate.k))
    _rehook(model, [s.name for s in swaps])
    return swaps
