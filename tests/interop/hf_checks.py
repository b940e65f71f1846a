"""Checks shared by the Hugging Face family tests: gradients compared in the HF layout, the
round trip of a converted block back to its HF class, and bf16 agreement judged against
transformers' own bf16 error."""

from __future__ import annotations

import torch
from torch import nn

from gatedmoe.interop.hf import from_hf, to_hf
from helpers import assert_close


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
