"""simulate(), select_n_experts() and the `gatedmoe simulate` / `gatedmoe fit` commands."""

import argparse
import csv

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from gatedmoe.cli import fit as fit_cmd
from gatedmoe.cli import simulate as simulate_cmd
from gatedmoe.stats import MoEClassifier, MoERegressor, MoETruth, select_n_experts, simulate


def parser():
    # The two subcommands of this package, registered as gatedmoe.cli.main does.
    p = argparse.ArgumentParser(prog="gatedmoe")
    sub = p.add_subparsers(dest="command")
    simulate_cmd.register(sub)
    fit_cmd.register(sub)
    return p


def test_simulate_reports_a_slope_near_minus_one_half():
    res = simulate(n_grid=[200, 2000, 20000], n_reps=3, random_state=0, progress=False)
    assert res.loss_name == "D1" and len(res.rows) == 9
    assert all(s["failed_fraction"] == 0 for s in res.summary)
    assert -0.8 < res.slope < -0.3, res.slope


def test_simulate_over_specified_uses_d2(tmp_path):
    res = simulate(MoETruth.well_separated(2, 1), n_grid=[300, 1200], n_reps=1, n_experts=3, progress=False, max_iter=300)
    assert res.loss_name == "D2"
    assert all(r["loss"] == r["d2"] for r in res.rows if not r["failed"])
    with pytest.raises(ValueError, match="n_experts=1 is below"):
        simulate(MoETruth.well_separated(2, 1), n_grid=[100], n_experts=1, progress=False)


