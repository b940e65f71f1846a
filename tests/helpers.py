"""Shared test helpers: one tolerance table, one comparison, poisoned allocations."""

from __future__ import annotations

import torch

# Exact-ish dtypes are compared elementwise. Low-precision dtypes are compared by relative
# error norm ||fast - ref|| / ||ref|| (the flash-linear-attention convention): elementwise
# bounds are meaningless there, because a bf16 pre-activation that rounds across 0 flips
# relu's derivative for that element while the tensor as a whole is right.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 2e-5, "rtol": 2e-4},
    torch.bfloat16: {"rel_norm": 1.5e-2},
    torch.float16: {"rel_norm": 2e-3},
}


def assert_close(name: str, ref: torch.Tensor, fast: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
    """Compare ``fast`` with ``ref`` under the tolerance of ``dtype`` (default: fast's dtype).

    Integer tensors (gathers, permutations, counts) are compared exactly. ``scale`` widens
    the tolerance; callers say why on the same line.
    """
    assert ref.shape == fast.shape, f"{name}: shape {tuple(fast.shape)} != reference {tuple(ref.shape)}"
    if not ref.is_floating_point():
        assert torch.equal(ref, fast), f"{name}: integer tensors differ"
        return
    assert not torch.isnan(fast).any(), f"{name}: NaN in fast result"
    tol = TOLERANCES[dtype or fast.dtype]
    if "rel_norm" in tol:
        ref64, fast64 = ref.double(), fast.double()
        err = (fast64 - ref64).norm() / ref64.norm().clamp_min(1e-12)
        assert err <= tol["rel_norm"] * scale, f"{name}: relative error {err:.2e} > {tol['rel_norm'] * scale:.1e}"
        return
    torch.testing.assert_close(
        fast.double(), ref.double(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale, msg=lambda m: f"{name}: {m}"
    )


def poisoned_empty(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """``torch.empty`` filled with NaN (integers: a large negative sentinel), so an unwritten
    element fails loudly."""
    fill = float("nan") if dtype.is_floating_point else -(2**30)
    return torch.full(shape, fill, dtype=dtype, device=device)


def assert_layer_matches_reference(layer, ref_fn, x: torch.Tensor, *, missing_is_zero: bool = False) -> None:
    """``layer(x)`` against ``ref_fn(layer, x)``: the output, then the gradients of the input
    and of every trainable parameter for a random upstream gradient. A part neither side
    reached must have no gradient on both sides, or with ``missing_is_zero`` a missing
    gradient counts as zeros (a backend that runs every expert writes zeros where a loop
    over the routed experts leaves None)."""
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_y, fast_y = ref_fn(layer, ref_x), layer(fast_x)
    assert_close("output", ref_y, fast_y)
    g = torch.randn(x.shape)
    params = [p for p in layer.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad((ref_y * g).sum(), [ref_x, *params], allow_unused=True)
    fast_grads = torch.autograd.grad((fast_y * g).sum(), [fast_x, *params], allow_unused=True)
    names = ["input", *[n for n, p in layer.named_parameters() if p.requires_grad]]
    for name, p, a, b in zip(names, [x, *params], ref_grads, fast_grads, strict=True):
        if missing_is_zero:
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(f"grad {name}", a, b)
