"""A trained `TabularMoE` on disk, and its predictions on new rows.

A checkpoint is a folder as the text models' (`train_lm.save_checkpoint`): ``model.safetensors``
(the weights, with their SHA-256 digest) and ``model.json`` (``"kind": "tabular_moe"``, the
model's settings, the `TabularPreprocessing` fitted on the training split). Loading executes
no code.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gatedmoe.data.tabular import TabularPreprocessing
from gatedmoe.layers.config import MoEConfig
from gatedmoe.models.checkpoint_io import find_model_dir, load_weights, read_json, save_weights
from gatedmoe.models.tabular import TabularMoE

__all__ = ["KIND", "save_tabular_model", "load_tabular_model", "find_tabular_model", "predict_tabular", "batch_dependent"]

# ``model.json``'s "kind": tells a tabular checkpoint from a text one (which has none).
KIND = "tabular_moe"


def save_tabular_model(path: str | Path, model: TabularMoE, preprocessing: TabularPreprocessing,
                       extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``model.json`` under ``path`` (created if needed).
    ``extra``: JSON-able entries added to ``model.json`` (a run's metrics, say). Example:
    `predict_tabular`'s, which saves, loads and predicts."""
    if not isinstance(model, TabularMoE):
        raise TypeError(f"model must be a TabularMoE, got {type(model).__name__}")
    if not isinstance(preprocessing, TabularPreprocessing):
        raise TypeError(f"preprocessing must be a TabularPreprocessing, got {type(preprocessing).__name__}")
    _check_fits(model, preprocessing)
    reserved = {"kind", "model", "preprocessing"} & set(extra or {})
    if reserved:
        raise ValueError(f"extra may not set {', '.join(sorted(reserved))}: the checkpoint's own entries")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)
    settings = {"n_features": model.n_features, "n_outputs": model.n_outputs, "d_embed": model.embed.weight.shape[1],
                "dropout": model.dropout.p, "moe": model.moe.config.to_dict(plain=True)}
    meta = {"kind": KIND, "model": settings, "preprocessing": preprocessing.to_dict(), **(extra or {})}
    (path / "model.json").write_text(json.dumps(meta, indent=1))


def _check_fits(model: TabularMoE, prep: TabularPreprocessing) -> None:
    if (model.n_features, model.n_outputs) != (len(prep.feature_names), prep.n_outputs):
        raise ValueError(f"the model takes {model.n_features} features to {model.n_outputs} outputs, the "
                         f"preprocessing {len(prep.feature_names)} to {prep.n_outputs}")


def find_tabular_model(path: str | Path) -> Path:
    """The checkpoint folder in ``path``: ``path`` itself if it holds ``model.json``, else
    ``path/model`` (a ``gatedmoe train --data table.csv`` output folder). ValueError if
    neither does."""
    return find_model_dir(path, "model")


def load_tabular_model(path: str | Path) -> tuple[TabularMoE, TabularPreprocessing, dict[str, Any]]:
    """Inverse of `save_tabular_model`: ``(model in eval mode, preprocessing, model.json)``.
    ValueError naming the file when it is missing, malformed, altered, or a text model's.
    Example: `predict_tabular`'s."""
    if not (Path(path) / "model.json").is_file() and (Path(path) / "checkpoint" / "model.json").is_file():
        raise ValueError(f"{path} is a text model's run (its checkpoint/); evaluate it with gatedmoe train --eval-only")
    path = find_tabular_model(path)
    meta = read_json(path / "model.json")
    if meta.get("kind") != KIND:
        what = "a text model's (evaluate it with gatedmoe train --eval-only)" if "chars" in meta else "not a tabular model's"
        raise ValueError(f"{path / 'model.json'} is {what}")
    try:
        s = meta["model"]
        model = TabularMoE(s["n_features"], s["n_outputs"], d_embed=s["d_embed"], dropout=s["dropout"],
                           moe=MoEConfig.from_dict(s["moe"]))
        prep = TabularPreprocessing.from_dict(meta["preprocessing"])
        _check_fits(model, prep)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path / 'model.json'} does not describe a tabular model: {e!r}") from None
    load_weights(model, path)
    return model.eval(), prep, meta


def batch_dependent(config: MoEConfig) -> bool:
    """Whether a layer of ``config`` routes a row by the other rows of its batch: expert
    choice (each expert picks its rows from the batch), or a capacity that drops assignments
    past each expert's share of the batch.

    Examples
    --------
    >>> batch_dependent(TabularMoE.default_moe), batch_dependent(TabularMoE.default_moe.replace(gate="expert_choice"))
    (False, True)
    """
    return config.gate == "expert_choice" or config.capacity_factor is not None


@torch.no_grad()
def predict_tabular(model: TabularMoE, preprocessing: TabularPreprocessing, X: np.ndarray,
                    batch_size: int = 4096) -> dict[str, Any]:
    """Predictions for preprocessed rows ``X [n, F]`` (`TabularPreprocessing.transform_csv`),
    in eval mode, ``batch_size`` rows at a time.

    Returns ``{"prediction": list}``: class labels (classification) or values in the
    target's units (regression); classification adds ``"probabilities"``, ``[n, classes]``
    (float32, rows summing to 1).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from gatedmoe.data import load_tabular
    >>> from gatedmoe.models import train_tabular
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> rows = "".join(f"{i % 7},{'red' if i % 3 else 'blue'},{'yes' if i % 7 > 3 else 'no'}\\n" for i in range(60))
    >>> _ = (folder / "t.csv").write_text("a,color,label\\n" + rows)
    >>> data = load_tabular(folder / "t.csv")
    >>> model = TabularMoE(data.X.shape[1], data.n_outputs)
    >>> _ = train_tabular(model, data.split(seed=0), data.task, steps=5, progress=False)
    >>> save_tabular_model(folder / "model", model, data.preprocessing(seed=0))
    >>> model, prep, _ = load_tabular_model(folder / "model")
    >>> _ = (folder / "new.csv").write_text("color,a\\nblue,6\\nred,\\n")
    >>> X, _ = prep.transform_csv(folder / "new.csv")
    >>> out = predict_tabular(model, prep, X)
    >>> len(out["prediction"]), out["probabilities"].shape
    (2, (2, 2))
    """
    if batch_dependent(model.moe.config):
        warnings.warn(f"the model's routing (gate={model.moe.config.gate!r}, capacity_factor="
                      f"{model.moe.config.capacity_factor}) depends on which rows share a batch: a row's prediction "
                      f"changes with batch_size ({batch_size}) and its neighbours", stacklevel=2)
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != model.n_features:
        raise ValueError(f"X must have shape [n, {model.n_features}], got {tuple(X.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
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
