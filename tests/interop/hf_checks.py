"""Checks shared by the Hugging Face family tests: a block's float32 outputs, routing and
gradients, gradients compared in the HF layout, the round trip of a converted block back to
its HF class, bf16 agreement judged against transformers' own bf16 error, and a patched
model's router logits, greedy tokens, reload and unpatch. Sides are named ``ref``
(transformers) and ``fast`` (gatedmoe)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gatedmoe.interop.hf import from_hf, patch_model, to_hf, unpatch_model
from helpers import assert_close
from interop.hf_tiny import randomize


def tiny_eager_causal_lm(config) -> nn.Module:
    """``AutoModelForCausalLM`` of ``config`` with eager attention, seeded and randomised (`randomize`), in eval mode."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return randomize(model).eval()


def assert_fp32_block_matches(
    ref: nn.Module,
    fast: nn.Module,
    x: torch.Tensor,
    check_routing: Callable[[torch.Tensor, object], None],
    *,
    returns_router_logits: bool = False,
    missing_is_zero: bool = False,
) -> None:
    """float32, block ``ref`` against its conversion ``fast`` on input ``x``: equal outputs
    (and router logits, for a block returning ``(hidden, router_logits)``); the routing, by
    ``check_routing(x, fast.moe.last_routing)`` (run without autograd); then, after the same
    backward from a seeded output gradient, equal input gradients and every parameter
    gradient equal in HF layout (`assert_grads_match_in_hf_layout`, ``missing_is_zero``)."""
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_y, fast_y = ref(ref_x), fast(fast_x)
    if returns_router_logits:
        (ref_y, ref_logits), (fast_y, fast_logits) = ref_y, fast_y
    assert_close("output", ref_y, fast_y)
    if returns_router_logits:
        assert_close("router logits", ref_logits, fast_logits)
    with torch.no_grad():
        check_routing(x, fast.moe.last_routing)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref_y.backward(g)
    fast_y.backward(g)
    assert_close("grad input", ref_x.grad, fast_x.grad)
    assert_grads_match_in_hf_layout(ref, fast, missing_is_zero=missing_is_zero)


def assert_combine_weights_match(want: torch.Tensor, routing, what: str = "combine weights") -> None:
    """``routing`` gives each token the experts and combine weights of ``want`` [T, E]: the
    same nonzero entries exactly, and close weights."""
    assert torch.equal(want > 0, routing.combine_matrix() > 0)
    assert_close(what, want, routing.combine_matrix())


def assert_topk_routing_matches(ref_weights: torch.Tensor, ref_experts: torch.Tensor, routing, n_experts: int) -> torch.Tensor:
    """``routing`` picks exactly the experts ``ref_experts`` [T, k] of each token (the pairs
    it dispatches, not its nonzero weights) and combines them with weights close to
    ``ref_weights`` [T, k]. Returns the reference's chosen-expert mask [T, n_experts]."""
    T = ref_experts.shape[0]
    ref_mask = torch.zeros(T, n_experts, dtype=torch.bool).scatter(1, ref_experts, True)
    fast_mask = torch.zeros_like(ref_mask).index_put((routing.token, routing.expert), torch.tensor(True))
    assert torch.equal(ref_mask, fast_mask)
    want = torch.zeros(T, n_experts).scatter(1, ref_experts, ref_weights)
    assert_close("combine weights", want, routing.combine_matrix())
    return ref_mask


def assert_grads_match_in_hf_layout(ref: nn.Module, fast: nn.Module, *, missing_is_zero: bool = False) -> None:
    """Every parameter gradient of the HF block ``ref`` equals gatedmoe's (``fast``, after
    backward), mapped into HF layout with the (linear) weight converter itself.

    ``missing_is_zero``: a parameter of ``ref`` without a gradient counts as a zero one (the
    families whose unused parameters get none); otherwise each must have one.
    """
    grads = from_hf(ref)  # same structure (a deepcopy would trip on fast.moe.last_routing)
    with torch.no_grad():
        for p, q in zip(fast.parameters(), grads.parameters(), strict=True):
            q.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    fast_grads = dict(to_hf(grads).named_parameters())
    for name, p in ref.named_parameters():
        if missing_is_zero and p.grad is None:
            assert_close(f"grad {name}", torch.zeros_like(p), fast_grads[name])
            continue
        assert p.grad is not None, name
        assert_close(f"grad {name}", p.grad, fast_grads[name])


def assert_round_trips_to_hf_layout(ref: nn.Module, fast: nn.Module) -> None:
    """``to_hf(fast)`` is ``ref``'s class with bit-identical weights, and ``fast``'s own
    state dict has the HF layout (what ``save_pretrained`` writes)."""
    back = to_hf(fast)
    assert type(back) is type(ref)
    want, got = ref.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert sorted(fast.state_dict()) == sorted(want)


def assert_bf16_error_within_transformers(want: torch.Tensor, ref: torch.Tensor, fast: torch.Tensor) -> None:
    """bf16 outputs of a family whose transformers implementation rounds differently from
    gatedmoe (e.g. a per-expert loop adding rounded outputs one by one), judged against the
    spread of transformers' own result: ``want`` is the float32 output of the same
    bf16-rounded weights and inputs, and gatedmoe's distance to transformers' bf16 output
    is no larger than transformers' bf16 error against ``want``."""
    want, ref64, fast64 = want.double(), ref.double(), fast.double()
    spread, diff = (ref64 - want).norm(), (fast64 - ref64).norm()
    assert diff <= spread, f"bf16: |gatedmoe - transformers| {float(diff):.3e} > transformers' own error {float(spread):.3e}"
    assert_close("bf16 output", ref, fast, dtype=torch.bfloat16)


