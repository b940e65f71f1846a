"""A trained `TabularMoE` on disk, and its predictions on new rows.

A checkpoint is a folder as the text models' (`train_lm.save_checkpoint`): ``model.safetensors``
(the weights, with their SHA-256 digest) and ``model.json`` (``"kind": "tabular_moe"``, the
model's settings, the `TabularPreprocessing` fitted on the training split). Loading executes
no code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gatedmoe.data.tabular import TabularPreprocessing
from gatedmoe.layers.config import MoEConfig
from gatedmoe.models.checkpoint_io import load_tensors, read_json, save_tensors
from gatedmoe.models.tabular import TabularMoE

__all__ = ["KIND", "save_tabular_model", "load_tabular_model", "find_tabular_model", "predict_tabular"]

# ``model.json``'s "kind": tells a tabular checkpoint from a text one (which has none).
KIND = "tabular_moe"


def save_tabular_model(path: str | Path, model: TabularMoE, preprocessing: TabularPreprocessing,
                       extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``model.json`` under ``path`` (created if needed).
    ``extra``: JSON-able entries added to ``model.json`` (a run's metrics, say)."""
    if not isinstance(model, TabularMoE):
        raise TypeError(f"model must be a TabularMoE, got {type(model).__name__}")
    if not isinstance(preprocessing, TabularPreprocessing):
        raise TypeError(f"preprocessing must be a TabularPreprocessing, got {type(preprocessing).__name__}")
    if (model.n_features, model.n_outputs) != (len(preprocessing.feature_names), preprocessing.n_outputs):
        raise ValueError(f"the model takes {model.n_features} features to {model.n_outputs} outputs, the "
                         f"preprocessing {len(preprocessing.feature_names)} to {preprocessing.n_outputs}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path / "model.safetensors")
    settings = {"n_features": model.n_features, "n_outputs": model.n_outputs, "d_embed": model.embed.weight.shape[1],
                "dropout": model.dropout.p, "moe": model.moe.config.to_dict(plain=True)}
    meta = {"kind": KIND, "model": settings, "preprocessing": preprocessing.to_dict(), **(extra or {})}
    (path / "model.json").write_text(json.dumps(meta, indent=1))


def find_tabular_model(path: str | Path) -> Path:
    """The checkpoint folder in ``path``: ``path`` itself if it holds ``model.json``, else
    ``path/model`` (a ``gatedmoe train --data table.csv`` output folder). ValueError if
    neither does."""
    path = Path(path)
    for cand in (path, path / "model"):
        if (cand / "model.json").is_file():
            return cand
    raise ValueError(f"no model (model.json) in {path} or {path / 'model'}")


def load_tabular_model(path: str | Path) -> tuple[TabularMoE, TabularPreprocessing, dict[str, Any]]:
    """Inverse of `save_tabular_model`: ``(model in eval mode, preprocessing, model.json)``.
    ValueError naming the file when it is missing, malformed, altered, or a text model's."""
    path = find_tabular_model(path)
    meta = read_json(path / "model.json")
    if meta.get("kind") != KIND:
        what = "a text model's (predict with gatedmoe train --eval-only)" if "chars" in meta else "not a tabular model's"
        raise ValueError(f"{path / 'model.json'} is {what}")
    try:
        s = meta["model"]
        model = TabularMoE(s["n_features"], s["n_outputs"], d_embed=s["d_embed"], dropout=s["dropout"],
                           moe=MoEConfig.from_dict(s["moe"]))
        prep = TabularPreprocessing.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / 'model.json'} does not describe a tabular model: {e!r}") from None
    try:
        model.load_state_dict(load_tensors(path / "model.safetensors"))
    except RuntimeError as e:
        raise ValueError(f"{path / 'model.safetensors'} does not fit the model of {path / 'model.json'}: {e}") from None
    return model.eval(), prep, meta


@torch.no_grad()
def predict_tabular(model: TabularMoE, preprocessing: TabularPreprocessing, X: np.ndarray,
                    batch_size: int = 4096) -> dict[str, Any]:
    """Predictions for preprocessed rows ``X [n, F]`` (`TabularPreprocessing.transform_csv`),
    in eval mode, ``batch_size`` rows at a time.

    Returns ``{"prediction": list}``: class labels (classification) or values in the
    target's units (regression); classification adds ``"probabilities"``, ``[n, classes]``.
    """
    if X.ndim != 2 or X.shape[1] != model.n_features:
        raise ValueError(f"X must have shape [n, {model.n_features}], got {tuple(X.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = [model(torch.as_tensor(X[i:i + batch_size], device=device)).float().cpu()
            for i in range(0, len(X), batch_size)]
    model.train(was_training)
    out = torch.cat(outs) if outs else torch.empty(0, model.n_outputs)
    if preprocessing.task == "classification":
        probs = torch.softmax(out, -1).numpy()
        return {"prediction": [preprocessing.classes[i] for i in probs.argmax(1)], "probabilities": probs}
    values = out[:, 0].double().numpy() * preprocessing.target_std + preprocessing.target_mean
    return {"prediction": values.tolist()}
