"""`gatedmoe.interop.hf.adapter` without transformers: the HF gates' trusted top-k ids."""

from __future__ import annotations

import pytest
import torch

from gatedmoe.interop.hf import adapter
from gatedmoe.routing import Routing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "gate",
    [
        lambda: adapter.HFTopKSoftmaxGate(16, 8, k=2, renormalize=True),
        lambda: adapter.HFTopKSoftmaxGate(16, 8, k=2, renormalize=True, softmax_over="topk", bias=True),
        lambda: adapter.HFSigmoidTopKGate(16, 8, k=2),
    ],
)
def test_hf_gates_hand_their_topk_ids_as_trusted(gate, monkeypatch):
    """Their ids come from torch.topk over E scores: the sort's device-side id check is left out."""
    seen = []
    from_topk = Routing.from_topk.__func__
    monkeypatch.setattr(
        Routing, "from_topk", classmethod(lambda cls, *a, **k: seen.append(k.get("trusted_ids")) or from_topk(cls, *a, **k))
    )
    gate().to(DEVICE)(torch.randn(5, 16, device=DEVICE))
    assert seen == [True]
