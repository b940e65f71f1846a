"""A trained TabularMoE on disk and its predictions on new rows (`gatedmoe.models.tabular_io`,
`TabularPreprocessing`): new rows get exactly what the training rows got, a reloaded model
predicts what the trained one did, and predictions reproduce the training run's own scores."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from gatedmoe.data import TabularPreprocessing, load_tabular
from gatedmoe.models import (
    CharTokenizer,
    LMConfig,
    MoETransformerLM,
    TabularMoE,
    load_tabular_model,
    predict_tabular,
    save_checkpoint,
    save_tabular_model,
    train_tabular,
)


def _classification_csv(path, n=120, seed=0):
    """Numeric, categorical and empty cells; a class that depends on two of the columns."""
    rng = np.random.default_rng(seed)
    lines = ["a,color,b,label"]
    for i in range(n):
        a, b, color = rng.normal(), rng.normal(), rng.choice(["red", "blue", "green"])
        label = "yes" if a + (color == "red") > 0.3 else "no"
        lines.append(f"{'' if i % 11 == 0 else f'{a:.3f}'},{color},{'NA' if i % 13 == 5 else f'{b:.3f}'},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _regression_csv(path, n=150, seed=1):
    rng = np.random.default_rng(seed)
    lines = ["x1,x2,y"]
    for _ in range(n):
        x1, x2 = rng.normal(size=2)
        lines.append(f"{x1:.3f},{x2:.3f},{100 + 30 * x1 - 10 * x2 + rng.normal():.3f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _trained(path, seed=0, steps=40):
    data = load_tabular(path)
    model = TabularMoE(data.X.shape[1], data.n_outputs, d_model=16, n_experts=4, d_hidden=16, gate="softmax")
    metrics = train_tabular(model, data.split(seed=seed), data.task, steps=steps, batch_size=32, seed=seed,
                            eval_every=steps, progress=False)
    prep = data.preprocessing(seed=seed)
    if data.task == "regression":
        prep = dataclasses.replace(prep, target_mean=metrics["target_mean"], target_std=metrics["target_std"])
    return data, model, metrics, prep


def test_transform_csv_gives_new_rows_what_split_gave_the_training_rows(tmp_path):
    """The training file itself, re-read through the preprocessing with its columns in
    another order and an extra column: the rows of `split`, bit for bit."""
    path = _classification_csv(tmp_path / "t.csv")
    data = load_tabular(path)
    prep = data.preprocessing(seed=3)
    X_tr, _, X_va, _ = data.split(seed=3)
    tr, va = data._split_rows(0.2, 3)
    lines = path.read_text().splitlines()
    rows = [line.split(",") for line in lines]
    shuffled = tmp_path / "shuffled.csv"
    order = [3, 2, 0, 1]
    shuffled.write_text("\n".join(",".join([r[j] for j in order] + ["extra" if i == 0 else "x"])
                                  for i, r in enumerate(rows)) + "\n")
    X, target = prep.transform_csv(shuffled)
    assert np.array_equal(X[tr], X_tr) and np.array_equal(X[va], X_va)
    assert target == [r[3] for r in rows[1:]]
    assert prep.categories == {"color": ["blue", "green", "red"]} and set(prep.fill) == {"a", "b"}
    assert prep.fill["a"] == pytest.approx(np.nanmean([float(r[0]) if r[0] else np.nan for r in rows[1:]]))


def test_reloaded_model_predicts_what_the_trained_one_did(tmp_path):
    data, model, metrics, prep = _trained(_classification_csv(tmp_path / "t.csv"))
    save_tabular_model(tmp_path / "m", model, prep, extra={"metrics": {"final_val_loss": metrics["final_val_loss"]}})
    loaded, prep2, meta = load_tabular_model(tmp_path / "m")
    assert prep2 == prep and meta["metrics"]["final_val_loss"] == metrics["final_val_loss"]
    assert loaded.moe.config == model.moe.config and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    X, _ = prep.transform_csv(tmp_path / "t.csv")
    model.eval()
    with torch.no_grad():
        want = torch.softmax(model(torch.as_tensor(X)), -1).numpy()
    got = predict_tabular(loaded, prep2, X, batch_size=7)
    np.testing.assert_allclose(got["probabilities"], want, rtol=1e-6, atol=1e-7)
    assert got["prediction"] == [prep.classes[i] for i in want.argmax(1)]


def test_predictions_reproduce_the_runs_own_validation_scores(tmp_path):
    """Classification accuracy and regression RMSE from `predict_tabular` on the validation
    rows equal what `train_tabular` reported: the target's scaling is carried right."""
    data, model, metrics, prep = _trained(_classification_csv(tmp_path / "c.csv"))
    _, _, X_va, y_va = data.split(seed=0)
    pred = predict_tabular(model, prep, X_va)["prediction"]
    assert np.mean([p == data.classes[y] for p, y in zip(pred, y_va, strict=True)]) == pytest.approx(metrics["val_accuracy"])

    data, model, metrics, prep = _trained(_regression_csv(tmp_path / "r.csv"), steps=60)
    assert prep.target_std != 1.0
    _, _, X_va, y_va = data.split(seed=0)
    pred = np.asarray(predict_tabular(model, prep, X_va)["prediction"])
    rmse = math.sqrt(np.mean((pred - y_va) ** 2))
    assert rmse == pytest.approx(metrics["val_rmse"], rel=1e-4)


