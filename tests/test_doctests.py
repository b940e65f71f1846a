"""The examples in the docstrings of these modules run and print what they show (STYLE.md asks
for a runnable example on public API), and the Python blocks of README.md and docs/ run as
written: these keep them from going stale."""

import doctest
import importlib
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

MODULES = [
    "gatedmoe.data.tabular",
    "gatedmoe.models.tabular_io",
    "gatedmoe.models.checkpoint_io",
    "gatedmoe.dispatch.options",
    "gatedmoe.layers.config",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"


# The ```python blocks of the user docs run as written (each in a fresh namespace, in a
# temporary folder). A new block is tested unless listed here with the reason it cannot run
# on one CPU process (key: a string found in exactly one block; value: the reason).
DOC_FILES = ["README.md", "docs/DESIGN.md", "docs/gates.md", "docs/interop.md", "docs/stats.md",
             "docs/training.md"]
DOC_SKIPS = {
    "shard_experts(gatedmoe.MoE(1024": "needs torch.distributed ranks (tests/parallel)",
    "from gatedmoe.interop.hf import patch_model\n": "a fragment: `model` is the reader's Hugging Face model",
    'MoERegressor(n_experts=3, gate="softmax"': "a fragment: `X`, `y` are the reader's data",
    "run_text_arena(load_tinyshakespeare()": "300 steps x 2 seeds, about a minute (tests/arena)",
    'experts_implementation="gatedmoe")': "a fragment: `path` is the reader's checkpoint",
    "task_loss(model(micro_batch))": "a fragment: `model`, `dp_group`, `task_loss` are the reader's",
    "gatedmoe.RouterReplay(model)": "a fragment: `model`, `tokens` are the reader's",
    "save_peft_adapter(model": "a fragment: `model` is the reader's Hugging Face model",
    'init_device_mesh("cuda"': "needs CUDA and torch.distributed ranks (tests/parallel)",
}
# Blocks that need a module only the extras install.
DOC_NEEDS = {"from transformers import": "transformers"}
ROOT = Path(__file__).resolve().parent.parent


def _python_blocks():
    for name in DOC_FILES:
        text = (ROOT / name).read_text(encoding="utf-8")
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(match.group(1), id=f"{name}:{line}")


BLOCKS = list(_python_blocks())
RUNNABLE = [p for p in BLOCKS if not any(key in p.values[0] for key in DOC_SKIPS)]


def test_every_doc_skip_names_one_block():
    for key in DOC_SKIPS:
        hits = [p.id for p in BLOCKS if key in p.values[0]]
        assert len(hits) == 1, f"DOC_SKIPS key {key!r} is in {hits or 'no block'}"


def _write_tables(folder):
    """table.csv and new_rows.csv, the files docs/training.md's table example reads."""
    from sklearn.datasets import load_wine

    X, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    for path, rows in [("table.csv", order[:150]), ("new_rows.csv", order[150:])]:
        lines = [",".join([*(f"f{j}" for j in range(X.shape[1])), "label"])]
        lines += [",".join([*map(repr, X[r].tolist()), "abc"[y[r]]]) for r in rows]
        (folder / path).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("code", RUNNABLE)
def test_doc_python_blocks_run(code, tmp_path, monkeypatch):
    for key, module in DOC_NEEDS.items():
        if key in code:
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    if '"table.csv"' in code:
        _write_tables(tmp_path)
    with warnings.catch_warnings():
        # docs/stats.md's select_n_experts fits up to 5 experts to a 3-expert truth: the
        # over-specified fits may stop at max_iter.
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
