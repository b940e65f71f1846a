"""The gate arena: the same small MoE model trained with several gates, same budget and
seeds, on text and on tables; a leaderboard, figures and a self-contained HTML report.

`run_text_arena` / `run_tabular_arena` train (runner.py), `leaderboard` aggregates seeds
(leaderboard.py), `make_plots` / `write_html` draw and report (report.py), and
`write_outputs` writes all of it into one folder (compare.py). ``gatedmoe compare`` is
the command.
"""

from gatedmoe.arena.compare import NOTES, write_outputs
from gatedmoe.arena.leaderboard import COLUMNS, format_leaderboard, leaderboard, write_results
from gatedmoe.arena.report import make_plots, write_html
from gatedmoe.arena.runner import (
    DEFAULT_STEPS,
    DEFAULT_TABULAR_GATES,
    DEFAULT_TEXT_GATES,
    TABULAR_MODEL,
    TABULAR_MOE,
    TEXT_MODEL,
    TEXT_MOE,
    ArenaResult,
    gate_preset,
    run_tabular_arena,
    run_text_arena,
)

__all__ = [
    "ArenaResult",
    "run_text_arena",
    "run_tabular_arena",
    "gate_preset",
    "leaderboard",
    "format_leaderboard",
    "write_results",
    "make_plots",
    "write_html",
    "write_outputs",
    "NOTES",
    "COLUMNS",
    "DEFAULT_TEXT_GATES",
    "DEFAULT_TABULAR_GATES",
    "DEFAULT_STEPS",
    "TEXT_MODEL",
    "TEXT_MOE",
    "TABULAR_MODEL",
    "TABULAR_MOE",
]
