"""Character-level text data for the reference language model."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CharTokenizer", "TextBatches"]


class CharTokenizer:
    """Maps each distinct character of a corpus to an id (sorted, so ids are stable)."""

    def __init__(self, chars: str | list[str]) -> None:
        self.chars = sorted(set(chars))
        if not self.chars:
            raise ValueError("chars must not be empty")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        try:
            return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids: Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class TextBatches:
    """Random contiguous windows of a token stream, split 90/10 into train and validation."""

    def __init__(self, ids: Tensor, seq_len: int, val_fraction: float = 0.1) -> None:
        if ids.numel() < 2 * (seq_len + 1):
            raise ValueError(f"text too short ({ids.numel()} tokens) for seq_len={seq_len}")
        n_val = max(seq_len + 1, int(ids.numel() * val_fraction))
        self.train, self.val = ids[:-n_val], ids[-n_val:]
        self.seq_len = seq_len

    def batch(self, split: str, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of shape ``[batch_size, seq_len]``; targets shifted by one."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, data.numel() - self.seq_len - 1, (batch_size,), generator=generator)
        offsets = torch.arange(self.seq_len + 1)
        window = data[starts[:, None] + offsets]
        return window[:, :-1], window[:, 1:]
