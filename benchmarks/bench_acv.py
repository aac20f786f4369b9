"""Approximate cross-validation (``cv_mode="approx"``) against exact cross-fitting.

Protocol: ``bench_vs_sklearn.py``'s datasets, 40 / 30 / 30 split and frozen
pool of six classifiers (its helpers, imported). On the aggregation rows,
``AggregatedClassifier(frozen pool, aggregator=..., cv=5, random_state=0)``
is fitted with ``cv_mode="exact"`` and with ``cv_mode="approx"``. Reported per
dataset, seed and aggregator:

==================  =========================================================
val err             relative error of the approximate validation loss
                    against the exact cross-fitted loss, both at the
                    hyperparameters the approximate fit tuned (inner
                    problems solved to 1e-10)
hypergrad err       ``|g_approx - g_exact| / |g_exact|`` there (implicit
                    differentiation with conjugate gradient, in the
                    tuner's unconstrained hyperparameter space); near an
                    optimum ``g`` is small and this ratio large
... start           the same at the aggregator's initial hyperparameters
test loss           log-loss of each fit on the test rows
fit s               seconds of each ``fit`` (the frozen pool's predictions
                    included)
evals               outer evaluations (``n_iter_``) of each fit
==================  =========================================================

Stacking takes approximate CV's linear path (:meth:`Aggregator.linear_design`),
``weights`` the generic one. Run ``python benchmarks/bench_acv.py [--seeds 0 1]
[--datasets wine digits] [--aggregators stacking weights] [--threads 1]``.

``--regression`` runs the regressors instead: regression stacking's exact
folds in closed form (the default fit) against the iterative folds
(``aggregators._fit.LINEAR_CLOSED_FORM = False``) and against scikit-learn's
``StackingRegressor(frozen pool, RidgeCV(alphas=np.logspace(-4, 4, 20)),
cv="prefit")``, on friedman1 (2 000 rows, noise 1) and diabetes, 40 / 30 / 30
split, five frozen regressors; each fit's time is the median of
``--repeats`` alternated fits, the pool's predictions included, with the
test RMSE and the outer evaluations; then the closed form's validation loss
and hypergradient against the iterative folds solved tightly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.metrics import log_loss
from sklearn.utils import check_random_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_sklearn import DATASETS, load, pretrained_pool, split  # noqa: E402

from aggregators import AggregatedClassifier  # noqa: E402
from aggregators._base import AggregationContext  # noqa: E402
from aggregators._bilevel import (  # noqa: E402
    HyperSpace,
    Split,
    make_acv_problem,
    make_fold_problems,
)
from aggregators._fit import acv_fold_ids, make_splits  # noqa: E402
from aggregators._registry import resolve_aggregator  # noqa: E402
from aggregators.hypergrad import hypergradient, solve_inner  # noqa: E402
from base_models import fit_pool  # noqa: E402

CV = 5
RANDOM_STATE = 0


def _tuned_u(space: HyperSpace, est) -> torch.Tensor:
    """The fitted estimator's tuned hyperparameters in the tuner's unconstrained space."""
    vectors = est.aggregator_._hyper_vectors_
    parts = [
        np.log(vectors[s.name]) if s.log else np.asarray(vectors[s.name], dtype=np.float64)
        for s in space.tuned
    ]
    return torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0), dtype=torch.float64)


def compare_at(est, aggregator, frozen, X, y) -> dict:
    """Validation loss and hypergradient of exact and approximate CV at ``est``'s tuned point.

    Rebuilds the problems ``fit`` tuned (same pool outputs, same folds) and
    solves both inner problems tightly.
    """
    classes = np.unique(y)
    y_model = np.searchsorted(classes, y)
    n, c = len(y), len(classes)
    pool = fit_pool(
        frozen, X, y, task="classification", classes=classes, n_outputs=c,
        prefit="auto", base_cv=5,
    )
    seed = int(check_random_state(RANDOM_STATE).randint(np.iinfo(np.int32).max))
    splits = make_splits(n, y_model, seed, CV, 0.25)
    dtype, device = torch.float64, torch.device("cpu")
    names = [name for name, _ in frozen]
    agg = resolve_aggregator(aggregator)
    ctx = AggregationContext(
        task="classification", n_models=len(names), n_outputs=c, n_features=X.shape[1],
        model_names=names, classes=classes, device=device, dtype=dtype,
        generator=torch.Generator().manual_seed(seed),
        n_train=int(round(np.mean([len(tr) for tr, _ in splits]))),
    )
    space = HyperSpace(agg.hyperparameters(ctx), {}, device, dtype, owner=type(agg).__name__)
    full = Split(torch.as_tensor(pool.outputs, dtype=dtype), torch.as_tensor(y_model))
    u = _tuned_u(space, est)

    folds = [(full.take(torch.as_tensor(tr)), full.take(torch.as_tensor(va))) for tr, va in splits]
    exact, _, _ = make_fold_problems(agg, ctx, folds, space)
    ids = torch.as_tensor(acv_fold_ids(splits, n))
    approx, _, _, _ = make_acv_problem(agg, ctx, full, ids, space)

    def both(point):
        out = []
        for problem in (exact, approx):
            theta, _, _ = solve_inner(problem, point, max_iter=5000, tol=1e-10)
            res = hypergradient(problem, theta, point, "implicit-cg", tol=1e-12)
            out.append((float(res.value) / len(splits), res.grad))
        (v_ref, g_ref), (v_got, g_got) = out
        return v_ref, abs(v_got - v_ref) / abs(v_ref), float(
            (g_got - g_ref).norm() / g_ref.norm().clamp_min(1e-300)
        )

    # At the tuned point the hypergradients are near 0 (an optimum of the
    # approximate loss), so their relative error is large by construction;
    # at the start of tuning they are not.
    v_ref, v_err, g_err = both(u)
    _, v_err0, g_err0 = both(space.initial())
    return {
        "params": exact.theta0.numel() // len(splits),
        "val exact": v_ref,
        "val err": v_err,
        "hypergrad err": g_err,
        "val err start": v_err0,
        "hypergrad err start": g_err0,
    }


def run(dataset: str, seed: int, aggregator: str) -> dict:
    X, y = load(dataset, False, seed)
    X_pool, y_pool, X_agg, y_agg, X_test, y_test = split(X, y, seed)
    frozen = [(n, FrozenEstimator(m)) for n, m in pretrained_pool(X_pool, y_pool, seed).items()]
    row = {"dataset": dataset, "seed": seed, "aggregator": aggregator}
    fitted = {}
    for mode in ("exact", "approx"):
        est = AggregatedClassifier(
            frozen, aggregator=aggregator, cv=CV, cv_mode=mode, random_state=RANDOM_STATE
        )
        t0 = time.perf_counter()
        est.fit(X_agg, y_agg)
        row[f"fit s {mode}"] = time.perf_counter() - t0
        row[f"evals {mode}"] = est.n_iter_
        row[f"test loss {mode}"] = log_loss(y_test, est.predict_proba(X_test), labels=est.classes_)
        fitted[mode] = est
    row.update(compare_at(fitted["approx"], aggregator, frozen, X_agg, y_agg))
    return row


REGRESSION_DATASETS = ("friedman1", "diabetes")


def regression_pool(dataset: str, seed: int):
    """Aggregation and test rows, and the frozen pool fitted on the pool rows."""
    from sklearn.datasets import load_diabetes, make_friedman1
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR
    from sklearn.tree import DecisionTreeRegressor

    if dataset == "friedman1":
        X, y = make_friedman1(n_samples=2000, noise=1.0, random_state=seed)
    else:
        X, y = load_diabetes(return_X_y=True)
    X_pool, X_rest, y_pool, y_rest = train_test_split(X, y, train_size=0.4, random_state=seed)
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, random_state=seed
    )
    pool = {
        "ridge": make_pipeline(StandardScaler(), Ridge()),
        "knn": make_pipeline(StandardScaler(), KNeighborsRegressor(10)),
        "tree": DecisionTreeRegressor(max_depth=5, random_state=seed),
        "forest": RandomForestRegressor(100, random_state=seed),
        "svr": make_pipeline(StandardScaler(), SVR()),
    }
    frozen = [(n, FrozenEstimator(m.fit(X_pool, y_pool))) for n, m in pool.items()]
    return frozen, X_agg, y_agg, X_test, y_test


def run_regression(dataset: str, seed: int, repeats: int) -> list[dict]:
    """Closed-form folds, iterative folds and RidgeCV stacking, side by side."""
    import aggregators._fit as fit_module
    from sklearn.ensemble import StackingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import mean_squared_error

    from aggregators import AggregatedRegressor

    frozen, X_agg, y_agg, X_test, y_test = regression_pool(dataset, seed)

    def fit(method):
        if method == "RidgeCV stacking":
            return StackingRegressor(
                frozen, final_estimator=RidgeCV(alphas=np.logspace(-4, 4, 20)), cv="prefit"
            ).fit(X_agg, y_agg)
        fit_module.LINEAR_CLOSED_FORM = method == "ours, closed form"
        try:
            return AggregatedRegressor(frozen, random_state=RANDOM_STATE).fit(X_agg, y_agg)
        finally:
            fit_module.LINEAR_CLOSED_FORM = True

    methods = ("RidgeCV stacking", "ours, iterative folds", "ours, closed form")
    times = {m: [] for m in methods}
    fitted = {}
    for _ in range(repeats):
        for method in methods:  # alternated: the machine's load hits all alike
            t0 = time.perf_counter()
            fitted[method] = fit(method)
            times[method].append(time.perf_counter() - t0)
    rows = []
    for method in methods:
        est = fitted[method]
        history = getattr(est, "tuning_history_", None)
        rows.append({
            "dataset": dataset, "seed": seed, "method": method,
            "fit s": float(np.median(times[method])),
            "tune s": getattr(est, "tuning_time_", np.nan),
            "evals": len(history) if history is not None else np.nan,
            "validation loss": getattr(est, "validation_loss_", np.nan),
            "test RMSE": mean_squared_error(y_test, est.predict(X_test)) ** 0.5,
        })
    return rows


def closed_form_errors(dataset: str, seed: int) -> dict:
    """Relative error of the closed-form validation loss and hypergradient against the
    iterative folds (inner solves to 1e-12, conjugate gradient to 1e-14), at the start
    of tuning and at a point moved from it."""
    from aggregators._bilevel import make_linear_cv_problem

    frozen, X, y, _, _ = regression_pool(dataset, seed)
    pool = fit_pool(frozen, X, y, task="regression", classes=None, n_outputs=1,
                    prefit="auto", base_cv=5)
    dtype, device = torch.float64, torch.device("cpu")
    Z = (pool.outputs - y.mean()) / y.std()
    full = Split(
        torch.as_tensor(Z.reshape(len(y), -1, 1), dtype=dtype),
        torch.as_tensor(((y - y.mean()) / y.std())[:, None], dtype=dtype),
    )
    splits = make_splits(len(y), None, seed, CV, 0.25)
    agg, m = resolve_aggregator("stacking"), len(frozen)
    ctx = AggregationContext(
        task="regression", n_models=m, n_outputs=1, n_features=X.shape[1],
        model_names=[n for n, _ in frozen], classes=None, device=device, dtype=dtype,
        generator=torch.Generator().manual_seed(seed),
        n_train=int(round(np.mean([len(tr) for tr, _ in splits]))),
    )
    space = HyperSpace(agg.hyperparameters(ctx), {}, device, dtype, owner="Stacking")
    closed, _, _, _ = make_linear_cv_problem(agg, ctx, full, splits, space)
    folds = [(full.take(torch.as_tensor(tr)), full.take(torch.as_tensor(va))) for tr, va in splits]
    iterative, _, _ = make_fold_problems(agg, ctx, folds, space)
    row = {"dataset": dataset, "seed": seed}
    start = space.initial()
    for name, u in (("start", start), ("moved", start + torch.linspace(-2, 3, m, dtype=dtype))):
        ref = hypergradient(closed, closed.theta0, u, "implicit-cg")
        theta, _, _ = solve_inner(iterative, u, iterative.theta0, tol=1e-12, max_iter=5000)
        it = hypergradient(iterative, theta, u, "implicit-cg", tol=1e-14, max_iter=2000)
        row[f"val err {name}"] = abs(float(ref.value - it.value)) / abs(float(it.value))
        row[f"hypergrad err {name}"] = float((ref.grad - it.grad).norm() / it.grad.norm())
    return row


def main_regression(args) -> pd.DataFrame:
    run_regression("diabetes", 0, 1)  # warm-up: the first fit in a process pays for imports
    rows = []
    for dataset in REGRESSION_DATASETS:
        for seed in args.seeds:
            rows.extend(run_regression(dataset, seed, args.repeats))
            print(pd.DataFrame(rows[-3:]).to_string(index=False, header=False), flush=True)
    table = pd.DataFrame(rows)
    mean = table.groupby(["dataset", "method"], sort=False)[
        ["fit s", "tune s", "evals", "test RMSE"]
    ].mean()
    ridge = mean.xs("RidgeCV stacking", level="method")["fit s"]
    mean["time / RidgeCV"] = mean["fit s"] / ridge.reindex(
        mean.index.get_level_values("dataset")
    ).to_numpy()
    errors = pd.DataFrame([
        closed_form_errors(dataset, seed)
        for dataset in REGRESSION_DATASETS for seed in args.seeds
    ])
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
        print(mean.to_string())
        print(errors.to_string(index=False))
    return table


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--aggregators", nargs="+", default=["stacking"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the issue's one-core protocol)")
    parser.add_argument("--regression", action="store_true",
                        help="regression stacking: closed-form folds, iterative, RidgeCV")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternated fits per method with --regression (median time)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.regression:
        return main_regression(args)
    rows = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for aggregator in args.aggregators:
                rows.append(run(dataset, seed, aggregator))
                print(pd.Series(rows[-1]).to_string(), flush=True)
    table = pd.DataFrame(rows)
    columns = [
        "dataset", "seed", "aggregator", "params", "val err", "hypergrad err",
        "val err start", "hypergrad err start",
        "test loss exact", "test loss approx", "fit s exact", "fit s approx",
        "evals exact", "evals approx",
    ]
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(table[columns].to_string(index=False))
    return table


if __name__ == "__main__":
    main()
