"""Training loop of the reference language model: progress bar, validation, routing
statistics, checkpoint (safetensors + JSON, resumable, with an integrity digest), metrics
(JSON) and a load plot."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gatedmoe.analysis import RoutingStats
from gatedmoe.layers.moe import aux_loss, balance_step
from gatedmoe.models.checkpoint_io import (
    find_model_dir,
    load_tensors,
    load_weights,
    read_json,
    save_tensors,
    save_weights,
    tensor_digest,
)
from gatedmoe.models.text import CharTokenizer, TextBatches
from gatedmoe.models.transformer import LMConfig, MoETransformerLM

__all__ = ["train_lm", "evaluate_lm", "save_checkpoint", "load_checkpoint", "find_checkpoint", "lr_factor",
           "PRECISIONS", "SCHEDULES", "tensor_digest"]

# Learning-rate schedules (`lr_factor`). "inverse_sqrt" depends on the step only, so training
# resumed and extended gives the same model as one run of the total length; "cosine" decays
# over a horizon fixed when the run starts.
SCHEDULES = ("cosine", "inverse_sqrt")
# Training precisions: "float32" everywhere, or "bf16" mixed precision (forward and losses
# under `torch.autocast`; parameters, gradients and optimizer state stay float32). bf16 needs
# no loss scaling, which is why fp16 is not offered.
PRECISIONS = {"float32": None, "bf16": torch.bfloat16}


def lr_factor(step: int, schedule: str, horizon: int, warmup: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Both schedules warm up linearly over ``warmup`` steps. ``"cosine"``: then cosine decay
    to 10% at ``horizon`` steps, 10% after. ``"inverse_sqrt"`` (Vaswani et al. 2017):
    ``sqrt(warmup / (step + 1))`` after the warm-up; ``horizon`` is not used.

    >>> lr_factor(0, "cosine", 10, 1), round(lr_factor(10, "cosine", 10, 1), 3)
    (1.0, 0.1)
    >>> lr_factor(79, "inverse_sqrt", 0, 20)
    0.5
    """
    if schedule == "inverse_sqrt":
        return min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, horizon) / horizon)))


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


@torch.no_grad()
def evaluate_lm(model: MoETransformerLM, data: TextBatches, batch_size: int, n_batches: int, seed: int = 1234,
                stats: RoutingStats | None = None, precision: str = "float32") -> float:
    """Mean validation cross-entropy over ``n_batches`` fixed random windows, the forward in
    ``precision`` (see `PRECISIONS`).

    With ``stats``, the routing of every batch is added to it, with the input characters'
    ids (so `RoutingStats.token_expert_counts` says which characters go to which expert).
    """
    _check_precision(precision)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(n_batches):
        x, y = data.batch("val", batch_size, gen)
        with _autocast(device, precision):
            loss, _ = model.loss(x.to(device), y.to(device))
        total += loss.item()
        if stats is not None:
            stats.update_model(model, token_ids=x)
    model.train(was_training)
    return total / n_batches


def save_checkpoint(
    path: str | Path,
    model: MoETransformerLM,
    tokenizer: CharTokenizer,
    extra: dict | None = None,
    train_state: dict | None = None,
) -> None:
    """Write ``model.safetensors`` and ``model.json`` (config, vocabulary) under ``path``.

    ``train_state`` (what `train_lm` passes: ``optimizer``, ``scheduler``, ``generator``
    and JSON-able ``info``) adds ``train_state.safetensors`` (optimizer moments, random
    number generator states) and ``train_state.json`` (step, histories, schedule), so
    training can resume. Nothing is pickled. Each safetensors file carries the SHA-256 of
    its tensors (`tensor_digest`) in its metadata; `load_checkpoint` verifies it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)
    meta = {"config": model.cfg.to_dict(), "chars": tokenizer.chars, **(extra or {})}
    (path / "model.json").write_text(json.dumps(meta, indent=1))
    if train_state is not None:
        opt = train_state["optimizer"].state_dict()
        tensors = {"rng.torch": torch.get_rng_state(), "rng.batches": train_state["generator"].get_state()}
        for i, per_param in opt["state"].items():
            for key, v in per_param.items():
                tensors[f"optimizer.{i}.{key}"] = v.detach().contiguous().cpu()
        save_tensors(tensors, path / "train_state.safetensors")
        info = {
            **train_state["info"],
            "optimizer_param_groups": opt["param_groups"],
            "scheduler": train_state["scheduler"].state_dict(),
        }
        (path / "train_state.json").write_text(json.dumps(info))


def _load_train_state(path: Path, optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator) -> dict:
    """Restore what `save_checkpoint` wrote with ``train_state``; return its ``info``."""
    if not (path / "train_state.json").exists():
        raise ValueError(f"{path} has no train_state.json; it cannot be resumed (only evaluated)")
    info = read_json(path / "train_state.json")
    tensors = load_tensors(path / "train_state.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("optimizer."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    groups = info.pop("optimizer_param_groups")
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(info.pop("scheduler"))
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.batches"])
    return info


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder in ``path``: ``path`` itself if it holds ``model.json``, else
    ``path/checkpoint`` (a `train_lm` output folder). ValueError if neither does, or if it
    is a tabular model's (`gatedmoe.models.tabular_io`)."""
    try:
        found = find_model_dir(path, "checkpoint")
    except ValueError:
        if (Path(path) / "model" / "model.json").is_file():  # a tabular run's folder: say so
            _text_model_json(Path(path) / "model")
        raise
    _text_model_json(found)
    return found


