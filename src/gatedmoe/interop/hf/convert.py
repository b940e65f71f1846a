"""Converting Hugging Face MoE blocks and whole models: `from_hf`, `to_hf`, `patch_model`,
`unpatch_model` and the `Swap` records they return.

* `from_hf(block)`: an `HFMoEBlock` (gatedmoe's `MoE` plus what the family needs) that
  computes what ``block`` computes, with the same call signature and return convention.
* `to_hf(moe, like=block)`: the Hugging Face block class again, with gatedmoe's weights.
* `patch_model(model)`: swap every supported MoE block of a model in place; returns the
  list of swaps. `unpatch_model(model)` swaps them back.

Supported blocks (transformers >= 5.20, fused 3-D expert weights): Mixtral, Qwen2-MoE (gated
shared expert), Qwen3-MoE, OLMoE, DeepSeek-V3 (sigmoid group-limited routing, correction
bias, routed scaling, shared experts) and GPT-OSS (router bias, clamped SwiGLU, expert
biases). transformers itself is never imported here: blocks are recognised by class name.

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
from dataclasses import dataclass

from torch import nn

from gatedmoe.dispatch import check_backend_name
from gatedmoe.interop.hf.adapter import HFMoEBlock
from gatedmoe.interop.hf.families import FAMILIES, family_of, meta_copy
from gatedmoe.layers.moe import MoE

__all__ = ["from_hf", "to_hf", "patch_model", "unpatch_model", "supported_blocks", "Swap"]

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
        ``.moe``. Raises TypeError for an unsupported block or layout.

    Examples
    --------
    >>> gm = from_hf(model.model.layers[0].mlp)  # doctest: +SKIP
    >>> torch.testing.assert_close(gm(x), model.model.layers[0].mlp(x))  # doctest: +SKIP
    """
    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
    check_backend_name(backend)
    return family_of(block).read(block, backend, bool(check_inputs))


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


def _swap_in(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _hook_taps(model: nn.Module, adapters: list[HFMoEBlock]) -> None:
    """If transformers already installed its output-capturing hooks on ``model`` (they are
    installed at the first forward that records outputs), hook the new router taps too."""
    if not any(getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules()):
        return
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:  # pragma: no cover - other transformers versions
        log.warning("patch_model: could not hook router logits into an already-run model")
        return
    for a in adapters:
        if a.router_tap is not None:
            install_output_capuring_hook(a.router_tap, "router_logits", 0)


def patch_model(model: nn.Module, *, backend: str = "auto", check_inputs: bool = True) -> list[Swap]:
    """Replace every supported Hugging Face MoE block in ``model`` by `from_hf` of it.

    The model keeps its forward, outputs, losses (``output_router_logits=True`` included)
    and state-dict keys of everything but the swapped blocks. Optimizers built before the
    call still hold the old blocks' parameters: build them after.

    Returns
    -------
    list[Swap]
        What was swapped, in module order (empty if nothing is supported); also logged.

    Examples
    --------
    >>> swaps = patch_model(model)  # doctest: +SKIP
    >>> swaps[0]  # doctest: +SKIP
    Swap(name='model.layers.0.mlp', hf_class='MixtralSparseMoeBlock', family='mixtral', n_experts=8, k=2)
    """
    check_backend_name(backend)
    swaps: list[Swap] = []
    adapters: list[HFMoEBlock] = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ not in FAMILIES or any(name.startswith(s.name + ".") for s in swaps):
            continue
        if not name:
            raise ValueError("patch_model: model is itself an MoE block; use from_hf(model)")
        new = from_hf(module, backend=backend, check_inputs=check_inputs)
        _swap_in(model, name, new)
        adapters.append(new)
        swaps.append(Swap(name, new.hf_class, new.family, new.moe.n_experts, new.moe.gate.k))
    _hook_taps(model, adapters)
    log.info("patch_model: swapped %d MoE blocks: %s", len(swaps), ", ".join(s.name for s in swaps))
    return swaps


def unpatch_model(model: nn.Module) -> list[Swap]:
    """Undo `patch_model`: replace every `HFMoEBlock` by `to_hf` of it. Returns the swaps."""
    swaps: list[Swap] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, HFMoEBlock):
            _swap_in(model, name, to_hf(module))
            swaps.append(Swap(name, module.hf_class, module.family, module.moe.n_experts, module.moe.gate.k))
    return swaps