def assert_bf16_block_within_transformers_error_and_round_trips(ref16: nn.Module, d_model: int, *, returns_router_logits: bool = False) -> None:
    """bf16 block ``ref16`` against its conversion: a bf16 output, no farther from
    transformers' bf16 output than transformers' own bf16 error against float32 on the same
    bf16-rounded weights and inputs (`assert_bf16_error_within_transformers`), and the
    round trip back to HF (`assert_round_trips_to_hf_layout`). ``returns_router_logits``:
    the block returns ``(hidden, router_logits)``; the hidden states are compared."""
    fast16 = from_hf(ref16)
    ref32 = copy.deepcopy(ref16).float()  # the same (bf16-rounded) weights, in float32
    x = torch.randn(3, 11, d_model, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        outs = ref32(x.float()), ref16(x), fast16(x)
    want, ref_y, fast_y = (o[0] for o in outs) if returns_router_logits else outs
    assert fast_y.dtype == torch.bfloat16
    assert_bf16_error_within_transformers(want, ref_y, fast_y)
    assert_round_trips_to_hf_layout(ref16, fast16)


def assert_bf16_block_bit_identical_and_round_trips(ref16: nn.Module, d_model: int) -> None:
    """bf16 block ``ref16`` against its conversion on the same input: a bf16 output equal to
    transformers' bit for bit, and the round trip back to HF (`assert_round_trips_to_hf_layout`)."""
    fast16 = from_hf(ref16)
    x = torch.randn(3, 11, d_model, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        ref_y, fast_y = ref16(x), fast16(x)
    assert fast_y.dtype == torch.bfloat16
    assert torch.equal(ref_y, fast_y), (ref_y.float() - fast_y.float()).abs().max()
    assert_round_trips_to_hf_layout(ref16, fast16)


@dataclass
class PatchedModel:
    """A model ``ref``, its patched copy ``fast`` (`patch_model`'s ``swaps``), the token
    ``ids`` both ran on and their outputs; ``output`` picks the compared tensor (named ``what``)."""

    ref: nn.Module
    fast: nn.Module
    swaps: list
    ids: torch.Tensor
    ref_out: object
    fast_out: object
    output: Callable[[object], torch.Tensor]
    what: str


def assert_patched_copy_matches(
    ref: nn.Module,
    families: list[str],
    *,
    router_logit_layers: int | None = None,
    output: Callable[[object], torch.Tensor] = lambda out: out.logits,
    what: str = "logits",
) -> PatchedModel:
    """A deep copy of model ``ref`` through `patch_model` converts every MoE block (a block
    left as it was warns, an error here), the swaps' families being ``families`` in order,
    and gives the same ``output`` (``what``) on seeded token ids. ``router_logit_layers``:
    both run with ``output_router_logits`` and return that many router logits, equal layer
    by layer."""
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every MoE block converts
        swaps = patch_model(fast)
    assert [s.family for s in swaps] == families
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    kw = {} if router_logit_layers is None else {"output_router_logits": True}
    with torch.no_grad():
        ref_out, fast_out = ref(ids, **kw), fast(ids, **kw)
    assert_close(what, output(ref_out), output(fast_out))
    if router_logit_layers is not None:
        assert len(ref_out.router_logits) == len(fast_out.router_logits) == router_logit_layers
        for a, b in zip(ref_out.router_logits, fast_out.router_logits, strict=True):
            assert_close("router logits", a, b)
    return PatchedModel(ref, fast, swaps, ids, ref_out, fast_out, output, what)


def assert_bf16_greedy_tokens_match(run: PatchedModel, max_new_tokens: int) -> None:
    """bf16 copies of the causal LMs ``run.ref`` and ``run.fast`` generate the same greedy
    tokens (through the KV cache) from the first of ``run.ids``."""
    ref16, fast16 = copy.deepcopy(run.ref).bfloat16(), copy.deepcopy(run.fast).bfloat16()
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    assert torch.equal(ref16.generate(run.ids[:1], **kw), fast16.generate(run.ids[:1], **kw))


def assert_reloads_and_unpatches(run: PatchedModel, tmp_path, **from_pretrained_kw) -> None:
    """``run.fast`` saved with ``save_pretrained`` reloads as its HF class (with
    ``from_pretrained_kw``) giving ``run.ref``'s output on ``run.ids``; `unpatch_model`
    undoes exactly ``run.swaps``, and the unpatched model gives that output too."""
    want = run.output(run.ref_out)
    run.fast.save_pretrained(tmp_path)
    back = type(run.fast).from_pretrained(tmp_path, **from_pretrained_kw).eval()
    with torch.no_grad():
        assert_close(f"reloaded {run.what}", want, run.output(back(run.ids)))
    assert [s.name for s in unpatch_model(run.fast)] == [s.name for s in run.swaps]
    with torch.no_grad():
        assert_close(f"unpatched {run.what}", want, run.output(run.fast(run.ids)))
