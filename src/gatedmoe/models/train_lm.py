"""Training loop of the reference language model: progress bar, validation, routing
statistics, checkpoint (safetensors), metrics (JSON) and a load plot."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gatedmoe.analysis import RoutingStats
from gatedmoe.layer import aux_loss
from gatedmoe.models.text import CharTokenizer, TextBatches
from gatedmoe.models.transformer import LMConfig, MoETransformerLM

__all__ = ["train_lm", "evaluate_lm", "save_checkpoint", "load_checkpoint"]


@torch.no_grad()
def evaluate_lm(model: MoETransformerLM, data: TextBatches, batch_size: int, n_batches: int, seed: int = 1234,
                stats: RoutingStats | None = None) -> float:
    """Mean validation cross-entropy over ``n_batches`` fixed random windows."""
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
            stats.update_model(model)
    model.train(was_training)
    return total / n_batches


def save_checkpoint(path: str | Path, model: MoETransformerLM, tokenizer: CharTokenizer, extra: dict | None = None) -> None:
    """Write ``model.safetensors`` and ``model.json`` (config, vocabulary) under ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    meta = {"config": model.cfg.to_dict(), "chars": tokenizer.chars, **(extra or {})}
    (path / "model.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[MoETransformerLM, CharTokenizer, dict]:
    """Inverse of `save_checkpoint`; loading never executes code (safetensors + JSON)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "model.json").read_text())
    model = MoETransformerLM(LMConfig(**meta["config"]))
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
    **cfg_overrides: Any,
) -> dict[str, Any]:
    """Train a char-level `MoETransformerLM` on ``text``; return metrics.

    Parameters
    ----------
    text : str
        Training corpus (the last 10% is the validation split).
    cfg : LMConfig, optional
        Model config; default ``LMConfig(vocab_size=<from text>, **cfg_overrides)``.
    steps, batch_size, lr : training budget and AdamW learning rate (cosine decay, warm-up).
    device : "cpu", "cuda", ...
    out_dir : if given, writes ``metrics.json``, ``load.png`` and a checkpoint there.

    Returns
    -------
    dict with ``train_loss`` (per step), ``val_loss`` (list of ``[step, loss]``),
    ``final_val_loss``, ``tokens_per_s``, ``params``, ``active_params``, ``routing``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    tok = CharTokenizer.from_text(text)
    if cfg is None:
        cfg = LMConfig(vocab_size=tok.vocab_size, **cfg_overrides)
    elif cfg_overrides:
        raise ValueError("pass either cfg or keyword overrides, not both")
    if cfg.vocab_size != tok.vocab_size:
        raise ValueError(f"cfg.vocab_size={cfg.vocab_size} but the text has {tok.vocab_size} distinct characters")
    data = TextBatches(tok.encode(text), cfg.seq_len)
    model = MoETransformerLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    val_history: list[list[float]] = []
    n_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(range(steps), disable=not progress, desc="train", unit="step")
    for step in bar:
        x, y = data.batch("train", batch_size, gen)
        loss, _ = model.loss(x.to(device), y.to(device))
        total = loss + aux_loss(model)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(loss.item())
        n_tokens += x.numel()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = evaluate_lm(model, data, batch_size, eval_batches)
            val_history.append([step + 1, val])
            bar.set_postfix(loss=f"{history[-1]:.3f}", val=f"{val:.3f}")
    elapsed = time.perf_counter() - t0
    stats = RoutingStats()
    final_val = evaluate_lm(model, data, batch_size, eval_batches, stats=stats)
    total_params, active_params = model.n_params()
    metrics = {
        "config": cfg.to_dict(),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "device": device,
        "train_loss": history,
        "val_loss": val_history,
        "final_val_loss": final_val,
        "train_seconds": elapsed,
        "tokens_per_s": n_tokens / elapsed,
        "params": total_params,
        "active_params": active_params,
        "routing": stats.summary(),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        stats.plot(out / "load.png", title=f"Expert load, gate={cfg.gate}")
        save_checkpoint(out / "checkpoint", model, tok, extra={"final_val_loss": final_val, "steps": steps})
    metrics["model"] = model
    metrics["routing_stats"] = stats
    return metrics
