import numpy as np
import pytest

from gatedmoe.data import load_tabular


@pytest.mark.parametrize("name,task,n_out", [("digits", "classification", 10), ("breast_cancer", "classification", 2),
                                             ("wine", "classification", 3), ("diabetes", "regression", 1)])
def test_sklearn_datasets(name, task, n_out):
    ds = load_tabular(name)
    assert ds.task == task and ds.n_outputs == n_out and ds.X.dtype == np.float32
    X_tr, y_tr, X_va, y_va = ds.split(0.2, seed=0)
    assert len(X_tr) + len(X_va) == len(ds.y)
    assert np.allclose(X_tr.mean(0), 0, atol=1e-4)


def test_csv_categorical_missing_and_target(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("size,color,price,label\n1.0,red,10,yes\n,blue,12,no\n3.0,red,,yes\n4.0,green,15,no\n")
    ds = load_tabular(p)
    assert ds.task == "classification" and ds.classes == ["no", "yes"] and ds.target == "label"
    assert ds.feature_names == ["size", "color", "price"]
    assert ds.X[1, 0] == pytest.approx((1 + 3 + 4) / 3)  # missing -> column mean
    assert sorted(set(ds.X[:, 1])) == [0.0, 1.0, 2.0]  # blue, green, red
    with pytest.raises(ValueError, match="empty cells"):
        load_tabular(p, target="price")
    q = tmp_path / "r.csv"
    q.write_text("x,y\n" + "".join(f"{i},{i * 0.37:.2f}\n" for i in range(30)))
    reg = load_tabular(q)
    assert reg.task == "regression" and reg.n_outputs == 1 and reg.y.dtype == np.float32


def test_bad_datasets(tmp_path):
    with pytest.raises(ValueError, match="digits"):
        load_tabular("mnist")
    with pytest.raises(ValueError, match="does not exist"):
        load_tabular(tmp_path / "missing.csv")
    p = tmp_path / "t.csv"
    p.write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(ValueError, match="target column 'c'"):
        load_tabular(p, target="c")


def test_csv_numeric_class_labels_are_numbers(tmp_path):
    """"1" and "1.0" are one class (a spreadsheet may write either): classes are the integers."""
    p = tmp_path / "t.csv"
    p.write_text("x,y\n" + "".join(f"{i},{('1', '1.0', '0', '0.0', ' 2')[i % 5]}\n" for i in range(20)))
    ds = load_tabular(p)
    assert ds.task == "classification" and ds.classes == ["0", "1", "2"]
    assert list(ds.y[:5]) == [1, 1, 0, 0, 2]
    prep = ds.preprocessing()
    assert prep.class_labels(["1.0", "0", " 2 ", "NA", ""]) == ["1", "0", "2", None, None]
    # Cells int() cannot read stay text (a wrong label, scored as such), never an exception.
    assert prep.class_labels(["--5", "\u00b2", "+2"]) == ["--5", "\u00b2", "2"]


@pytest.mark.parametrize("text,needles", [
    ("x,y\n1,2.5\n2,NA\n3,4.5\n4,na\n", ["target column 'y'", "empty cells (or NA)", "line(s) 3, 5"]),
    ("x,y\n1,2.5\n2,inf\n3,4.5\n", ["line 3", "target column 'y'", "not a finite number"]),
    ("x,z,y\n1,2,3\ninf,2,3\n3,4,5\n", ["line 3", "column 'x'", "'inf' is not a finite number"]),
    ("a,a,y\n1,2,3\n2,3,4\n", ["'a' more than once"]),
    ("y,a,y\n1,2,3\n2,3,4\n", ["'y' more than once"]),
])
def test_csv_refuses_missing_targets_infinities_and_repeated_columns(tmp_path, text, needles):
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        load_tabular(p)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_csv_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes(("\ufeffa,b,y\n" + "".join(f"{i},{i % 3},{'xz'[i % 2]}\n" for i in range(6))).encode("utf-8"))
    ds = load_tabular(p)
    assert ds.feature_names == ["a", "b"]
    new = tmp_path / "new.csv"
    new.write_text("b,a\n5,6\n")
    X, target = ds.preprocessing().transform_csv(new)
    assert X.shape == (1, 2) and target is None


def test_csv_warns_when_a_few_words_make_numbers_categorical(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("income,y\n" + "".join(f"{'unknown' if i == 7 else 1000 + i},{i % 2}\n" for i in range(40)))
    with pytest.warns(UserWarning, match=r"'income' is taken as categorical .* 'unknown' on line 9"):
        ds = load_tabular(p)
    assert "income" in ds.categories
    q = tmp_path / "q.csv"
    q.write_text("income,y\n" + "".join(f"{'N/A' if i == 7 else 1000 + i},{i % 2}\n" for i in range(40)))
    assert load_tabular(q).categories == {}  # N/A is a missing value: the column stays numeric


def test_csv_large_integer_labels_stay_distinct(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("x,y\n" + "".join(f"{i},{9007199254740992 + i % 2}\n" for i in range(10)))
    assert load_tabular(p).classes == ["9007199254740992", "9007199254740993"]
