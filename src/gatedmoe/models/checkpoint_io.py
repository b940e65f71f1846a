"""Checkpoint files, shared by the text and tabular models: tensors in safetensors with a
SHA-256 digest of their contents in the file's metadata (verified on load), settings in JSON.
Loading never executes code (nothing is pickled)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["DIGEST_KEY", "tensor_digest", "save_tensors", "load_tensors", "read_json", "find_model_dir",
           "save_weights", "load_weights"]

# The key of the digest in a safetensors file's metadata.
DIGEST_KEY = "gatedmoe.sha256"


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: what a
    checkpoint's safetensors metadata stores and `load_tensors` verifies.

    Examples
    --------
    >>> a = tensor_digest({"w": torch.zeros(2)})
    >>> len(a), a == tensor_digest({"w": torch.zeros(2)}), a == tensor_digest({"w": torch.ones(2)})
    (64, True, False)
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` (contiguous, on the CPU) to ``path`` as safetensors, with their
    `tensor_digest` in the metadata."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={DIGEST_KEY: tensor_digest(tensors)})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a file `save_tensors` wrote, verified against its digest; ValueError
    naming the file when it is missing, truncated, not safetensors or altered."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ValueError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} cannot be read as safetensors (truncated or corrupted?): {e}") from None
    want = meta.get(DIGEST_KEY)
    if want is None:
        warnings.warn(f"{path} has no integrity digest (written before gatedmoe stored one); loaded unverified",
                      stacklevel=3)
    elif tensor_digest(tensors) != want:
        raise ValueError(f"{path} is corrupted: its tensors do not match the SHA-256 digest stored when it was written")
    return tensors


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file; ValueError naming it when missing or malformed.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "model.json"
    >>> _ = path.write_text('{"kind": "x"')
    >>> read_json(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: ...model.json is not valid JSON (truncated or corrupted?): ...
    """
    if not path.is_file():
        raise ValueError(f"{path} is missing: the checkpoint is incomplete")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return doc


def find_model_dir(path: str | Path, subfolder: str) -> Path:
    """The checkpoint folder in ``path``: ``path`` itself if it holds ``model.json``, else
    ``path/subfolder`` (where a training run's output folder keeps it). ValueError if
    neither does.

    Examples
    --------
    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> (run / "checkpoint").mkdir()
    >>> _ = (run / "checkpoint" / "model.json").write_text("{}")
    >>> find_model_dir(run, "checkpoint") == run / "checkpoint"
    True
    """
    path = Path(path)
    for cand in (path, path / subfolder):
        if (cand / "model.json").is_file():
            return cand
    raise ValueError(f"no checkpoint (model.json) in {path} or {path / subfolder}")


def save_weights(model: nn.Module, folder: Path) -> None:
    """``model``'s state dict as ``folder/model.safetensors`` (`save_tensors`).

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_weights(nn.Linear(3, 2), folder)
    >>> sorted(load_tensors(folder / "model.safetensors"))
    ['bias', 'weight']
    """
    save_tensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, folder / "model.safetensors")


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load ``folder/model.safetensors`` into ``model`` (built from ``folder/model.json``);
    ValueError naming both files when the tensors do not fit the model.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_weights(nn.Linear(3, 2), folder)
    >>> load_weights(nn.Linear(3, 2), folder)
    >>> load_weights(nn.Linear(4, 2), folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: ...model.safetensors does not fit the model of ...model.json: ...
    """
    try:
        model.load_state_dict(load_tensors(folder / "model.safetensors"))
    except RuntimeError as e:
        raise ValueError(f"{folder / 'model.safetensors'} does not fit the model of {folder / 'model.json'}: {e}") from None
