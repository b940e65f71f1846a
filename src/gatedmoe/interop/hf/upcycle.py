"""Upcycle Hugging Face dense models: their gated MLPs (``gate_proj``, ``up_proj``,
``down_proj``, ``act_fn``: Llama, Qwen2, Mistral, Gemma and most decoder families) become
gatedmoe `MoE` layers (`gatedmoe.layers.upcycle`: copies, optional noise, fine-grained
segments; the same output at step 0).

* `upcycle_mlp(mlp, n_experts, ...)`: one MLP -> `MoE`.
* `upcycle_model(model, n_experts, ...)`: every dense MLP of a model, swapped in place, in
  one call; the model keeps its class (the MoE layers return a tensor as the MLPs did),
  and ``gatedmoe.aux_loss(model)`` collects their losses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gatedmoe.interop.hf.families import _glu_name
from gatedmoe.layers.moe import MoE
from gatedmoe.layers.upcycle import upcycle_weights

__all__ = ["is_dense_mlp", "upcycle_mlp", "upcycle_model"]

_PROJ = ("gate_proj", "up_proj", "down_proj")


def is_dense_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face gated MLP (``gate_proj``/``up_proj``/``down_proj``
    ``nn.Linear`` and an ``act_fn``)."""
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in _PROJ) and hasattr(module, "act_fn")


def upcycle_mlp(mlp: nn.Module, n_experts: int, **kwargs: Any) -> MoE:
    """An `MoE` upcycled from the Hugging Face gated MLP ``mlp``: ``down(act(gate(x)) * up(x))``.

    Keywords as for `gatedmoe.layers.upcycle.upcycle_weights` (``k``, ``granularity``,
    ``noise``, ``generator``, other `MoE` settings). The activation maps to its GLU name
    (SiLU -> "swiglu", GELU-tanh -> "geglu", ReLU -> "reglu").
    """
    if not is_dense_mlp(mlp):
        raise TypeError(f"{type(mlp).__name__} is not a gated MLP with gate_proj, up_proj, down_proj and act_fn")
    gate, up, down = (getattr(mlp, p) for p in _PROJ)
    if (gate.bias is None) != (up.bias is None) or (gate.bias is None) != (down.bias is None):
        raise ValueError("gate_proj, up_proj and down_proj must all have biases or none")
    # Our GLU layout: w_in rows [gate; up], act(gate) * up.
    w_in = torch.cat([gate.weight, up.weight]).detach()
    b_in = None if gate.bias is None else torch.cat([gate.bias, up.bias]).detach()
    return upcycle_weights(w_in, down.weight, _glu_name(mlp.act_fn), n_experts, b_in=b_in, b_out=down.bias, **kwargs)


def upcycle_model(model: nn.Module, n_experts: int, **kwargs: Any) -> list[str]:
    """Replace every dense gated MLP of ``model`` by its upcycled `MoE`, in place; returns
    the qualified names replaced (in order). Keywords as for `upcycle_mlp`; the same
    settings for every layer, each with its own router initialisation.

    Examples
    --------
    >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
    ...                                      num_hidden_layers=2))  # doctest: +SKIP
    >>> upcycle_model(model, n_experts=8, k=2)  # doctest: +SKIP
    ['model.layers.0.mlp', 'model.layers.1.mlp']
    """
    names = [n for n, m in model.named_modules() if n and is_dense_mlp(m)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no dense gated MLP (gate_proj/up_proj/down_proj) to upcycle")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, upcycle_mlp(getattr(parent, child), n_experts, **kwargs))
    return names
