"""`MoE` on CUDA without host synchronisation: a training step under
``torch.cuda.set_sync_debug_mode("error")``, captured in a CUDA graph, and compiled whole.

These run on the lent GPU (CI has none); the shapes stay outside the per-expert weight-gradient
regime of the Triton backend (mean >= 2048 rows per expert with E <= 16), which reads the
expert counts on the host.
"""

from __future__ import annotations

import pytest
import torch

from gatedmoe import MoE, aux_loss
from helpers import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GATES = ["topk_softmax", "sigmoid", "group_limited"]


def _layer(gate: str, backend: str = "triton") -> MoE:
    torch.manual_seed(0)
    kw = {"gate_kwargs": {"n_group": 4, "topk_group": 2}} if gate == "group_limited" else {}
    bias = 1e-3 if gate != "topk_softmax" else 0.0
    return MoE(256, 16, 128, k=2, gate=gate, backend=backend, bias_update_rate=bias, **kw).cuda().to(torch.bfloat16)


def _step(moe: MoE, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    y = moe(x)
    ((y.float() * gy).sum() + aux_loss(moe)).backward()
    return y


@pytest.mark.parametrize("gate", GATES)
def test_training_step_has_no_host_sync(gate):
    moe = _layer(gate)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(512, 256, device="cuda")
    _step(moe, x, gy)  # warm-up: kernels compile, caches fill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(moe, x, gy)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("gate", GATES)
def test_training_step_replays_from_a_cuda_graph(gate):
    eager, graphed = _layer(gate), _layer(gate)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(512, 256, device="cuda")
    static_x = x.clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as CUDA-graph capture requires
            graphed.zero_grad(set_to_none=False)
            _step(graphed, static_x, gy)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    graphed.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_y = _step(graphed, static_x, gy)
    # Reset the balancer bias the warm-up moved, then replay once against one eager step.
    for e, g in zip(eager.buffers(), graphed.buffers(), strict=True):
        g.copy_(e)
    graphed.zero_grad(set_to_none=False)
    static_x.grad = None if static_x.grad is None else static_x.grad.zero_()
    graph.replay()
    ref_x = x.clone().requires_grad_()
    ref_y = _step(eager, ref_x, gy)
    torch.cuda.synchronize()
    assert_close("y", ref_y, static_y)
    for (n, p), q in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        assert_close(f"grad {n}", p.grad, q.grad)


def test_compiles_fullgraph():
    moe = _layer("topk_softmax")
    compiled = torch.compile(moe, fullgraph=True)
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    assert_close("y", moe(x), compiled(x))
