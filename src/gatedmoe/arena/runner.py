"""Train the contestants of the gate arena: the same model with each gate, the same budget
and seeds, on text (char-level LM) or on a table (`TabularMoE` against an MLP of equal
parameter count)."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gatedmoe import gates as gate_registry
from gatedmoe.analysis import RoutingStats
from gatedmoe.data import TabularDataset
from gatedmoe.layers.config import MoEConfig
from gatedmoe.layers.moe import MoE
from gatedmoe.models import (
    CharTokenizer,
    LMConfig,
    TabularMLP,
    TabularMoE,
    TextBatches,
    train_lm,
    train_tabular,
)

__all__ = [
    "ArenaResult",
    "DEFAULT_TEXT_GATES",
    "DEFAULT_TABULAR_GATES",
    "TEXT_MODEL",
    "TEXT_MOE",
    "TABULAR_MODEL",
    "TABULAR_MOE",
    "DEFAULT_STEPS",
    "gate_preset",
    "run_text_arena",
    "run_tabular_arena",
]

# Default contestants: softmax top-k (Mixtral), DeepSeek-V3 sigmoid with bias balancing,
# Switch top-1 with capacity, expert choice, and hash routing (no learned router).
DEFAULT_TEXT_GATES = ("topk_softmax", "sigmoid", "switch", "expert_choice", "hash")
# GG MoE's Gumbel-softmax gate; the equal-parameter MLP is always added.
DEFAULT_TABULAR_GATES = ("gumbel_softmax",)
# The arena's LM: small enough that 5 gates x 300 steps fit in minutes on 2 CPU cores.
# TEXT_MODEL holds the LMConfig fields beside its MoE layers, TEXT_MOE those layers' settings
# (the gate is set per contestant by `gate_preset`); likewise for TabularMoE.
TEXT_MODEL: dict[str, Any] = dict(n_layers=2, n_heads=4, seq_len=128)
TEXT_MOE = MoEConfig(d_model=128, n_experts=8, d_hidden=128, k=2, check_inputs=False)
TABULAR_MODEL: dict[str, Any] = dict(d_embed=8)
TABULAR_MOE = MoEConfig(d_model=64, n_experts=4, d_hidden=64, k=2, gate="gumbel_softmax", activation="gelu",
                        check_inputs=False)
DEFAULT_STEPS = {"text": 300, "tabular": 500}
MLP_LABEL = "mlp (equal params)"
_MOE_FIELDS = frozenset(f.name for f in dataclasses.fields(MoEConfig))


def gate_preset(gate: str, vocab_size: int | None = None, *, base: MoEConfig = TEXT_MOE) -> MoEConfig:
    """The MoE settings the arena uses for ``gate``: ``base`` with that gate and its preset.

    ``sigmoid`` gets auxiliary-loss-free bias balancing with update rate 1e-2 (DeepSeek-V3
    uses 1e-3 over far longer runs; a few hundred steps need a larger step to balance);
    ``hash`` gets the random-permutation table over the vocabulary (``gate_kwargs``).
    Others: ``base`` as it is.

    >>> gate_preset("sigmoid").bias_update_rate
    0.01
    """
    gate_registry.get(gate)
    cfg = base.replace(gate=gate)
    if gate == "sigmoid":
        return cfg.replace(bias_update_rate=1e-2)
    if gate == "hash" and vocab_size is not None:
        return cfg.replace(gate_kwargs={**base.gate_kwargs, "vocab_size": vocab_size})
    return cfg


def _split_model(model: dict[str, Any], base: MoEConfig) -> tuple[dict[str, Any], MoEConfig]:
    """``model`` overrides: (the model's own fields, ``base`` with its MoEConfig fields applied)."""
    moe_changes = {k: v for k, v in model.items() if k in _MOE_FIELDS}
    return {k: v for k, v in model.items() if k not in _MOE_FIELDS}, base.replace(**moe_changes)


def _moe_record(base: MoEConfig, gate_names: list[str], vocab_size: int | None = None) -> dict[str, Any]:
    """JSON-able record of the MoE settings: ``base`` and, per gate, what its preset changes."""
    base_d = dataclasses.asdict(base)
    gates = {}
    for g in gate_names:
        d = dataclasses.asdict(gate_preset(g, vocab_size, base=base))
        gates[g] = {k: v for k, v in d.items() if k != "gate" and v != base_d[k]}
    return {"moe": {k: v for k, v in base_d.items() if k != "gate"}, "gates": gates}


@dataclass
class ArenaResult:
    """Everything one task of the arena produced.

    ``runs``: one JSON-able dict per (contestant, seed); ``stats``: the `RoutingStats` of
    each MoE contestant's first seed (for plots); ``vocab``: token texts (text task).
    """

    task: str
    dataset: str
    config: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, RoutingStats] = field(default_factory=dict)
    vocab: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _contestants(gate_names: list[str], variants: Mapping[str, Mapping[str, Any]] | None
                 ) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, gate, MoEConfig changes)`` per contestant: one per gate, or with
    ``variants`` one per gate and variant, labelled by the variant (one gate) or
    ``"<gate> <variant>"``."""
    if variants is None:
        return [(g, g, {}) for g in gate_names]
    if not isinstance(variants, Mapping) or not variants:
        raise ValueError(f"variants must be a non-empty mapping of label -> MoEConfig changes, got {variants!r}")
    for name, changes in variants.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"variants: labels must be non-empty strings, got {name!r}")
        if not isinstance(changes, Mapping):
            raise ValueError(f"variants[{name!r}] must be a mapping of MoEConfig fields, got {changes!r}")
        unknown = sorted(set(changes) - _MOE_FIELDS - {"gate"}) + (["gate"] if "gate" in changes else [])
        if unknown:
            raise ValueError(f"variants[{name!r}]: {', '.join(unknown)} not MoEConfig fields a variant may set "
                             "(the gate is chosen by gates)")
    return [(name if len(gate_names) == 1 else f"{g} {name}", g, dict(changes))
            for g in gate_names for name, changes in variants.items()]


def _routing_columns(summary: dict) -> dict[str, float | None]:
    mean = summary.get("mean") or {}
    if not mean:
        return {"load_cv": None, "max_violation": None, "dropped_pct": None, "entropy_norm": None,
                "experts_per_token": None}
    ent = mean["entropy_normalized"]
    return {
        "load_cv": mean["cv"],
        "max_violation": mean["max_violation"],
        "dropped_pct": 100.0 * mean["dropped_fraction"],
        "entropy_norm": None if ent is None or math.isnan(ent) else ent,
        "experts_per_token": mean["experts_per_token"],
    }


def _check_common(gate_names: list[str], seeds: int, steps: int) -> None:
    if not gate_names:
        raise ValueError("gates must name at least one gate")
    for g in gate_names:
        gate_registry.get(g)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def run_text_arena(
    text: str,
    gates: list[str] | tuple[str, ...] = DEFAULT_TEXT_GATES,
    *,
    steps: int = DEFAULT_STEPS["text"],
    seeds: int = 1,
    batch_size: int = 16,
    lr: float = 3e-3,
    eval_every: int = 50,
    eval_batches: int = 16,
    device: str = "cpu",
    model: dict[str, Any] | None = None,
    moe: MoEConfig | None = None,
    dataset: str = "text",
    progress: bool = True,
    jobs: int = 1,
    threads: int | None = None,
    micro_batches: int = 1,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> ArenaResult:
    """Train `MoETransformerLM` once per gate and seed on ``text``; same config, budget,
    data order and initial weights (per seed) for every gate.

    ``moe`` is the MoE layers' settings (default `TEXT_MOE`; each gate's `gate_preset` of
    it); ``model`` overrides `TEXT_MODEL` (LMConfig fields; `MoEConfig` fields in it, e.g.
    ``d_model`` or ``n_experts``, are applied to ``moe``). ``jobs > 1`` trains that many runs
    at once in worker processes (spawned; each uses ``threads`` torch threads, default 1);
    one progress bar moves per training step over all runs; results are the same as with ``jobs=1``. Returns an
    `ArenaResult` whose runs hold ``val_loss``, ``params``, ``active_params``,
    ``load_cv``, ``max_violation``, ``dropped_pct``, ``entropy_norm``, ``tokens_per_s``,
    ``char_expert_mi`` (mutual information between a token's character and its experts on
    validation, bits, mean over layers: how much the experts specialise on characters)
    and the validation curve.

    ``micro_batches`` accumulates gradients over that many forwards of ``batch_size``
    sequences per optimizer step (`train_lm`); then runs also hold
    ``micro_max_violation``: max load / mean load - 1 of each validation batch of
    ``batch_size`` sequences (one micro-batch), averaged over batches and layers, beside
    ``max_violation`` over all ``eval_batches`` batches together.

    ``variants`` (label -> `MoEConfig` changes, e.g. ``{"global": {"load_balance_scope":
    "global_batch"}}``) trains each gate once per variant, its preset with those changes;
    a contestant is labelled by its variant (one gate) or ``"<gate> <variant>"``.

    >>> from gatedmoe.data import load_tinyshakespeare
    >>> res = run_text_arena(load_tinyshakespeare()[:20000], ["topk_softmax"], steps=2, batch_size=2,
    ...                      micro_batches=2, variants={"micro": {}, "global": {"load_balance_scope": "global_batch"}},
    ...                      model=dict(n_layers=1, d_model=16, seq_len=16), eval_batches=1, progress=False)
    >>> [r["label"] for r in res.runs]
    ['micro', 'global']
    """
    gate_names = list(gates)
    _check_common(gate_names, seeds, steps)
    contestants = _contestants(gate_names, variants)
    model_cfg, base = _split_model({**TEXT_MODEL, **(model or {})}, TEXT_MOE if moe is None else moe)
    vocab = CharTokenizer.from_text(text).chars
    config = {"model": model_cfg, "steps": steps, "seeds": seeds, "batch_size": batch_size,
              "micro_batches": micro_batches, "lr": lr, "eval_batches": eval_batches,
              **_moe_record(base, gate_names, len(vocab))}
    if variants is not None:
        config["variants"] = {name: dict(changes) for name, changes in variants.items()}
    for name, v in (("jobs", jobs), ("micro_batches", micro_batches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    result = ArenaResult("text", dataset, config, vocab=vocab)
    t0 = time.perf_counter()
    tasks = [
        dict(text=text, label=label,
             cfg=LMConfig(vocab_size=len(vocab), moe=gate_preset(gate, len(vocab), base=base).replace(**changes),
                          **model_cfg),
             steps=steps, batch_size=batch_size, micro_batches=micro_batches, lr=lr, device=device, seed=seed,
             eval_every=eval_every, eval_batches=eval_batches, desc=f"{label} seed {seed}")
        for label, gate, changes in contestants for seed in range(seeds)
    ]
    outcomes = _run_all(tasks, jobs, threads, progress)
    for task, (run, stats) in zip(tasks, outcomes, strict=True):
        result.runs.append(run)
        if task["seed"] == 0:
            result.stats[run["label"]] = stats
    result.seconds = time.perf_counter() - t0
    return result


def _run_all(tasks: list[dict[str, Any]], jobs: int, threads: int | None, progress: bool) -> list:
    """Train every task, ``jobs`` at once, behind one progress bar that moves per training
    step of any run (a run of the default arena takes a minute; a bar per finished run sat
    still that long)."""
    from tqdm.auto import tqdm

    total = sum(t["steps"] for t in tasks)
    label = "text runs" if jobs == 1 or len(tasks) == 1 else f"text runs ({min(jobs, len(tasks))} at once)"
    bar = tqdm(total=total, disable=not progress, desc=f"{label}, {len(tasks)} runs", unit="step")
    try:
        if jobs == 1 or len(tasks) == 1:
            if not progress:
                return [_text_run(task, False, threads) for task in tasks]
            return [_text_run(task, False, threads, lambda _: bar.update(1)) for task in tasks]
        import multiprocessing
        import queue as queue_mod
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
            steps_done = manager.Queue()
            extra = (steps_done,) if progress else ()
            futures = [pool.submit(_text_run, task, False, threads or 1, *extra) for task in tasks]
            while not all(f.done() for f in futures):
                try:
                    bar.update(steps_done.get(timeout=0.5))
                except queue_mod.Empty:
                    pass
            return [f.result() for f in futures]
    finally:
        bar.close()


class _QueueSteps:
    """``on_step`` for a worker process: puts 1 on a manager queue per step (picklable)."""

    def __init__(self, q: Any) -> None:
        self.q = q

    def __call__(self, _step: int) -> None:
        self.q.put(1)


def _text_run(task: dict[str, Any], progress: bool, threads: int | None,
              on_step: Any = None) -> tuple[dict[str, Any], RoutingStats]:
    """One text contestant (module level so worker processes can run it). ``on_step`` is
    called after every step, or, a queue, receives a 1 per step."""
    if threads is not None:
        torch.set_num_threads(threads)
    task = dict(task)
    text, cfg, label = task.pop("text"), task.pop("cfg"), task.pop("label")
    if on_step is not None and not callable(on_step):
        on_step = _QueueSteps(on_step)
    m = train_lm(text, cfg, progress=progress, on_step=on_step, **task)
    run = {
        "label": label, "gate": cfg.moe.gate, "seed": task["seed"],
        "val_loss": m["final_val_loss"], "params": m["params"], "active_params": m["active_params"],
        **_routing_columns(m["routing"]),
        "tokens_per_s": m["tokens_per_s"], "train_seconds": m["train_seconds"],
        "char_expert_mi": _char_expert_mi(m["routing_stats"]),
    }
    if task["micro_batches"] > 1:
        data = TextBatches(CharTokenizer.from_text(text).encode(text), cfg.seq_len)
        run["micro_max_violation"] = _batch_max_violation(m["model"], data, task["batch_size"], task["eval_batches"])
    run.update({"val_curve": m["val_loss"], "routing": m["routing"]})
    return run, m["routing_stats"]


def _char_expert_mi(stats: RoutingStats) -> float | None:
    """Mutual information (bits) between a validation token's character and the expert of
    each of its assignments, mean over layers; None without a learned routing."""
    values = []
    for layer in stats.layer_names:
        try:
            joint = stats.token_expert_counts(layer)
        except ValueError:
            return None
        total = joint.sum()
        if total <= 0:
            continue
        p = joint / total
        outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
        nz = p > 0
        values.append(float((p[nz] * (p[nz] / outer[nz]).log2()).sum()))
    return statistics.fmean(values) if values else None


@torch.no_grad()
def _batch_max_violation(model: torch.nn.Module, data: TextBatches, batch_size: int, n_batches: int) -> float:
    """Max load / mean load - 1 of each MoE layer's executed assignments in each of the
    validation batches `evaluate_lm` uses (same windows), averaged over batches and layers."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1234)
    values = []
    for _ in range(n_batches):
        x, _ = data.batch("val", batch_size, gen)
        model(x.to(device))
        for m in model.modules():
            if isinstance(m, MoE) and m.last_routing is not None:
                counts = m.last_routing.counts.double()
                values.append(float(counts.max() / counts.mean() - 1.0) if counts.sum() > 0 else 0.0)
    model.train(was_training)
    return statistics.fmean(values)