def test_preprocessing_round_trips_through_json_and_refuses_inconsistent_fields(tmp_path):
    prep = load_tabular(_classification_csv(tmp_path / "t.csv")).preprocessing()
    assert TabularPreprocessing.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep
    with pytest.raises(ValueError, match="one value per feature"):
        dataclasses.replace(prep, mean=prep.mean[:-1])
    with pytest.raises(ValueError, match="not features"):
        dataclasses.replace(prep, fill={"nope": 1.0})
    with pytest.raises(ValueError, match="target_std"):
        dataclasses.replace(prep, target_std=0.0)


@pytest.mark.parametrize("name,cells,takes", [
    ("a", ["1", " 2.5 ", "-3e2", "1_0", "+7", "0.1"], True),  # what float() reads, spaces included
    ("a", ["1", "", "NA", " nan", "null", "N/A", "-nan"], True),  # missing-value words: the fill
    ("color", ["red", " blue ", "green", "red"], True),
    ("a", ["1", "two"], False),  # a word: the cell-by-cell path names it
    ("a", ["1", "inf"], False),
    ("color", ["red", "purple"], False),
])
def test_fast_columns_equal_the_cell_by_cell_reference(tmp_path, name, cells, takes):
    from gatedmoe.data.tabular import _fast_column

    prep = load_tabular(_classification_csv(tmp_path / "t.csv")).preprocessing()
    fast = _fast_column(cells, prep.categories.get(name), prep.fill.get(name))
    numbered = [(i + 2, []) for i in range(len(cells))]
    if not takes:
        assert fast is None
        with pytest.raises(ValueError, match="line 3"):
            prep._column_cell_by_cell(cells, numbered, name, tmp_path / "x.csv")
        return
    assert np.array_equal(fast, prep._column_cell_by_cell(cells, numbered, name, tmp_path / "x.csv"))
    # A missing value with no fill recorded: the reference's error, not a silent NaN.
    if name == "a" and "" in cells:
        assert _fast_column(cells, None, None) is None


@pytest.mark.parametrize("text,needles", [
    ("a,b,label\n1,red,yes\n", ["lacks the feature column", "'color'"]),
    ("a,color,b\n1,red,2\n2,purple,3\n", ["line 3", "'color'", "'purple'", "not in the training data"]),
    ("a,color,b\n1,red,two\n", ["line 2", "'b'", "'two' is not a number"]),
    ("a,color,b\n", ["at least 1 data row"]),
])
def test_transform_csv_names_file_line_and_column(tmp_path, text, needles):
    prep = load_tabular(_classification_csv(tmp_path / "t.csv")).preprocessing()
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(ValueError) as e:
        prep.transform_csv(bad)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert "bad.csv" in str(e.value)


def test_load_refuses_text_checkpoints_and_altered_files(tmp_path):
    save_checkpoint(tmp_path / "lm", MoETransformerLM(LMConfig(vocab_size=4, d_model=8, n_layers=1, n_heads=2)),
                    CharTokenizer(list("abcd")))
    with pytest.raises(ValueError, match="text model"):
        load_tabular_model(tmp_path / "lm")
    with pytest.raises(ValueError, match="no checkpoint"):
        load_tabular_model(tmp_path / "none")
    _, model, _, prep = _trained(_classification_csv(tmp_path / "t.csv"), steps=2)
    save_tabular_model(tmp_path / "run" / "model", model, prep)
    assert load_tabular_model(tmp_path / "run")[1] == prep  # a run's --out folder finds its model/
    weights = tmp_path / "run" / "model" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupted"):
        load_tabular_model(tmp_path / "run")
    with pytest.raises(ValueError, match="features"):
        save_tabular_model(tmp_path / "x", TabularMoE(5, 2), prep)


@pytest.mark.parametrize("edit", [
    lambda p: p.__setitem__("std", [0.0] * len(p["std"])),
    lambda p: p.__setitem__("mean", [None] * len(p["mean"])),
    lambda p: p.__setitem__("mean", "abc"),
    lambda p: p.__setitem__("classes", ["no", "yes", "maybe"]),
    lambda p: p.__setitem__("task", "regression"),
    lambda p: p.__setitem__("classes", "ny"),
    lambda p: p.__setitem__("target", None),
    lambda p: p.__setitem__("categories", ["color"]),
    lambda p: p.__setitem__("fill", {"a": "x"}),
])
def test_load_refuses_a_hand_edited_preprocessing(tmp_path, edit):
    """Every field is checked on load: a wrong type or size ends in one ValueError naming the
    file, never in NaN or misaligned predictions."""
    _, model, _, prep = _trained(_classification_csv(tmp_path / "t.csv"), steps=2)
    save_tabular_model(tmp_path / "m", model, prep)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    edit(meta["preprocessing"])
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.json does not describe a tabular model"):
        load_tabular_model(tmp_path / "m")


def test_batch_dependent_routing_warns_and_nan_cells_are_filled(tmp_path):
    path = _classification_csv(tmp_path / "t.csv")
    data = load_tabular(path)
    model = TabularMoE(data.X.shape[1], data.n_outputs, d_model=16, n_experts=4, d_hidden=16, gate="expert_choice")
    prep = data.preprocessing()
    X, _ = prep.transform_csv(path)
    with pytest.warns(UserWarning, match="depends on which rows share a batch"):
        predict_tabular(model, prep, X)
    new = tmp_path / "new.csv"
    new.write_text("a,color,b\n-nan,red,nan\n,red,\n")
    X, _ = prep.transform_csv(new)
    assert np.array_equal(X[0], X[1])  # NaN written out is a missing value, as in training
