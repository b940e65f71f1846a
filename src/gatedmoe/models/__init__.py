"""Small reference models: a char-level MoE transformer LM and its training loop."""

from gatedmoe.models.text import CharTokenizer, TextBatches
from gatedmoe.models.train_lm import evaluate_lm, load_checkpoint, save_checkpoint, train_lm
from gatedmoe.models.transformer import LMConfig, MoETransformerLM

__all__ = [
    "LMConfig",
    "MoETransformerLM",
    "CharTokenizer",
    "TextBatches",
    "train_lm",
    "evaluate_lm",
    "save_checkpoint",
    "load_checkpoint",
]