def _text_model_json(path: Path) -> dict:
    """``path/model.json``; ValueError if it is a tabular model's (`models.tabular_io`)."""
    meta = read_json(path / "model.json")
    if meta.get("kind") == "tabular_moe":
        raise ValueError(f"{path / 'model.json'} is a TabularMoE's, not a text model's; predict with it: "
                         f"gatedmoe predict {path} rows.csv")
    return meta


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[MoETransformerLM, CharTokenizer, dict]:
    """Inverse of `save_checkpoint`; loading never executes code (safetensors + JSON).

    The config is read with `LMConfig.from_dict`, so checkpoints whose ``model.json`` holds
    the flat config of older versions (``n_experts``, ``k``, ``gate``, ... beside
    ``d_model``) load and resume too. The tensors are checked against the digest stored in
    the file; a missing, truncated, malformed or altered file raises ValueError naming it.
    """
    path = Path(path)
    meta = _text_model_json(path)
    try:
        cfg = LMConfig.from_dict(meta["config"])
        tok = CharTokenizer(meta["chars"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / 'model.json'} does not describe a model: {e!r}") from None
    model = MoETransformerLM(cfg)
    load_weights(model, path)
    return model.to(device), tok, meta


def _check_same_config(ckpt: LMConfig, cfg: LMConfig | None, overrides: dict[str, Any], path: Path) -> None:
    """A resumed run's model comes from its checkpoint; a ``cfg`` or keyword that asks for a
    different one raises ValueError listing each difference."""
    diffs = []
    if cfg is not None and cfg != ckpt:
        want, have = cfg.to_dict(), ckpt.to_dict()
        diffs += [f"{k}={want[k]!r} (checkpoint: {have[k]!r})" for k in want if want[k] != have.get(k) and k != "moe"]
        diffs += [f"moe.{k}={v!r} (checkpoint: {have['moe'].get(k)!r})" for k, v in want["moe"].items()
                  if v != have["moe"].get(k)]
    for k, v in overrides.items():
        have = getattr(ckpt, k) if hasattr(ckpt, k) else getattr(ckpt.moe, k, None)
        if v != have:
            diffs.append(f"{k}={v!r} (checkpoint: {have!r})")
    if diffs:
        raise ValueError(f"resuming {path}: the model comes from the checkpoint, but these settings differ: "
                         f"{', '.join(diffs)}; leave them out, or train a new model without resume")


def _resumed_plan(path: Path, plan: dict, schedule: str | None, schedule_steps: int | None,
                  warmup_steps: int | None, precision: str | None) -> dict:
    """The checkpoint's learning rate, schedule and precision; ValueError if the caller asks
    for others. Checkpoints written before the schedule was stored: the caller's plan (as
    then); before the precision was: float32 (the only one then)."""
    info = read_json(path / "train_state.json") if (path / "train_state.json").exists() else {}
    if "schedule" not in info:
        return plan
    saved = {k: info[k] for k in ("schedule", "schedule_steps", "warmup_steps", "lr")}
    saved["precision"] = info.get("precision", "float32")
    asked = {"schedule": schedule, "schedule_steps": schedule_steps, "warmup_steps": warmup_steps, "lr": plan["lr"],
             "precision": precision}
    diffs = [f"{k}={v!r} (checkpoint: {saved[k]!r})" for k, v in asked.items() if v is not None and v != saved[k]]
    if diffs:
        raise ValueError(f"resuming {path}: the run continues the checkpoint's learning rate, schedule and precision, but these "
                         f"differ: {', '.join(diffs)}; leave them out to continue it")
    return saved


def train_lm(
    text: str,
    cfg: LMConfig | None = None,
    *,
    steps: int = 400,
    batch_size: int = 32,
    micro_batches: int = 1,
    lr: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    eval_every: int = 100,
    eval_batches: int = 8,
    out_dir: str | Path | None = None,
    progress: bool = True,
    resume_from: str | Path | None = None,
    schedule: str | None = None,
    schedule_steps: int | None = None,
    warmup_steps: int | None = None,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
    precision: str | None = None,
    **cfg_overrides: Any,
) -> dict[str, Any]:
    """Train a char-level `MoETransformerLM` on ``text``; return metrics.

    Parameters
    ----------
    text : str
        Training corpus (the last 10% is the validation split).
    cfg : LMConfig, optional
        Model config; default ``LMConfig(vocab_size=<from text>, **cfg_overrides)`` (e.g.
        ``moe=MoEConfig(...), n_layers=2``, or the flat MoE settings ``n_experts=4, k=1``).
    steps, batch_size, lr : training budget and AdamW's peak learning rate (default 3e-3; a
        resumed run: the checkpoint's).
    micro_batches : gradient accumulation: each optimizer step runs ``micro_batches``
        forwards and backwards of ``batch_size`` sequences each (task and auxiliary losses
        divided by ``micro_batches``) before one optimizer step and one `balance_step`, so
        an optimizer step sees ``batch_size * micro_batches`` sequences. Each forward's
        balancing sees one micro-batch (``load_balance_scope="micro_batch"``, bias steps
        with ``bias_update_every="forward"``); the global-batch scope and step-wise bias
        see the whole step. Default 1 (no accumulation).
    device : "cpu", "cuda", ...
    progress, desc : show a progress bar, labelled ``desc``.
    out_dir : if given, writes ``metrics.json``, ``load.png`` and a resumable checkpoint
        (``checkpoint/``) there.
    resume_from : a checkpoint folder (or an ``out_dir`` holding ``checkpoint/``) written by
        `train_lm`: continue from its step to ``steps`` (the total, which must be larger)
        with its model, config, optimizer, learning-rate schedule and random states. A
        ``cfg``, model keyword, ``lr``, ``schedule``, ``schedule_steps`` or
        ``warmup_steps`` that disagrees with the checkpoint raises ValueError.
    schedule : "cosine" (default) or "inverse_sqrt", see `lr_factor`. With "inverse_sqrt"
        the learning rate depends on the step only: 10 steps, then resumed to 14, gives the
        model of 14 steps in one go.
    schedule_steps : horizon of the cosine schedule, default ``steps``. Train in chunks with
        ``steps=n1, schedule_steps=N``, then ``steps=N, resume_from=...``: identical to one
        run of N steps. A resumed run keeps the checkpoint's horizon.
    warmup_steps : linear warm-up, default ``horizon // 20`` (cosine) or 20 (inverse_sqrt).
    on_step : called with the number of steps done after every optimizer step (progress
        reporting from worker processes).
    precision : "float32" (default) or "bf16": mixed precision, the forward and the losses
        (training and validation) under ``torch.autocast(dtype=torch.bfloat16)`` while
        parameters, gradients and AdamW's state stay float32. A resumed run keeps the
        checkpoint's.

    Returns
    -------
    dict with ``train_loss`` (per step), ``val_loss`` (list of ``[step, loss]``),
    ``final_val_loss``, ``tokens_per_s``, ``params``, ``active_params``, ``routing``.
    """
    for name, v in (("steps", steps), ("batch_size", batch_size), ("micro_batches", micro_batches),
                    ("eval_every", eval_every), ("eval_batches", eval_batches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if precision is not None:
        _check_precision(precision)
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    for name, v in (("schedule_steps", schedule_steps), ("warmup_steps", warmup_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    torch.manual_seed(seed)
    tok = CharTokenizer.from_text(text)
    if cfg is not None and cfg_overrides:
        raise ValueError("pass either cfg or keyword overrides, not both")
    resume_path = None if resume_from is None else find_checkpoint(resume_from)
    if resume_path is not None:
        model, ckpt_tok, _ = load_checkpoint(resume_path, device)
        _check_same_config(model.cfg, cfg, cfg_overrides, resume_path)
        cfg = model.cfg
        if ckpt_tok.chars != tok.chars:
            raise ValueError(f"text's characters differ from the vocabulary of the checkpoint in {resume_path}")
    else:
        if cfg is None:
            cfg = LMConfig(vocab_size=tok.vocab_size, **cfg_overrides)
        if cfg.vocab_size != tok.vocab_size:
            raise ValueError(f"cfg.vocab_size={cfg.vocab_size} but the text has {tok.vocab_size} distinct characters")
        model = MoETransformerLM(cfg).to(device)
    data = TextBatches(tok.encode(text), cfg.seq_len)
    plan = {"schedule": schedule or "cosine", "schedule_steps": schedule_steps or steps, "lr": lr,
            "precision": precision or "float32"}
    if resume_path is not None:
        plan = _resumed_plan(resume_path, plan, schedule, schedule_steps, warmup_steps, precision)
    plan["lr"] = plan["lr"] or 3e-3
    opt = torch.optim.AdamW(model.parameters(), lr=plan["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    if warmup_steps is not None or "warmup_steps" not in plan:
        plan["warmup_steps"] = warmup_steps or (20 if plan["schedule"] == "inverse_sqrt"
                                                else max(1, plan["schedule_steps"] // 20))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, plan["schedule"], plan["schedule_steps"], plan["warmup_steps"])
    )
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    val_history: list[list[float]] = []
    n_tokens, start, prior_seconds = 0, 0, 0.0
    if resume_path is not None:
        info = _load_train_state(resume_path, opt, sched, gen)
        start, history, val_history = info["step"], info["train_loss"], info["val_loss"]
        n_tokens, prior_seconds = info["n_tokens"], info["train_seconds"]
        if steps <= start:
            raise ValueError(f"nothing to train: the checkpoint in {resume_path} is at step {start} and steps={steps} "
                             f"is the total, not more; ask for more than {start} steps to continue")
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), disable=not progress, desc=desc, unit="step", initial=start, total=steps)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(micro_batches):
            x, y = data.batch("train", batch_size, gen)
            with _autocast(torch.device(device), plan["precision"]):
                loss, _ = model.loss(x.to(device), y.to(device))
                # aux_loss reads this forward's losses, so it is taken before the next forward.
                total = loss + aux_loss(model)
            (total / micro_batches if micro_batches > 1 else total).backward()
            step_loss += loss.item()
            n_tokens += x.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # Step-wise bias balancing and global-batch balance counts close with the step.
        balance_step(model)
        sched.step()
        history.append(step_loss / micro_batches)
        if on_step is not None:
            on_step(step + 1)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = evaluate_lm(model, data, batch_size, eval_batches, precision=plan["precision"])
            val_history.append([step + 1, val])
            bar.set_postfix(loss=f"{history[-1]:.3f}", val=f"{val:.3f}")
    elapsed = time.perf_counter() - t0 + prior_seconds
    steps_done = max(steps, start)
    stats = RoutingStats()
    final_val = evaluate_lm(model, data, batch_size, eval_batches, stats=stats, precision=plan["precision"])
    summary = stats.summary()
    total_params, active_params = model.n_params({k: v["experts_per_token"] for k, v in summary["layers"].items()})
    metrics = {
        "config": cfg.to_dict(),
        "steps": steps_done,
        "resumed_from_step": start if resume_path is not None else None,
        "batch_size": batch_size,
        "micro_batches": micro_batches,
        "lr": plan["lr"],
        "schedule": plan,
        "seed": seed,
        "device": device,
        "train_loss": history,
        "val_loss": val_history,
        "final_val_loss": final_val,
        "train_seconds": elapsed,
        "tokens_per_s": n_tokens / elapsed if elapsed > 0 else float("nan"),
        "params": total_params,
        "active_params": active_params,
        "routing": summary,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        stats.plot(out / "load.png", title=f"Expert load, gate={cfg.moe.gate}")
        info = {"step": steps_done, "train_loss": history, "val_loss": val_history, "n_tokens": n_tokens,
                "train_seconds": elapsed, "seed": seed, "batch_size": batch_size,
                "micro_batches": micro_batches, **plan}
        save_checkpoint(out / "checkpoint", model, tok, extra={"final_val_loss": final_val, "steps": steps_done},
                        train_state={"optimizer": opt, "scheduler": sched, "generator": gen, "info": info})
    metrics["model"] = model
    metrics["routing_stats"] = stats
    return metrics