def run_tabular_arena(
    data: TabularDataset,
    gates: list[str] | tuple[str, ...] = DEFAULT_TABULAR_GATES,
    *,
    steps: int = DEFAULT_STEPS["tabular"],
    seeds: int = 1,
    batch_size: int = 64,
    lr: float = 3e-3,
    eval_every: int = 50,
    val_fraction: float = 0.2,
    model: dict[str, Any] | None = None,
    moe: MoEConfig | None = None,
    progress: bool = True,
) -> ArenaResult:
    """Train `TabularMoE` once per gate and seed, and an MLP with the parameter count of
    the first gate's `TabularMoE` (`TabularMLP.matching`), on one split of ``data``.

    ``moe`` is the MoE layer's settings (default `TABULAR_MOE`; each gate's `gate_preset` of
    it); ``model`` overrides `TABULAR_MODEL` (`MoEConfig` fields in it are applied to ``moe``).
    Gates that route by token id (hash) have nothing to hash in a table and are skipped.
    Runs hold ``val_loss`` and ``val_accuracy`` (classification) or ``val_rmse`` and
    ``val_r2`` (regression), parameters, routing columns (None for the MLP) and
    ``tokens_per_s`` (rows per second).
    """
    gate_names = [g for g in gates if not gate_registry.get(g).uses_token_ids]
    _check_common(gate_names, seeds, steps)
    model_cfg, base = _split_model({**TABULAR_MODEL, **(model or {})}, TABULAR_MOE if moe is None else moe)
    split = data.split(val_fraction, seed=0)
    n_features = data.X.shape[1]
    config = {"model": model_cfg, "steps": steps, "seeds": seeds, "batch_size": batch_size, "lr": lr,
              "val_fraction": val_fraction, "n_rows": int(len(data.y)), "n_features": int(n_features),
              "task": data.task, "target": data.target, **_moe_record(base, gate_names),
              "skipped_gates": [g for g in gates if g not in gate_names]}
    result = ArenaResult("tabular", data.name, config)
    t0 = time.perf_counter()
    target_params = None

    def record(label: str, gate: str | None, seed: int, m: dict) -> None:
        run = {"label": label, "gate": gate, "seed": seed, "val_loss": m["final_val_loss"]}
        for key in ("val_accuracy", "val_rmse", "val_r2"):
            if key in m:
                run[key] = m[key]
        run.update({"params": m["params"], "active_params": m["active_params"], **_routing_columns(m["routing"]),
                    "tokens_per_s": m["rows_per_s"], "train_seconds": m["train_seconds"],
                    "val_curve": m["val_loss"], "routing": m["routing"]})
        result.runs.append(run)
        if seed == 0 and m["routing_stats"] is not None:
            result.stats[label] = m["routing_stats"]

    for gate in gate_names:
        for seed in range(seeds):
            torch.manual_seed(seed)
            net = TabularMoE(n_features, data.n_outputs, moe=gate_preset(gate, base=base), **model_cfg)
            target_params = target_params or net.n_params()[0]
            m = train_tabular(net, split, data.task, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              eval_every=eval_every, progress=progress, desc=f"{gate} seed {seed}")
            record(gate, gate, seed, m)
    for seed in range(seeds):
        torch.manual_seed(seed)
        mlp = TabularMLP.matching(n_features, data.n_outputs, target_params)
        m = train_tabular(mlp, split, data.task, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                          eval_every=eval_every, progress=progress, desc=f"mlp seed {seed}")
        record(MLP_LABEL, None, seed, m)
    config["mlp_width"] = mlp.width
    result.seconds = time.perf_counter() - t0
    return result
