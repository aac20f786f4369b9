"""The default estimator against the obvious alternatives, on data and pools seen nowhere else.

The other benchmarks run classification on four datasets with one pool of
six classifiers. This one checks that the defaults carry over: other bundled
or generated data (regression and multi-output regression included), another
pool (a gradient-boosting model, an SVC without probabilities, whose
decision function is what the aggregators see), and other split sizes (a
50 / 25 / 25 split: pool / aggregation rows / test).

=================  ========================================================
iris               150 rows, 3 classes (37 aggregation rows)
imbalanced         ``make_classification``: 2000 rows, 8 % positives
4class             ``make_classification``: 1500 rows, 30 features
digits012_str      digits 0-2 with string labels (134 aggregation rows)
diabetes           regression, 442 rows
friedman1          regression, ``make_friedman1`` with noise
2targets           two-target linear regression (``make_regression``)
linnerud           three-target regression on 20 rows (5 aggregation rows)
=================  ========================================================

Issue 14 (item 7), over 5 seeds (split, pool and generated data change with
the seed): per dataset, the mean test loss (log-loss; RMSE for regression)
and fit time of

* ``ours: default`` — ``AggregatedClassifier(pool, random_state=seed)``
  (``AggregatedRegressor``) with no ``aggregator`` argument, whatever the
  library's default is; ``--aggregators`` adds named ones (default
  ``stacking`` and ``weights``; any of ``choquet sugeno uninorm laf moe
  select``);
* the best single model (chosen on the aggregation rows), Caruana's greedy
  selection (50 rounds) and convex weights (L-BFGS), on the stored outputs of
  the models that give probabilities (the SVC gives a decision function
  only: it is left out of these three), their time including the pool's
  predictions on the aggregation rows;
* ``GridSearchCV (prefit)`` — scikit-learn's ``StackingClassifier`` /
  ``StackingRegressor`` (``cv="prefit"``) with its final estimator's C /
  alpha tuned over 20 values in [1e-4, 1e4], 5 folds (3 on sets too small
  for 5); for the multi-target sets, which scikit-learn's stacking does not
  take, the same grid over a ``Ridge`` on the pool's stacked predictions;
* ``Optuna`` (with ``--optuna N``: N TPE trials of the same CV loss).

Then issue 14's summary: is the default at or below the best single model,
Caruana and the grid-tuned stacking (mean over seeds, 1 % tolerance), and is
its fit no slower than the grid's. A fit that raises is reported, not hidden.

Run: ``python benchmarks/bench_unseen.py [--seeds 0 1 2 3 4] [--task cls|reg|both]
[--aggregators stacking weights ...] [--optuna 15] [--out unseen.md|.csv]``.
The default took 26 minutes on a 2-core machine at load 9-12 (other jobs).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import (
    load_diabetes,
    load_digits,
    load_iris,
    load_linnerud,
    make_classification,
    make_friedman1,
    make_regression,
)
from sklearn.ensemble import (  # noqa: I001
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.frozen import FrozenEstimator
from sklearn.base import clone
from sklearn.ensemble import StackingClassifier, StackingRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.preprocessing import FunctionTransformer
from sklearn.multioutput import MultiOutputRegressor
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import (  # noqa: E402
    best_single,
    best_single_sq,
    blend,
    caruana_selection,
    caruana_selection_sq,
    chosen_aggregator,
    convex_weights_sq,
    library_version,
    load_average,
    rmse,
    softmax_weights_lbfgs,
    timed,
    warm_up,
)
from bench_vs_sklearn import (  # noqa: E402
    CARUANA,
    CONVEX,
    DEFAULT,
    GRID,
    GRID_PREFIT,
    OPTUNA,
    SINGLE,
    fmt_methods,
    issue14_summary,
    per_method,
    to_markdown,
)

from aggregators import AggregatedClassifier, AggregatedRegressor  # noqa: E402

AGGREGATORS = ["stacking", "weights", "choquet", "sugeno", "uninorm", "laf", "moe", "select"]


def classifier_pool(seed: int) -> dict:
    return {
        "lr": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "rf": RandomForestClassifier(100, random_state=seed),
        "nb": GaussianNB(),
        "knn": KNeighborsClassifier(7),
        "svc": make_pipeline(StandardScaler(), SVC()),  # decision function only
        "gb": GradientBoostingClassifier(n_estimators=50, random_state=seed),
        "tree": DecisionTreeClassifier(max_depth=4, random_state=seed),
    }


def regressor_pool(seed: int, multi_output: bool) -> dict:
    def multi(m):  # these two fit one target at a time
        return MultiOutputRegressor(m) if multi_output else m

    return {
        "ridge": make_pipeline(StandardScaler(), Ridge()),
        "rf": RandomForestRegressor(100, random_state=seed),
        "knn": KNeighborsRegressor(7),
        "svr": multi(make_pipeline(StandardScaler(), SVR())),
        "gb": multi(GradientBoostingRegressor(n_estimators=100, random_state=seed)),
        "tree": DecisionTreeRegressor(max_depth=4, random_state=seed),
    }


def classification_data(seed: int):
    yield "iris", *load_iris(return_X_y=True)
    yield "imbalanced", *make_classification(
        2000, 20, n_informative=5, weights=[0.92, 0.08], flip_y=0.02, random_state=seed
    )
    yield "4class", *make_classification(
        1500, 30, n_informative=8, n_classes=4, n_clusters_per_class=2, random_state=seed
    )
    X, y = load_digits(return_X_y=True)
    keep = y < 3
    yield "digits012_str", X[keep], np.array(["zero", "one", "two"])[y[keep]]


def regression_data(seed: int):
    yield "diabetes", *load_diabetes(return_X_y=True)
    yield "friedman1", *make_friedman1(1500, noise=1.0, random_state=seed)
    yield "2targets", *make_regression(
        1000, 20, n_informative=10, n_targets=2, noise=10, random_state=seed
    )
    yield "linnerud", *load_linnerud(return_X_y=True)


def _frozen_features(frozen: dict):
    """The pool's stacked predictions (what a prefit stacking feeds its final
    estimator), as a transformer: for the multi-target sets."""
    def features(X):
        return np.hstack([np.reshape(m.predict(X), (len(X), -1)) for m in frozen.values()])

    return FunctionTransformer(features)


def methods_for(task: str, frozen: dict, classes, multi: bool, seed: int, args, n_agg: int):
    """(name, kind, fit) triples; ``fit(X, y)`` returns the predict function."""
    cls = task == "cls"
    with_proba = {k: m for k, m in frozen.items() if hasattr(m, "predict_proba")}
    Est = AggregatedClassifier if cls else AggregatedRegressor
    out = []

    def ours(name, **params):
        def fit(X, y):
            est = Est(list(frozen.items()), random_state=seed, **params).fit(X, y)
            info["chosen"] = chosen_aggregator(est)
            return est.predict_proba if cls else est.predict

        return name, "ours", fit

    info = {}
    out.append(ours(DEFAULT))
    out += [ours(f"ours: {a}", aggregator=a) for a in args.aggregators]

    def stored(rule):
        def fit(X, y):
            if cls:
                P = np.stack([m.predict_proba(X) for m in with_proba.values()])
                w = rule(P, np.searchsorted(classes, y))
                return lambda Xn: blend(
                    np.stack([m.predict_proba(Xn) for m in with_proba.values()]), w
                )
            P = np.stack([np.reshape(m.predict(X), np.shape(y)) for m in frozen.values()])
            w = rule(P, y)
            return lambda Xn: np.tensordot(w, np.stack(
                [np.reshape(m.predict(Xn), (len(Xn),) + np.shape(y)[1:]) for m in frozen.values()]
            ), axes=1)

        return fit

    if cls:
        rules = {SINGLE: best_single, CARUANA: caruana_selection, CONVEX: softmax_weights_lbfgs}
    else:
        rules = {SINGLE: best_single_sq, CARUANA: caruana_selection_sq, CONVEX: convex_weights_sq}
    out += [(name, "peer", stored(rule)) for name, rule in rules.items()]

    # scikit-learn's stacking, its final estimator tuned by a grid (and Optuna).
    folds = 5 if n_agg >= 25 else 3
    if cls:
        stack = StackingClassifier(list(frozen.items()), final_estimator=LogisticRegression(
            max_iter=1000), cv="prefit")
        param, scoring, method = "final_estimator__C", "neg_log_loss", "predict_proba"
    elif not multi:
        stack = StackingRegressor(list(frozen.items()), final_estimator=Ridge(), cv="prefit")
        param, scoring, method = "final_estimator__alpha", "neg_mean_squared_error", "predict"
    else:  # scikit-learn's stacking is single-target: the same model, by hand
        from sklearn.pipeline import Pipeline

        stack = Pipeline([("pool", _frozen_features(frozen)), ("final_estimator", Ridge())])
        param, scoring, method = "final_estimator__alpha", "neg_mean_squared_error", "predict"

    def fit_grid(X, y):
        gs = GridSearchCV(clone(stack), {param: GRID}, cv=folds, scoring=scoring).fit(X, y)
        return getattr(gs, method)

    out.append((GRID_PREFIT, "peer", fit_grid))
    if args.optuna:
        def fit_optuna(X, y):
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)

            def objective(trial):
                value = trial.suggest_float("v", 1e-4, 1e4, log=True)
                est = clone(stack).set_params(**{param: value})
                return cross_val_score(est, X, y, cv=folds, scoring=scoring).mean()

            study = optuna.create_study(direction="maximize",
                                        sampler=optuna.samplers.TPESampler(seed=seed))
            study.optimize(objective, n_trials=args.optuna)
            est = clone(stack).set_params(**{param: study.best_params["v"]}).fit(X, y)
            return getattr(est, method)

        out.append((OPTUNA, "peer", fit_optuna))
    return out, info


def run_dataset(task: str, name: str, X, y, seed: int, args) -> list[dict]:
    strat = y if task == "cls" else None
    X_pool, X_rest, y_pool, y_rest = train_test_split(
        X, y, test_size=0.5, random_state=seed, stratify=strat
    )
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, random_state=seed,
        stratify=y_rest if task == "cls" else None,
    )
    multi = np.ndim(y) > 1
    pool = classifier_pool(seed) if task == "cls" else regressor_pool(seed, multi)
    frozen = {k: FrozenEstimator(m.fit(X_pool, y_pool)) for k, m in pool.items()}
    classes = np.unique(y) if task == "cls" else None
    methods, info = methods_for(task, frozen, classes, multi, seed, args, len(y_agg))
    print(f"== {name} (seed {seed}): {len(y_agg)} aggregation rows, {len(y_test)} test rows",
          flush=True)
    rows = []
    for method, kind, fit in methods:
        row = {"task": task, "dataset": name, "seed": seed, "method": method, "kind": kind}
        info.clear()
        try:
            predict, seconds, runs, kinds = timed(
                lambda f=fit: f(X_agg, y_agg), repeats=args.repeats
            )
            pred = predict(X_test)
        except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
            print(f"   {method:26s} ERROR {type(e).__name__}: {e}", flush=True)
            rows.append({**row, "loss": np.nan, "fit_s": np.nan, "warnings": "failed",
                         "info": f"{type(e).__name__}: {e}"})
            continue
        loss = log_loss(y_test, pred, labels=classes) if task == "cls" else rmse(pred, y_test)
        text = "; ".join(f"aggregator={v}" for v in info.values())
        print(f"   {method:26s} {seconds:7.3f} s  test {loss:.4f}  {text}", flush=True)
        rows.append({**row, "loss": loss, "fit_s": seconds, "warnings": ",".join(kinds),
                     "info": text})
    return rows


def report(table: pd.DataFrame, header: str, seconds: float) -> str:
    buf = io.StringIO()
    buf.write(f"{header}\n")
    pm = fmt_methods(per_method(table))
    for (task, name), t in table.groupby(["task", "dataset"], sort=False):
        metric = "log-loss" if task == "cls" else "RMSE"
        buf.write(f"\n### {name} (test {metric})\n\n")
        buf.write(to_markdown(pm[pm.dataset == name].drop(columns="dataset")) + "\n")
    buf.write("\n### the default against the obvious alternatives (mean over seeds, "
              "1 % tolerance)\n\n")
    summary = issue14_summary(table)
    buf.write(to_markdown(summary) + "\n")
    share = {c: summary[c].dropna().mean() for c in ("<= single", "<= Caruana", "<= grid")}
    buf.write("\nshare of datasets where the default is at or below: "
              + ", ".join(f"{k.removeprefix('<= ')} {v:.0%}" for k, v in share.items())
              + f"; fit no slower than the grid on {summary['not slower than grid'].mean():.0%}\n")
    buf.write(f"\ntotal run time {seconds / 60:.1f} min; load average at the end "
              f"{load_average()}\n")
    return buf.getvalue()


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--task", choices=["cls", "reg", "both"], default="both")
    parser.add_argument("--datasets", nargs="+", metavar="NAME",
                        help="only these datasets (default: all eight)")
    parser.add_argument("--aggregators", nargs="*", default=["stacking", "weights"],
                        choices=AGGREGATORS,
                        help="named aggregators besides the default (default: stacking weights)")
    parser.add_argument("--optuna", type=int, default=0, metavar="N",
                        help="also Optuna-tuned stacking with N trials (default: off)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each fit faster than 1 s (median time reported)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the report (.md) or the rows (.csv)")
    args = parser.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    header = (f"bench_unseen: seeds {' '.join(map(str, args.seeds))}; torch threads "
              f"{torch.get_num_threads()}; load average {load_average()} at start; "
              f"library {library_version()}")
    print(header, flush=True)
    warm_up(args.seeds[0])
    rows = []
    tasks = ["cls", "reg"] if args.task == "both" else [args.task]
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # counted per fit by timed()
        for seed in args.seeds:
            for task in tasks:
                data = classification_data(seed) if task == "cls" else regression_data(seed)
                for name, X, y in data:
                    if args.datasets and name not in args.datasets:
                        continue
                    rows += run_dataset(task, name, X, y, seed, args)
    table = pd.DataFrame(rows)
    text = report(table, header, time.perf_counter() - start)
    print("\n" + text)
    if args.out:
        if args.out.suffix.lower() == ".csv":
            table.to_csv(args.out, index=False)
        else:
            args.out.write_text(text)
        print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
