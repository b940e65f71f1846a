"""Small reference models: a char-level MoE transformer LM, a tabular MoE and its dense
baseline, and their training loops."""

from gatedmoe.models.params import count_params
from gatedmoe.models.tabular import FeatureEmbedding, TabularMLP, TabularMoE
from gatedmoe.models.tabular_io import load_tabular_model, predict_tabular, save_tabular_model
from gatedmoe.models.text import CharTokenizer, TextBatches
from gatedmoe.models.train_lm import (
    evaluate_lm,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    train_lm,
)
from gatedmoe.models.train_tabular import evaluate_tabular, train_tabular
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
    "find_checkpoint",
    "TabularMoE",
    "TabularMLP",
    "FeatureEmbedding",
    "train_tabular",
    "evaluate_tabular",
    "save_tabular_model",
    "load_tabular_model",
    "predict_tabular",
    "count_params",
]