def test_simulate_command_writes_csv_and_png(tmp_path, capsys):
    args = parser().parse_args(["simulate", "--experts", "2", "--n-min", "150", "--n-max", "600", "--n-points", "2",
                                "--reps", "2", "--out", str(tmp_path), "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "log-log slope" in out and "reference -0.5" in out
    with open(tmp_path / "simulate.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {"n", "loss", "failed"} <= set(rows[0])
    assert (tmp_path / "simulate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_command_prints_model_and_bic(tmp_path, capsys):
    X, y, _ = MoETruth.well_separated(2, 1).sample(400, random_state=0)
    path = tmp_path / "data.csv"
    np.savetxt(path, np.column_stack([X, y]), delimiter=",", header="x,target", comments="")
    args = parser().parse_args(["fit", str(path), "--target", "target", "--experts", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    bic = float(out.split("BIC ")[1].split()[0])
    ref = MoERegressor(n_experts=2, random_state=0).fit(X, y).bic(X, y)
    assert bic == pytest.approx(ref, rel=1e-6)
    assert "expert 1" in out
    bad = parser().parse_args(["fit", str(path), "--target", "nope"])
    with pytest.raises(SystemExit, match="not a column"):
        bad.func(bad)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # the 4-expert fit is over-specified
def test_select_n_experts_finds_the_true_number():
    X, y, _ = MoETruth.well_separated(3, 1, random_state=1).sample(1500, random_state=0)
    sel = select_n_experts(X, y, range(1, 5), criterion="bic")
    assert sel.n_experts == 3 and set(sel.scores) == {1, 2, 3, 4}
    assert sel.model.n_experts == 3
    with pytest.raises(ValueError, match="criterion"):
        select_n_experts(X, y, range(1, 3), criterion="cv")
    Xc = np.random.default_rng(0).normal(size=(200, 2))
    yc = (Xc[:, 0] > 0).astype(int)
    assert select_n_experts(Xc, yc, [1, 2], estimator=MoEClassifier(penalty="l1", alpha=1e-2)).n_experts in (1, 2)


def test_fit_command_classifies_string_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    labels = np.where(X[:, 0] + X[:, 1] > 0, "up", "down")
    path = tmp_path / "labels.csv"
    with open(path, "w") as fh:
        fh.write("a,b,label\n")
        fh.writelines(f"{a},{b},{c}\n" for (a, b), c in zip(X, labels, strict=True))
    args = parser().parse_args(["fit", str(path), "--target", "label", "--experts", "2", "--classify", "--n-init", "1",
                                "--l2", "0"])
    with pytest.warns(ConvergenceWarning):  # separable classes: no finite MLE, EM says so
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "class up" in out and "BIC" in out
    numeric = parser().parse_args(["fit", str(path), "--target", "label"])
    with pytest.raises(SystemExit, match="use --classify"):
        numeric.func(numeric)


def test_fit_command_counts_iterations_without_calling_l_bfgs_ones_em(tmp_path, capsys):
    """A default MoEClassifier fits by L-BFGS from the start (0 EM iterations): the printed
    count is ``n_iter_`` and is not called EM iterations."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 2))
    y = (X[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(int)
    path = tmp_path / "labels.csv"
    np.savetxt(path, np.column_stack([X, y]), delimiter=",", header="a,b,label", comments="", fmt="%.17g")
    args = parser().parse_args(["fit", str(path), "--target", "label", "--experts", "2", "--classify"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    ref = MoEClassifier(n_experts=2, random_state=0).fit(X, y.astype(str))
    assert f"converged={ref.converged_} after {ref.n_iter_} iterations" in out, out
    assert "EM iterations" not in out


def test_fit_and_simulate_commands_take_k_and_refuse_topk_without_it(tmp_path, capsys):
    X, y, _ = MoETruth.well_separated(3, 1, gate="topk_softmax", k=1).sample(600, random_state=0)
    path = tmp_path / "data.csv"
    np.savetxt(path, np.column_stack([X, y]), delimiter=",", header="x,target", comments="")
    for argv, match in [(["--gate", "topk_softmax"], "needs --k"), (["--gate", "topk_softmax", "--k", "4"], "--k"),
                        (["--gate", "softmax", "--k", "2"], "--k"), (["--alpha", "0.1"], "--penalty l1")]:
        bad = parser().parse_args(["fit", str(path), "--target", "target", *argv])
        with pytest.raises(SystemExit, match=match):
            bad.func(bad)
    args = parser().parse_args(["fit", str(path), "--target", "target", "--gate", "topk_softmax", "--k", "1",
                                "--n-init", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "gate=topk_softmax, k=1" in out
    ref = MoERegressor(gate="topk_softmax", k=1, n_init=1, random_state=0).fit(X, y)
    assert float(out.split("BIC ")[1].split()[0]) == pytest.approx(ref.bic(X, y), rel=1e-6)
    sim = parser().parse_args(["simulate", "--experts", "2", "--gate", "topk_softmax", "--k", "1", "--n-min", "300",
                               "--n-max", "300", "--n-points", "1", "--reps", "1", "--out", str(tmp_path),
                               "--no-progress"])
    assert sim.func(sim) == 0
    with open(tmp_path / "simulate.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1
    bad = parser().parse_args(["simulate", "--gate", "topk_softmax"])
    with pytest.raises(SystemExit, match="needs --k"):
        bad.func(bad)


@pytest.mark.parametrize("candidates", [[1.5, 2.9], [True, 2], [0, 1], []])
def test_select_n_experts_refuses_non_integer_candidates(candidates):
    # Review: [1.5, 2.9] was silently truncated to {1, 2}.
    X, y, _ = MoETruth.well_separated(2, 1).sample(100, random_state=0)
    with pytest.raises(ValueError, match="n_experts_range"):
        select_n_experts(X, y, candidates)


def test_select_n_experts_takes_numpy_integers():
    X, y, _ = MoETruth.well_separated(2, 1).sample(300, random_state=0)
    assert select_n_experts(X, y, np.array([1, 2])).n_experts == 2


def test_simulate_beyond_known_rbar_asks_for_it_before_any_fit():
    # Review: 5 experts on a 2-expert truth reported every fit failed (slope nan): each
    # voronoi_loss raised "rbar(4) is not known" and simulate counted that as a failed fit.
    truth = MoETruth.well_separated(2, 1)
    with pytest.raises(ValueError, match=r"n_experts=5 .* pass rbar="):
        simulate(truth, n_grid=[300, 1000], n_experts=5, n_reps=1, progress=False)
    res = simulate(truth, n_grid=[300, 1000], n_experts=5, n_reps=1, progress=False, rbar=lambda m: 2 * m,
                   max_iter=300)
    # Every fit's loss is computed (a 5-expert fit may still fail by not converging).
    assert res.loss_name == "D2"
    assert all(np.isfinite(r["d2"]) for r in res.rows)
