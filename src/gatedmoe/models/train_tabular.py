"""Training loop of the tabular models (`TabularMoE`, `TabularMLP`): AdamW on mini-batches,
validation loss and accuracy (classification) or RMSE and R² (regression), routing
statistics of the MoE."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gatedmoe.analysis import RoutingStats
from gatedmoe.data.tabular import target_standardization
from gatedmoe.layers.moe import MoE, aux_loss, balance_step

__all__ = ["train_tabular", "evaluate_tabular"]


def _task_loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out.squeeze(-1), y)


@torch.no_grad()
def evaluate_tabular(model: nn.Module, X: torch.Tensor, y: torch.Tensor, task: str, y_scale: float = 1.0,
                     stats: RoutingStats | None = None) -> dict[str, float]:
    """Validation metrics on the whole of ``X [n, F]``, ``y [n]``.

    Classification: ``loss`` (cross-entropy), ``accuracy``. Regression (``y`` standardized,
    ``y_scale`` its original standard deviation): ``loss`` (MSE, standardized), ``rmse``
    (original units), ``r2``. With ``stats``, adds the routing of the MoE layers.
    """
    was_training = model.training
    model.eval()
    out = model(X)
    model.train(was_training)
    metrics = {"loss": float(_task_loss(out, y, task))}
    if task == "classification":
        metrics["accuracy"] = float((out.argmax(-1) == y).float().mean())
    else:
        mse = float(F.mse_loss(out.squeeze(-1), y))
        metrics["rmse"] = math.sqrt(mse) * y_scale
        var = float(y.var(unbiased=False))
        metrics["r2"] = 1.0 - mse / var if var > 0 else float("nan")
    if stats is not None and any(isinstance(m, MoE) for m in model.modules()):
        stats.update_model(model)
    return metrics


def train_tabular(
    model: nn.Module,
    split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    task: str,
    *,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    eval_every: int = 50,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
    """Train ``model`` on ``split = (X_train, y_train, X_val, y_val)`` (e.g. from
    `gatedmoe.data.TabularDataset.split`); return metrics.

    Regression targets are standardized with the training split's mean and deviation;
    ``rmse`` is reported in the original units. The MoE's auxiliary losses are added.

    Returns
    -------
    dict with ``train_loss`` (per step), ``val_loss`` (list of ``[step, loss]``),
    ``final_val_loss``, ``val_accuracy`` (classification) or ``val_rmse``, ``val_r2``,
    ``target_mean`` and ``target_std`` (regression: the model predicts ``(y - target_mean) /
    target_std``),
    ``rows_per_s``, ``params``, ``active_params``, ``routing`` (empty without MoE) and
    ``routing_stats`` (a `RoutingStats`, or None).
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    X_tr, y_tr, X_va, y_va = split
    torch.manual_seed(seed)
    Xt, Xv = torch.as_tensor(X_tr, dtype=torch.float32), torch.as_tensor(X_va, dtype=torch.float32)
    if task == "classification":
        yt, yv = torch.as_tensor(y_tr, dtype=torch.long), torch.as_tensor(y_va, dtype=torch.long)
        y_scale = 1.0
    else:
        mean, std = target_standardization(y_tr)
        yt = torch.as_tensor((y_tr - mean) / std, dtype=torch.float32)
        yv = torch.as_tensor((y_va - mean) / std, dtype=torch.float32)
        y_scale = std
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    val_history: list[list[float]] = []
    n_rows = 0
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), disable=not progress, desc=desc, unit="step")
    for step in bar:
        idx = torch.randint(0, len(Xt), (min(batch_size, len(Xt)),), generator=gen)
        loss = _task_loss(model(Xt[idx]), yt[idx], task)
        opt.zero_grad(set_to_none=True)
        (loss + aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # Step-wise bias balancing and global-batch balance counts close with the step.
        balance_step(model)
        sched.step()
        history.append(loss.item())
        n_rows += len(idx)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = evaluate_tabular(model, Xv, yv, task, y_scale)["loss"]
            val_history.append([step + 1, val])
            bar.set_postfix(loss=f"{history[-1]:.3f}", val=f"{val:.3f}")
    elapsed = time.perf_counter() - t0
    has_moe = any(isinstance(m, MoE) for m in model.modules())
    stats = RoutingStats() if has_moe else None
    final = evaluate_tabular(model, Xv, yv, task, y_scale, stats=stats)
    summary = stats.summary() if stats is not None else {"layers": {}, "mean": {}}
    total, active = model.n_params({k: v["experts_per_token"] for k, v in summary["layers"].items()})
    metrics: dict[str, Any] = {
        "task": task,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_loss": history,
        "val_loss": val_history,
        "final_val_loss": final["loss"],
        "train_seconds": elapsed,
        "rows_per_s": n_rows / elapsed if elapsed > 0 else float("nan"),
        "params": total,
        "active_params": active,
        "routing": summary,
        "routing_stats": stats,
    }
    for key in ("accuracy", "rmse", "r2"):
        if key in final:
            metrics[f"val_{key}"] = final[key]
    if task == "regression":
        # The model predicts the standardized target: what a prediction is mapped back with.
        metrics["target_mean"], metrics["target_std"] = mean, std
    return metrics
