"""How often a random bf16 router ties at the k-th choice, and whether the HF softmax gate's
fused route (CUDA kernels) then chooses other experts than its plain route (torch's ops,
bit-identical to transformers). CUDA only.

    PYTHONPATH=src python benchmarks/hf_gate_ties.py

Prints, per (E, k): the fraction of tokens whose k-th and (k+1)-th probabilities are equal and
the fraction whose expert set differs between the two routes; then what both routes do with
NaN inputs (every assignment still counted once). Result on an H200:
`benchmarks/results_hf_gate_ties_h200.txt` (BENCHMARKS.md, "Hugging Face models"), written by
this script's first version, which printed no machine line and the NaN lines as
``counts.sum S N N``.
"""

from __future__ import annotations

import torch

from gatedmoe.interop.hf.adapter import HFTopKSoftmaxGate
from gatedmoe.routing import Routing


def expert_sets(r: Routing, n_experts: int) -> torch.Tensor:
    """[T, E] 0/1: which experts each token was routed to."""
    m = torch.zeros(r.n_tokens, n_experts, device=r.token.device)
    m[r.token, r.expert] = 1
    return m


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("hf_gate_ties.py needs CUDA (the fused route runs only there)")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    # (E, k, weights dtype, d): Mixtral's, Qwen3-MoE's and OLMoE's gate shapes
    for E, k, weights_dtype, d in ((8, 2, "float32", 4096), (64, 8, "input", 2048), (128, 8, "input", 2048)):
        g = HFTopKSoftmaxGate(d, E, k=k, renormalize=True, weights_dtype=weights_dtype).cuda().bfloat16().eval()
        x = torch.randn(20000, d, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            g.fused = True
            fast = g(x)
            g.fused = False
            plain = g(x)
            top = torch.softmax(g.router_logits(x), -1).topk(k + 1, -1).values
        tie = (top[:, k - 1] == top[:, k]).float().mean().item()
        differ = (expert_sets(fast, E) != expert_sets(plain, E)).any(-1).float().mean().item()
        print(f"E={E} k={k} bf16: tie rate {tie:.4f}, tokens whose expert set differs fused vs fused=False: {differ:.4f}")
    logits = torch.randn(4096, 64, device="cuda")
    logits[::7] = float("nan")
    ids = logits.softmax(-1).topk(8, -1).indices
    print("cuda topk ids with NaN rows in range:", bool(((ids >= 0) & (ids < 64)).all()))
    g = HFTopKSoftmaxGate(32, 64, k=8, renormalize=True, fused=False).cuda().eval()
    x = torch.randn(4096, 32, device="cuda")
    x[::5] = float("nan")
    for fused in (False, True):
        g.fused = fused
        with torch.no_grad():
            r = g(x)
        print(f"NaN input, fused={fused}: counts.sum {r.counts.sum().item()} of {4096 * 8}")


if __name__ == "__main__":
    main()
