"""Hugging Face MoE models: transformers' experts implementations vs gatedmoe, forward and
training step.

Builds random-weight causal LMs from transformers configs (no downloads): a Qwen3-MoE-like
and a Mixtral-like model by default (`FAMILY_CONFIGS`; the number of experts, top-k and
expert width can be set). Before timing anything it checks, on the benchmark's own batch,
that every gatedmoe variant gives the logits and loss of transformers' default experts
implementation as closely as transformers' own implementations agree with each other
(`check_agreement`). Then it times, the variants taking turns step by step (so load from
other processes on a shared host falls on all of them alike):

* transformers with ``experts_implementation`` "eager" (per-expert loop), "grouped_mm" (the
  default), "batched_mm" and, on CUDA, "sonicmoe": each where it runs and fits in memory
  (otherwise the table says why not);
* ``experts_implementation="gatedmoe"``: gatedmoe's kernels on the unpatched model;
* the model after ``gatedmoe.interop.hf.patch_model`` (gatedmoe's `MoE` blocks).

Modes: "forward" (``torch.no_grad()``, eval mode) and "train" (forward with labels and
``loss.backward()``, train mode; no optimizer step, which costs all variants the same).
Prints the machine and, per family and mode, the median step time over ``--repeats`` steps
with its spread (min and max), tokens/s, the speedup over transformers' default (median
against median, and best step against best step, which a shared host's load disturbs
least), and the median process CPU time per step. ``--out``
writes all of it as JSON.

    python benchmarks/hf_patch.py                          # CPU, float32, tiny models
    python benchmarks/hf_patch.py --preset gpu --out hf_gpu.json   # CUDA, bf16, realistic width
    python benchmarks/hf_patch.py --families gpt_oss mixtral --repeats 20

``--preset gpu`` (bf16, hidden 2048, 128 experts top-8 for Qwen3-MoE-like and 64 experts top-2
for Mixtral-like, batch 4 x 2048 = 8192 tokens) is the issue's GPU comparison in one call.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch

# Config class and settings per family; --experts / --topk / --expert-hidden override the
# expert settings (each family names them its own way: see `expert_settings`).
FAMILY_CONFIGS = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512, shared_expert_intermediate_size=1024,
             norm_topk_prob=False),
    ),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512, head_dim=64)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=512, n_shared_experts=1, n_group=4,
             topk_group=2, first_k_dense_replace=0, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64,
             qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=8, num_experts_per_tok=2, head_dim=64, sliding_window=64)),
}  # fmt: skip

# Presets: argument defaults for a size; explicit arguments win.
PRESETS = {
    # What two shared CPU cores run in seconds per step.
    "cpu": dict(
        device="cpu", dtype="float32", families=["qwen3_moe", "mixtral"], hidden=256, layers=2, vocab=2048,
        batch=2, seq=128, experts={"qwen3_moe": 32, "mixtral": 8}, topk={"qwen3_moe": 4, "mixtral": 2},
        expert_hidden={"qwen3_moe": 128, "mixtral": 512},
    ),
    # The GPU comparison: bf16, hidden 2048, 64-128 experts, 8192 tokens per step.
    # Qwen3-MoE-like: Qwen3-30B-A3B's experts (128, top-8, width 768); Mixtral-like: softmax
    # top-2 over 64 experts of width 4096. Vocab kept small so the MoE layers dominate.
    "gpu": dict(
        device="cuda", dtype="bfloat16", families=["qwen3_moe", "mixtral"], hidden=2048, layers=2, vocab=8192,
        batch=4, seq=2048, experts={"qwen3_moe": 128, "mixtral": 64}, topk={"qwen3_moe": 8, "mixtral": 2},
        expert_hidden={"qwen3_moe": 768, "mixtral": 4096}, heads=16, kv_heads=4,
    ),
}  # fmt: skip

HF_IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm", "sonicmoe")


def machine(device: torch.device) -> dict[str, str]:
    import transformers

    import gatedmoe

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": f"{cpu}, torch threads {torch.get_num_threads()}",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, gatedmoe {gatedmoe.__version__}",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        with open("/proc/loadavg") as f:
            info["load"] = " ".join(f.read().split()[:3])
    except OSError:
        pass
    return info


def expert_settings(family: str, experts: int | None, topk: int | None, expert_hidden: int | None) -> dict:
    """The family's config keys for the number of experts, top-k and expert width."""
    names = {
        "mixtral": ("num_local_experts", "intermediate_size"),
        "gpt_oss": ("num_local_experts", "intermediate_size"),
        "deepseek_v3": ("n_routed_experts", "moe_intermediate_size"),
        "olmoe": ("num_experts", "intermediate_size"),
    }.get(family, ("num_experts", "moe_intermediate_size"))
    out = {}
    if experts is not None:
        out[names[0]] = experts
    if topk is not None:
        out["num_experts_per_tok"] = topk
    if expert_hidden is not None:
        out[names[1]] = expert_hidden
    return out


