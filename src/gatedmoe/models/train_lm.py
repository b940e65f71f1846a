"""Training loop of the reference language model: progress bar, validation, routing
statistics, checkpoint (safetensors + JSON, resumable), metrics (JSON) and a load plot."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gatedmoe.analysis import RoutingStats
from gatedmoe.layers.moe import aux_loss, balance_step
from gatedmoe.models.text import CharTokenizer, TextBatches
from gatedmoe.models.transformer import LMConfig, MoETransformerLM

__all__ = ["train_lm", "evaluate_lm", "save_checkpoint", "load_checkpoint", "find_checkpoint"]


@torch.no_grad()
def evaluate_lm(model: MoETransformerLM, data: TextBatches, batch_size: int, n_batches: int, seed: int = 1234,
                stats: RoutingStats | None = None) -> float:
    """Mean validation cross-entropy over ``n_batches`` fixed random windows.

    With ``stats``, the routing of every batch is added to it, with the input characters'
    ids (so `RoutingStats.token_expert_counts` says which characters go to which expert).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(n_batches):
        x, y = data.batch("val", batch_size, gen)
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
    training can resume. Nothing is pickled.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    meta = {"config": model.cfg.to_dict(), "chars": tokenizer.chars, **(extra or {})}
    (path / "model.json").write_text(json.dumps(meta, indent=1))
    if train_state is not None:
        opt = train_state["optimizer"].state_dict()
        tensors = {"rng.torch": torch.get_rng_state(), "rng.batches": train_state["generator"].get_state()}
        for i, per_param in opt["state"].items():
            for key, v in per_param.items():
                tensors[f"optimizer.{i}.{key}"] = v.detach().contiguous().cpu()
        save_file(tensors, str(path / "train_state.safetensors"))
        info = {
            **train_state["info"],
            "optimizer_param_groups": opt["param_groups"],
            "scheduler": train_state["scheduler"].state_dict(),
        }
        (path / "train_state.json").write_text(json.dumps(info))


def _load_train_state(path: Path, optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator) -> dict:
    """Restore what `save_checkpoint` wrote with ``train_state``; return its ``info``."""
    from safetensors.torch import load_file

    if not (path / "train_state.json").exists():
        raise ValueError(f"{path} has no train_state.json; it cannot be resumed (only evaluated)")
    info = json.loads((path / "train_state.json").read_text())
    tensors = load_file(str(path / "train_state.safetensors"))
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
    ``path/checkpoint`` (a `train_lm` output folder). ValueError if neither does."""
    path = Path(path)
    for cand in (path, path / "checkpoint"):
        if (cand / "model.json").exists():
            return cand
    raise ValueError(f"no checkpoint (model.json) in {path} or {path / 'checkpoint'}")


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[MoETransformerLM, CharTokenizer, dict]:
    """Inverse of `save_checkpoint`; loading never executes code (safetensors + JSON).

    The config is read with `LMConfig.from_dict`, so checkpoints whose ``model.json`` holds
    the flat config of older versions (``n_experts``, ``k``, ``gate``, ... beside
    ``d_model``) load and resume too.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "model.json").read_text())
    model = MoETransformerLM(LMConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=device))
    return model.to(device), CharTokenizer(meta["chars"]), meta


def train_lm(
    text: str,
    cfg: LMConfig | None = None,
    *,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    device: str = "cpu",
    seed: int = 0,
    eval_every: int = 100,
    eval_batches: int = 8,
    out_dir: str | Path | None = None,
    progress: bool = True,
    resume_from: str | Path | None = None,
    schedule_steps: int | None = None,
    desc: str = "train",
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
    steps, batch_size, lr : training budget and AdamW learning rate (cosine decay, warm-up).
    device : "cpu", "cuda", ...
    progress, desc : show a progress bar, labelled ``desc``.
    out_dir : if given, writes ``metrics.json``, ``load.png`` and a resumable checkpoint
        (``checkpoint/``) there.
    resume_from : a checkpoint folder (or an ``out_dir`` holding ``checkpoint/``) written by
        `train_lm`: continue from its step to ``steps`` (the total) with its model,
        optimizer, schedule and random states; its config replaces ``cfg``.
    schedule_steps : length of the learning-rate schedule (warm-up, cosine decay), default
        ``steps``. Train in chunks with ``steps=n1, schedule_steps=N``, then
        ``steps=N, resume_from=...``: identical to one run of N steps.

    Returns
    -------
    dict with ``train_loss`` (per step), ``val_loss`` (list of ``[step, loss]``),
    ``final_val_loss``, ``tokens_per_s``, ``params``, ``active_params``, ``routing``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    tok = CharTokenizer.from_text(text)
    if cfg is not None and cfg_overrides:
        raise ValueError("pass either cfg or keyword overrides, not both")
    resume_path = None if resume_from is None else find_checkpoint(resume_from)
    if resume_path is not None:
        model, ckpt_tok, _ = load_checkpoint(resume_path, device)
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
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    horizon = steps if schedule_steps is None else schedule_steps
    if horizon < 1:
        raise ValueError(f"schedule_steps must be >= 1, got {schedule_steps}")
    warmup = max(1, horizon // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, horizon) / horizon))),
    )
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    val_history: list[list[float]] = []
    n_tokens, start, prior_seconds = 0, 0, 0.0
    if resume_path is not None:
        info = _load_train_state(resume_path, opt, sched, gen)
        start, history, val_history = info["step"], info["train_loss"], info["val_loss"]
        n_tokens, prior_seconds = info["n_tokens"], info["train_seconds"]
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), disable=not progress, desc=desc, unit="step", initial=start, total=steps)
    for step in bar:
        x, y = data.batch("train", batch_size, gen)
        loss, _ = model.loss(x.to(device), y.to(device))
        total = loss + aux_loss(model)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # Step-wise bias balancing and global-batch balance counts close with the step.
        balance_step(model)
        sched.step()
        history.append(loss.item())
        n_tokens += x.numel()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = evaluate_lm(model, data, batch_size, eval_batches)
            val_history.append([step + 1, val])
            bar.set_postfix(loss=f"{history[-1]:.3f}", val=f"{val:.3f}")
    elapsed = time.perf_counter() - t0 + prior_seconds
    steps_done = max(steps, start)
    stats = RoutingStats()
    final_val = evaluate_lm(model, data, batch_size, eval_batches, stats=stats)
    summary = stats.summary()
    total_params, active_params = model.n_params({k: v["experts_per_token"] for k, v in summary["layers"].items()})
    metrics = {
        "config": cfg.to_dict(),
        "steps": steps_done,
        "resumed_from_step": start if resume_path is not None else None,
        "batch_size": batch_size,
        "lr": lr,
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
                "train_seconds": elapsed}
        save_checkpoint(out / "checkpoint", model, tok, extra={"final_val_loss": final_val, "steps": steps_done},
                        train_state={"optimizer": opt, "scheduler": sched, "generator": gen, "info": info})
    metrics["model"] = model
    metrics["routing_stats"] = stats
    return metrics
