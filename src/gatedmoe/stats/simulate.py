"""Estimation-rate simulations: draw from a known MoE, fit over a grid of n, loss vs n.

The theory (Nguyen, Nguyen & Ho 2023) says the MLE's Voronoi loss falls like ``n^{-1/2}``
(up to log factors): ``D1`` when the number of experts is known, ``D2`` when it is
over-specified. `simulate` measures the log-log slope and the fraction of failed fits.
"""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from gatedmoe.stats.regressor import MoERegressor
from gatedmoe.stats.truth import MoETruth
from gatedmoe.stats.voronoi import RBAR, voronoi_loss

__all__ = ["simulate", "SimulationResult", "REFERENCE_SLOPE"]

REFERENCE_SLOPE = -0.5
FIELDS = ["n", "rep", "loss", "d1", "d2", "matched", "failed", "converged", "n_iter", "seconds", "loglik_gap"]


@dataclass
class SimulationResult:
    """Per-fit rows (`FIELDS`), the loss used, and the fitted log-log slope of the mean
    loss of successful fits against n."""

    rows: list
    loss_name: str
    slope: float
    intercept: float
    reference_slope: float = REFERENCE_SLOPE
    summary: list = field(default_factory=list)

    def to_csv(self, path) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)

    def plot(self, path) -> None:
        """Loss vs n on log-log axes with the fitted and the reference (-1/2) slope; PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in self.rows if not r["failed"]]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.scatter([r["n"] for r in ok], [r["loss"] for r in ok], s=8, alpha=0.4, label="fits")
        ns = np.array([s["n"] for s in self.summary if np.isfinite(s["mean_loss"])])
        means = np.array([s["mean_loss"] for s in self.summary if np.isfinite(s["mean_loss"])])
        ax.plot(ns, means, "o-", label="mean")
        if ns.size:
            ax.plot(ns, np.exp(self.intercept) * ns**self.slope, "--", label=f"fit slope {self.slope:.2f}")
            ax.plot(ns, means[0] * (ns / ns[0]) ** self.reference_slope, ":", color="k",
                    label=f"reference slope {self.reference_slope}")
        ax.set_xscale("log")
        if ok:
            ax.set_yscale("log")
            ax.legend()
        else:
            # No loss to draw (matplotlib cannot log-scale an empty axis): the figure says why.
            ax.text(0.5, 0.5, "every fit failed", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlabel("n")
        ax.set_ylabel(f"Voronoi loss {self.loss_name}")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def simulate(
    truth: MoETruth | None = None,
    n_grid=(100, 316, 1000, 3162, 10000, 31623, 100000),
    n_reps: int = 10,
    n_experts: int | None = None,
    random_state=0,
    progress: bool = True,
    failure_slack: float = 1e-4,
    rbar=None,
    **fit_params,
) -> SimulationResult:
    """Fit `MoERegressor` to samples of ``truth`` for each n in ``n_grid``, ``n_reps`` times.

    Parameters
    ----------
    truth : MoETruth, default ``MoETruth.well_separated(3, 1)``
    n_grid : iterable of int
    n_reps : int
    n_experts : int or None
        Experts to fit (None: as many as the truth; more gives the over-specified case).
    failure_slack : float
        A fit *failed* if it raised, did not converge, or its mean log-likelihood is below
        the truth's by more than this (the MLE can never be below the truth's likelihood).
    rbar : callable ``m -> r`` or None
        Passed to `voronoi_loss`: the exponent of ``D2`` for a Voronoi cell of ``m`` fitted
        experts. Needed when ``n_experts`` exceeds the truth's by more than 2 (a cell may
        then hold more experts than `gatedmoe.stats.voronoi.RBAR` knows; a ``ValueError``
        before any fit otherwise).
    **fit_params : passed to `MoERegressor`.

    Examples
    --------
    >>> res = simulate(n_grid=[200, 800], n_reps=2, progress=False)
    >>> len(res.rows)
    4
    """
    truth = truth or MoETruth.well_separated(3, 1)
    n_experts = n_experts or truth.n_experts
    if n_experts < truth.n_experts:
        raise ValueError(f"n_experts={n_experts} is below the truth's {truth.n_experts}: the losses need k >= k*")
    most_in_a_cell = n_experts - truth.n_experts + 1
    if rbar is None and most_in_a_cell not in RBAR:
        # Checked here: inside the loop voronoi_loss's error would only mark every fit failed.
        raise ValueError(
            f"n_experts={n_experts} over a {truth.n_experts}-expert truth can put {most_in_a_cell} fitted experts "
            f"in one Voronoi cell, and rbar({most_in_a_cell}) is not known in closed form: pass rbar= "
            f"(an exponent for cells of m > {max(RBAR)} experts)"
        )
    if n_reps < 1:
        raise ValueError(f"n_reps must be >= 1, got {n_reps}")
    n_grid = sorted(int(n) for n in n_grid)
    if not n_grid or n_grid[0] < n_experts:
        raise ValueError(f"n_grid must hold sizes >= n_experts={n_experts}, got {n_grid}")
    loss_name = "D1" if n_experts == truth.n_experts else "D2"
    rng = check_random_state(random_state)
    params = {"gate": truth.gate, "k": truth.k, "temperature": truth.temperature, **fit_params}
    jobs = [(n, rep) for n in n_grid for rep in range(n_reps)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="simulate", unit="fit")
    rows = []
    for n, rep in jobs:
        X, y, _ = truth.sample(n, random_state=rng)
        row = {"n": n, "rep": rep}
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = MoERegressor(n_experts=n_experts, random_state=rng.randint(2**31 - 1), **params).fit(X, y)
            loss = voronoi_loss(model, truth, rbar=rbar)
            gap = (model.loglik(X, y) - truth.loglik(X, y)) / n
            row.update(loss=loss.d1 if loss_name == "D1" else loss.d2, d1=loss.d1, d2=loss.d2,
                       matched=loss.matched, converged=model.converged_, n_iter=model.n_iter_, loglik_gap=gap,
                       failed=bool(not model.converged_ or gap < -failure_slack))
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            row.update(loss=np.nan, d1=np.nan, d2=np.nan, matched=None, converged=False, n_iter=0,
                       loglik_gap=np.nan, failed=True)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    summary = []
    for n in n_grid:
        ok = [r["loss"] for r in rows if r["n"] == n and not r["failed"]]
        n_all = sum(r["n"] == n for r in rows)
        summary.append({"n": n, "mean_loss": float(np.mean(ok)) if ok else np.nan,
                        "median_loss": float(np.median(ok)) if ok else np.nan,
                        "failed_fraction": 1.0 - len(ok) / n_all})
    pts = [(np.log(s["n"]), np.log(s["mean_loss"])) for s in summary if np.isfinite(s["mean_loss"])]
    if len(pts) >= 2:
        slope, intercept = np.polyfit(*zip(*pts, strict=True), 1)
    else:
        slope = intercept = np.nan
    return SimulationResult(rows, loss_name, float(slope), float(intercept), REFERENCE_SLOPE, summary)