def build(family: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The random-weight causal LM of ``family``, and the attention implementation it runs
    (SDPA where the model supports it, else eager: GPT-OSS has no SDPA path in transformers)."""
    import transformers

    cls_name, over = FAMILY_CONFIGS[family]
    over = dict(over)
    kv_heads = over.pop("num_key_value_heads", args.kv_heads)
    over.update(
        expert_settings(family, _per_family(args.experts, family), _per_family(args.topk, family), _per_family(args.expert_hidden, family))
    )
    cfg = getattr(transformers, cls_name)(
        hidden_size=args.hidden,
        intermediate_size=over.pop("intermediate_size", 2 * args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 64),
        **over,
    )
    model_cls = transformers.AutoModelForCausalLM._model_mapping[type(cfg)]
    attn = "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"
    torch.manual_seed(0)
    # Built on the device itself: a GPU-sized model initialised on the host takes minutes.
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.to(device), attn


def _per_family(value, family: str):
    return value.get(family) if isinstance(value, dict) else value


def active_params(model: torch.nn.Module) -> float:
    """Parameters in the matmuls a token goes through: all but the input embedding and the
    routed experts, plus k/E of those."""
    total = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        if ".experts." in name and p.dim() == 3:
            total += p.numel() * model.config.num_experts_per_tok / p.shape[0]
        else:
            total += p.numel()
    return total


class Variant:
    """One way of running the model: ``model`` with transformers' experts implementation
    ``impl`` set before each step (None: as it is, e.g. the patched model)."""

    def __init__(self, name: str, model: torch.nn.Module, impl: str | None) -> None:
        self.name, self.model, self.impl = name, model, impl

    def prepare(self) -> torch.nn.Module:
        if self.impl is not None:
            self.model.set_experts_implementation(self.impl)
        return self.model


def step_fn(mode: str, ids: torch.Tensor):
    def forward(model: torch.nn.Module) -> None:
        model.eval()
        with torch.no_grad():
            model(ids)

    def train(model: torch.nn.Module) -> None:
        model.train()
        model(ids, labels=ids).loss.backward()
        # Gradients are not kept between steps: one model's worth of gradient memory.
        model.zero_grad(set_to_none=True)

    return forward if mode == "forward" else train


def runs(variant: Variant, mode: str, ids: torch.Tensor, device: torch.device) -> str | None:
    """None if ``variant`` runs a step here; otherwise why not (an error, out of memory)."""
    try:
        step_fn(mode, ids)(variant.prepare())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return None
    except torch.OutOfMemoryError:
        variant.model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return "out of memory"
    except (RuntimeError, ValueError, ImportError, KeyError, NotImplementedError) as err:
        variant.model.zero_grad(set_to_none=True)
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def timed_round_robin(variants: list[Variant], mode: str, ids: torch.Tensor, device: torch.device, warmup: int, repeats: int):
    """(wall, process CPU) seconds per step of each variant, the variants taking turns step
    by step, the turn order rotated each round (a variant that frees much memory, such as
    batched_mm, slows whichever runs after it). On CUDA each step ends with a synchronize;
    only wall time means anything there."""
    step = step_fn(mode, ids)
    out: dict[str, list[tuple[float, float]]] = {v.name: [] for v in variants}
    for i in range(warmup + repeats):
        for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
            model = v.prepare()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            step(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                out[v.name].append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def dense_ceiling(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured TFLOP/s of an n x n x n matmul on this device and dtype, best of 20 runs.
    On CPU per second of process CPU time (all threads); on CUDA per second of wall time."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = float("inf")
    for i in range(23):
        t0 = clock()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            best = min(best, clock() - t0)
    return 2 * n**3 / best / 1e12


def check_agreement(family: str, reference: Variant, alternatives: list[Variant], candidates: list[Variant], ids: torch.Tensor) -> dict:
    """Stop unless every candidate (gatedmoe) agrees with ``reference`` (transformers' default
    experts implementation) as closely as transformers' own implementations agree with each
    other. Eval mode, no gradients.

    The spread is the largest ``max |logits - logits_ref|`` and ``|loss - loss_ref|`` over
    ``alternatives`` (transformers' other implementations that run here, eager always among
    them, timed or not). A candidate passes
    if its difference is at most ``SPREAD_SLACK`` times the spread, or below the float32 floor
    ``FP32_RTOL`` (relative to the largest logit) where the spread is smaller than rounding in
    float32. A fixed bf16 bound does not work: on an H200 Mixtral's bf16 logits move by 0.18
    between transformers' own grouped_mm and eager (the issue's "... 0.177").
    """

    def outputs(v: Variant):
        model = v.prepare().eval()
        with torch.no_grad():
            out = model(ids, labels=ids)
        return out.logits.float(), out.loss.float()

    ref_logits, ref_loss = outputs(reference)
    scale = max(1.0, ref_logits.abs().max().item())

    def diff(v: Variant) -> tuple[float, float]:
        logits, loss = outputs(v)
        return (logits - ref_logits).abs().max().item(), (loss - ref_loss).abs().item()

    spread = [0.0, 0.0]
    for v in alternatives:
        spread = [max(a, b) for a, b in zip(spread, diff(v), strict=True)]
    bound = [max(SPREAD_SLACK * s, FP32_RTOL * scale) for s in spread]
    report = {"spread": spread, "bound": bound, "candidates": {}}
    for v in candidates:
        d = diff(v)
        report["candidates"][v.name] = d
        print(
            f"{family}: {v.name} vs {reference.name}: max |dlogits| {d[0]:.3g}, |dloss| {d[1]:.3g}; "
            f"transformers' own spread ({', '.join(a.name for a in alternatives)}) {spread[0]:.3g}, {spread[1]:.3g}"
        )
        if d[0] > bound[0] or d[1] > bound[1]:
            raise SystemExit(
                f"{family}: {v.name} disagrees with {reference.name} beyond the spread of transformers' own "
                f"implementations (max |dlogits| {d[0]:.3g} > {bound[0]:.3g} or |dloss| {d[1]:.3g} > {bound[1]:.3g})"
            )
    return report


# Agreement bound of `check_agreement`: this many times the spread of transformers' own
# experts implementations, and never below float32 rounding relative to the largest logit.
SPREAD_SLACK = 2.0
FP32_RTOL = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="default sizes (explicit arguments win)")
    ap.add_argument("--device")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--families", nargs="+", choices=sorted(FAMILY_CONFIGS))
    ap.add_argument("--modes", nargs="+", choices=["forward", "train"], default=["forward", "train"])
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--experts", type=int, help="routed experts (default: the preset's per family)")
    ap.add_argument("--topk", type=int)
    ap.add_argument("--expert-hidden", type=int, help="width of one expert")
    ap.add_argument("--implementations", nargs="+", default=list(HF_IMPLEMENTATIONS), help="transformers' ones to time")
    ap.add_argument("--sonicmoe-local", action="store_true",
                    help='run transformers\' "sonicmoe" experts implementation on the installed `sonicmoe` package '
                         "(e.g. ../shared/peers' wheel) instead of its download from the hub")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", help="write the results as JSON to this path")
    args = ap.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    preset.setdefault("heads", 4)
    preset.setdefault("kv_heads", 4)
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def use_local_sonicmoe() -> str:
    """Make transformers' "sonicmoe" experts implementation call the installed `sonicmoe`
    package. transformers loads SonicMoE from the hub through `kernels` into a cache (a
    module global in 5.24, a `SONIC_MOE_HANDLE` object in other 5.x releases) and skips the
    download when the cache is filled, so filling it with the local package's two entry points
    (the ones transformers reads) is the whole switch; the call itself stays transformers'.
    Returns the package's version."""
    try:
        import sonicmoe
        from sonicmoe.enums import ActivationType
        from transformers.integrations import sonicmoe as hf_sonic
    except ImportError as e:
        raise SystemExit(f"--sonicmoe-local: {e} (install ../shared/peers' wheels, see its README)") from e
    if not hasattr(hf_sonic, "SonicMoE"):
        raise SystemExit("--sonicmoe-local: this transformers has no transformers.integrations.sonicmoe.SonicMoE")
    kernel = hf_sonic.SonicMoE(activation_type_enum=ActivationType,
                               moe_general_routing_inputs=sonicmoe.moe_general_routing_inputs)
    handle = getattr(hf_sonic, "SONIC_MOE_HANDLE", None)
    if handle is not None and hasattr(handle, "_cached_sonicmoe"):
        handle._cached_sonicmoe, handle._loaded, handle._loading_error = kernel, True, None
    elif hasattr(hf_sonic, "_SONICMOE"):
        hf_sonic._SONICMOE = kernel
    else:
        raise SystemExit("--sonicmoe-local: this transformers keeps its SonicMoE kernel somewhere unknown; "
                         "run without the option")
    return getattr(sonicmoe, "__version__", "unknown")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from gatedmoe.interop.hf import patch_model

    if args.sonicmoe_local:
        print(f"transformers' sonicmoe runs the local sonicmoe {use_local_sonicmoe()}")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    ceiling = dense_ceiling(device, dtype, 4096 if device.type == "cuda" else 1024)
    info = machine(device)
    command = "python benchmarks/hf_patch.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print(f"command: {command}")
    print(
        f"dtype {dtype}, batch {args.batch} x seq {args.seq}, hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}; median of {args.repeats} after {args.warmup} warm-up steps, [min, max]"
    )
    per = "wall second" if device.type == "cuda" else "process CPU second"
    print(f"dense matmul ceiling: {ceiling:.3f} TFLOP per {per}\n")
    results = {"machine": info, "command": command, "args": {k: v for k, v in vars(args).items()}, "ceiling_tflops": ceiling, "families": {}}
    gen = torch.Generator().manual_seed(1)
    for family in args.families:
        hf, attn = build(family, args, device, dtype)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
        patched = copy.deepcopy(hf)
        swaps = patch_model(patched, check_inputs=False)
        cfg = hf.config
        E = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None)
        desc = f"{family}: {E} experts, top-{cfg.num_experts_per_tok}, attention {attn}, {len(swaps)} MoE blocks patched"
        print(desc)
        fam = results["families"][family] = {"description": desc, "modes": {}, "not_run": {}}
        default = Variant("transformers grouped_mm", hf, "grouped_mm")
        hf_variants = [Variant(f"transformers {impl}", hf, impl) for impl in args.implementations if impl != "grouped_mm"]
        ours = [Variant('experts_implementation="gatedmoe"', hf, "gatedmoe"), Variant("gatedmoe patch_model", patched, None)]
        flops_fwd = 2 * active_params(hf) * ids.numel()
        for mode in args.modes:
            variants = [default, *hf_variants, *ours]
            why = {v.name: runs(v, mode, ids, device) for v in variants}
            for name, reason in why.items():
                if reason is not None:
                    fam["not_run"][f"{mode}: {name}"] = reason
                    print(f"{family} {mode}: {name} not run here: {reason}")
            if why[default.name] is not None:
                raise SystemExit(f"{family}: transformers' default experts implementation does not run: {why[default.name]}")
            running = [v for v in variants if why[v.name] is None]
            if mode == args.modes[0]:
                # Eager (transformers' per-expert loop) always joins the spread, timed or not:
                # with batched_mm out of memory at the GPU preset it is the only other one.
                extra = [] if "eager" in args.implementations else [Variant("transformers eager", hf, "eager")]
                alternatives = [v for v in running if v in hf_variants] + [v for v in extra if runs(v, mode, ids, device) is None]
                fam["agreement"] = check_agreement(family, default, alternatives, [v for v in running if v in ours], ids)
            times = timed_round_robin(running, mode, ids, device, args.warmup, args.repeats)
            flops = flops_fwd * (3 if mode == "train" else 1)
            base = statistics.median(w for w, _ in times[default.name])
            # Best step against best step: what a shared host's load disturbs least.
            base_min = min(w for w, _ in times[default.name])
            header = (
                f"{'mode':<8} {'variant':<34} {'ms/step':>9} {'[min, max]':>17} {'tokens/s':>10} {'speedup':>8} "
                f"{'min spd':>8} {'of ceil':>7} {'cpu ms':>9}"
            )
            print(f"\n{family}\n{header}\n{'-' * len(header)}")
            rows = fam["modes"][mode] = {}
            for name, ts in times.items():
                walls = [w for w, _ in ts]
                t, c = statistics.median(walls), statistics.median(c for _, c in ts)
                tflops = flops / (t if device.type == "cuda" else c) / 1e12
                rows[name] = {
                    "median_ms": t * 1e3, "min_ms": min(walls) * 1e3, "max_ms": max(walls) * 1e3,
                    "tokens_per_s": ids.numel() / t, "speedup": base / t, "min_speedup": base_min / min(walls),
                    "of_ceiling": tflops / ceiling,
                    "cpu_ms": c * 1e3, "wall_ms_all": [w * 1e3 for w in walls],
                }  # fmt: skip
                print(
                    f"{mode:<8} {name:<34} {t * 1e3:>9.1f} {f'[{min(walls) * 1e3:.1f}, {max(walls) * 1e3:.1f}]':>17} "
                    f"{ids.numel() / t:>10.0f} {base / t:>7.2f}x {base_min / min(walls):>7.2f}x {tflops / ceiling:>7.1%} "
                    f"{c * 1e3:>9.1f}"
                )
        print()
        del hf, patched
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
