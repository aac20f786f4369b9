"""HypergradSearchCV against GridSearchCV, RandomizedSearchCV and Optuna (TPE) as the dimension grows.

One process, one dataset (``digits`` by default, bundled with scikit-learn),
the protocol of ``bench_vs_sklearn.py``: a stratified 40 / 30 / 30 split; the
first 40 % trains a pool of up to 50 diverse classifiers once (then frozen),
every search sees only the next 30 %, the last 30 % is the test set.

The tuned estimator is always the same: ``AggregatedClassifier`` over the
frozen pool with ``Stacking`` (multinomial-logistic meta-learner on the base
probabilities). The dimension ``d`` of the search is the number of L2
weights: ``d = 1`` is one weight shared by the first 10 models
(``Stacking(per_model_l2=False)``), ``d >= 2`` is one weight per model over
the first ``d`` models. Every search uses the same 5 stratified folds and
the cross-validated log-loss, and refits its best point on all 30 %; every
fit of every search recomputes the base models' predictions, as scikit-learn
tuning does.

=======================  ===================================================
HypergradSearchCV        ``{"aggregator__l2": loguniform(1e-4, 1e2)}``: all
                         ``d`` weights solved together by implicit
                         hypergradients on the summed 5-fold validation
                         loss, then 5 split refits for ``cv_results_``
GridSearchCV             20 log-spaced points for d = 1; a 5 x 5 grid for
                         d = 2; 20**d fits are out of reach beyond
                         (not run, marked as such)
RandomizedSearchCV       log-uniform draws of the ``d`` weights; default
                         budget (n_iter=10) and, in the equal-time arm, as
                         many draws as fit in HypergradSearchCV's wall time
Optuna TPE               seeded TPE over the ``d`` log-scaled weights;
                         default budget 50 trials and, in the equal-time
                         arm, ``timeout`` = HypergradSearchCV's wall time
=======================  ===================================================

The black-box searches tune the estimator with ``hyperparams={"l2": ...}``
fixed and ``max_outer_iter=0`` (one fit of the meta-learner per point, no
inner validation). Wall times include each search's final refit.

Run: ``python benchmarks/bench_search.py [--quick] [--dims 1 2 10 50]
[--dataset digits] [--methods hoag ...]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import loguniform
from sklearn.base import clone
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import (
    GridSearchCV,
    RandomizedSearchCV,
    StratifiedKFold,
    cross_val_score,
)
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_sklearn import library_version, load, split, warm_up  # noqa: E402

from aggregators import AggregatedClassifier, HypergradSearchCV, Stacking  # noqa: E402

LOW, HIGH = 1e-4, 1e2


def model_zoo(n: int, seed: int) -> list:
    """``n`` diverse classifiers, cycling through families so any prefix is mixed."""
    families = [
        lambda i: make_pipeline(StandardScaler(), LogisticRegression(C=10.0 ** (i % 5 - 2), max_iter=3000)),
        lambda i: DecisionTreeClassifier(max_depth=3 + i % 6, random_state=seed + i),
        lambda i: make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=3 + 2 * (i % 8))),
        lambda i: RandomForestClassifier(20, max_depth=4 + i % 5, random_state=seed + i),
        lambda i: GaussianNB(var_smoothing=10.0 ** (-9 + i % 4)),
        lambda i: ExtraTreesClassifier(20, max_depth=4 + i % 5, random_state=seed + i),
    ]
    return [(f"m{i:02d}", families[i % len(families)](i // len(families))) for i in range(n)]


class L2Draws:
    """``hyperparams`` dicts with ``d`` log-uniform L2 weights (for RandomizedSearchCV)."""

    def __init__(self, d: int):
        self.d = d

    def rvs(self, random_state=None):
        v = loguniform(LOW, HIGH).rvs(self.d, random_state=random_state)
        return {"l2": float(v[0]) if self.d == 1 else v}


def make_estimator(pool: list, d: int, seed: int) -> AggregatedClassifier:
    models = pool[:10] if d == 1 else pool[:d]
    # "fixed": every method searches the L2 weights alone (HypergradSearchCV
    # would otherwise also tune l2_scale, which the other methods hold).
    return AggregatedClassifier(
        models, aggregator=Stacking(per_model_l2=d > 1), hyperparams="fixed", random_state=seed
    )


def fixed(est: AggregatedClassifier) -> AggregatedClassifier:
    return clone(est).set_params(max_outer_iter=0, hyperparams={"l2": 1e-2})


def evaluate(est, X_test, y_test) -> dict:
    proba = est.predict_proba(X_test)
    return {
        "test log-loss": log_loss(y_test, proba, labels=est.classes_),
        "test accuracy": accuracy_score(y_test, est.classes_[proba.argmax(1)]),
    }


def run_dim(d: int, pool, data, args) -> list[dict]:
    X, y, X_test, y_test = data
    cv = StratifiedKFold(5, shuffle=True, random_state=args.seed)
    est = make_estimator(pool, d, args.seed)
    rows = []

    def record(method, arm, seconds, best, cv_loss, n_points):
        rows.append({"d": d, "method": method, "budget": arm, "seconds": seconds,
                     "points": n_points, "cv log-loss": cv_loss,
                     **evaluate(best, X_test, y_test)})
        r = rows[-1]
        print(f"  d={d:<3} {method:<20} {arm:<11} {seconds:7.1f} s  points {n_points:>4}  "
              f"cv {cv_loss:.4f}  test {r['test log-loss']:.4f}  acc {r['test accuracy']:.3f}",
              flush=True)

    t0 = time.perf_counter()
    hs = HypergradSearchCV(
        est, {"aggregator__l2": loguniform(LOW, HIGH)}, cv=cv, scoring="neg_log_loss",
        random_state=args.seed,
    ).fit(X, y)
    budget = time.perf_counter() - t0
    record("HypergradSearchCV", "-", budget, hs.best_estimator_, -hs.best_score_,
           len(hs.solve_histories_[0]))
    for method in args.methods:  # other hypergradient methods, outside the budget
        t0 = time.perf_counter()
        other = HypergradSearchCV(
            est, {"aggregator__l2": loguniform(LOW, HIGH)}, cv=cv, scoring="neg_log_loss",
            random_state=args.seed, method=method,
        ).fit(X, y)
        record(f"HypergradSearchCV {method}", "-", time.perf_counter() - t0,
               other.best_estimator_, -other.best_score_, len(other.solve_histories_[0]))

    base = fixed(est)
    grid_points = {1: 20, 2: 5}.get(d)
    if grid_points is not None:
        values = np.logspace(math.log10(LOW), math.log10(HIGH), grid_points)
        if d == 1:
            grid = [{"l2": float(v)} for v in values]
        else:
            grid = [{"l2": np.array([a, b])} for a in values for b in values]
        t0 = time.perf_counter()
        gs = GridSearchCV(base, {"hyperparams": grid}, cv=cv, scoring="neg_log_loss").fit(X, y)
        record("GridSearchCV", "default", time.perf_counter() - t0, gs.best_estimator_,
               -gs.best_score_, len(grid))
    else:
        rows.append({"d": d, "method": "GridSearchCV", "budget": f"20^{d} points: not run"})

    per_point = None
    for arm in ("default", "equal time"):
        if arm == "default":
            n_iter = 10
        else:
            n_iter = max(1, int((budget - per_point / 5) // per_point))
        t0 = time.perf_counter()
        rs = RandomizedSearchCV(
            base, {"hyperparams": L2Draws(d)}, n_iter=n_iter, cv=cv, scoring="neg_log_loss",
            random_state=args.seed,
        ).fit(X, y)
        seconds = time.perf_counter() - t0
        if arm == "default":
            per_point = seconds / (n_iter + 0.2)  # 5 fold fits per point, + one refit
        record("RandomizedSearchCV", arm, seconds, rs.best_estimator_, -rs.best_score_, n_iter)

    for arm in ("default", "equal time"):
        best, info = run_optuna(base, X, y, cv, d, arm, budget, args.seed)
        record("Optuna TPE", arm, info["seconds"], best, info["cv"], info["points"])
    return rows


def run_optuna(base, X, y, cv, d, arm, budget, seed):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def params(trial_or_dict):
        get = trial_or_dict.suggest_float if hasattr(trial_or_dict, "suggest_float") else None
        v = [get(f"l2_{j}", LOW, HIGH, log=True) if get else trial_or_dict[f"l2_{j}"]
             for j in range(d)]
        return {"l2": v[0] if d == 1 else np.array(v)}

    def objective(trial):
        est = clone(base).set_params(hyperparams=params(trial))
        return -cross_val_score(est, X, y, cv=cv, scoring="neg_log_loss").mean()

    t0 = time.perf_counter()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    if arm == "default":
        study.optimize(objective, n_trials=50)
    else:
        study.optimize(objective, timeout=budget)
    best = clone(base).set_params(hyperparams=params(study.best_params)).fit(X, y)
    return best, {"seconds": time.perf_counter() - t0, "cv": study.best_value,
                  "points": len(study.trials)}


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    out = []
    for d, g in table.dropna(subset=["seconds"]).groupby("d"):
        hs = g[g.method == "HypergradSearchCV"].iloc[0]
        row = {"d": d, "hypergrad test log-loss": hs["test log-loss"], "hypergrad s": hs["seconds"]}
        grid = g[g.method == "GridSearchCV"]
        if len(grid):
            row["GridSearchCV s / hypergrad s"] = grid.iloc[0]["seconds"] / hs["seconds"]
            row["grid test log-loss"] = grid.iloc[0]["test log-loss"]
        eq = g[g.budget == "equal time"]
        row["best black-box test log-loss at equal time"] = eq["test log-loss"].min()
        row["hypergrad better than every equal-time search"] = bool(
            (hs["test log-loss"] < eq["test log-loss"]).all()
        )
        out.append(row)
    return pd.DataFrame(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2, 10, 50])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--quick", action="store_true", help="dims 1 and 10 only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=[], metavar="METHOD",
                        help="also run HypergradSearchCV with these methods (e.g. hoag); "
                             "the black-box budgets stay those of the default method")
    args = parser.parse_args(argv)
    dims = [1, 10] if args.quick else args.dims
    warnings.simplefilter("ignore")
    X, y = load(args.dataset, False, args.seed)
    X_pool, y_pool, X_agg, y_agg, X_test, y_test = split(X, y, args.seed)
    t0 = time.perf_counter()
    zoo = model_zoo(max(max(dims), 10), args.seed)
    pool = [(name, FrozenEstimator(model.fit(X_pool, y_pool))) for name, model in zoo]
    print(f"# bench_search: dataset {args.dataset}, {len(X_agg)} aggregation rows, "
          f"{len(X_test)} test rows, pool of {len(pool)} trained in "
          f"{time.perf_counter() - t0:.1f} s; library {library_version()}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    warm_up(args.seed)
    rows = []
    for d in dims:
        rows += run_dim(d, pool, (X_agg, y_agg, X_test, y_test), args)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print("\n" + summarise(table).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table


if __name__ == "__main__":
    main()
