"""Every aggregator, at its defaults, on data and pools the other benchmarks never use.

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

For each aggregator: fit time, test log-loss (classification) or mean
squared error (regression), the best single model chosen on the aggregation
rows and the uniform average as references, and the warnings the fit raised.
A fit that raises is reported, not hidden.

Run: ``python benchmarks/bench_unseen.py [--seed 0] [--task cls|reg|both]
[--aggregators stacking weights ...]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.datasets import (
    load_diabetes,
    load_digits,
    load_iris,
    load_linnerud,
    make_classification,
    make_friedman1,
    make_regression,
)
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import log_loss, mean_squared_error
from sklearn.model_selection import train_test_split
from sklearn.multioutput import MultiOutputRegressor
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import library_version, warm_up  # noqa: E402

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


def run_dataset(task: str, name: str, X, y, seed: int, aggregators: list[str]) -> list[dict]:
    strat = y if task == "cls" else None
    X_pool, X_rest, y_pool, y_rest = train_test_split(
        X, y, test_size=0.5, random_state=seed, stratify=strat
    )
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, random_state=seed,
        stratify=y_rest if task == "cls" else None,
    )
    pool = classifier_pool(seed) if task == "cls" else regressor_pool(seed, np.ndim(y) > 1)
    frozen = {k: FrozenEstimator(m.fit(X_pool, y_pool)) for k, m in pool.items()}
    if task == "cls":
        with_proba = {k: m for k, m in frozen.items() if hasattr(m, "predict_proba")}

        def score(y_true, est_or_proba):
            return log_loss(y_true, est_or_proba, labels=np.unique(y))

        agg_scores = {k: score(y_agg, m.predict_proba(X_agg)) for k, m in with_proba.items()}
        test_preds = {k: m.predict_proba(X_test) for k, m in with_proba.items()}
    else:
        def score(y_true, pred):
            return mean_squared_error(y_true, pred)

        agg_scores = {k: score(y_agg, m.predict(X_agg)) for k, m in frozen.items()}
        test_preds = {k: m.predict(X_test) for k, m in frozen.items()}
    best = min(agg_scores, key=agg_scores.get)
    rows = [
        {"task": task, "dataset": name, "method": f"best single ({best})",
         "seconds": np.nan, "test": score(y_test, test_preds[best]), "warnings": ""},
        {"task": task, "dataset": name, "method": "uniform average", "seconds": 0.0,
         "test": score(y_test, np.mean(list(test_preds.values()), axis=0)), "warnings": ""},
    ]
    metric = "log-loss" if task == "cls" else "MSE"
    print(f"== {name}: {len(y_agg)} aggregation rows, {len(y_test)} test rows; test {metric}: "
          f"best single ({best}) {rows[0]['test']:.4f}, uniform {rows[1]['test']:.4f}", flush=True)
    Est = AggregatedClassifier if task == "cls" else AggregatedRegressor
    for agg in aggregators:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            try:
                est = Est(list(frozen.items()), aggregator=agg, random_state=seed).fit(X_agg, y_agg)
            except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
                print(f"   {agg:9s} ERROR {type(e).__name__}: {e}", flush=True)
                rows.append({"task": task, "dataset": name, "method": agg, "seconds": np.nan,
                             "test": np.nan, "warnings": f"{type(e).__name__}: {e}"})
                continue
            seconds = time.perf_counter() - t0
        test = score(y_test, est.predict_proba(X_test) if task == "cls" else est.predict(X_test))
        msgs = sorted({f"{type(w.message).__name__}: {str(w.message)[:90]}" for w in caught})
        mark = "" if test <= rows[0]["test"] else "  (above the best single)"
        print(f"   {agg:9s} {seconds:6.2f} s  test {test:.4f}{mark}"
              + (f"  {msgs}" if msgs else ""), flush=True)
        rows.append({"task": task, "dataset": name, "method": agg, "seconds": seconds,
                     "test": test, "warnings": "; ".join(msgs)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=["cls", "reg", "both"], default="both")
    parser.add_argument("--aggregators", nargs="+", default=AGGREGATORS)
    parser.add_argument("--out", type=Path, help="also write the rows as CSV")
    args = parser.parse_args()
    print(f"# bench_unseen: seed {args.seed}; library {library_version()}", flush=True)
    warm_up(args.seed)
    rows = []
    tasks = ["cls", "reg"] if args.task == "both" else [args.task]
    for task in tasks:
        data = classification_data(args.seed) if task == "cls" else regression_data(args.seed)
        for name, X, y in data:
            rows += run_dataset(task, name, X, y, args.seed, args.aggregators)
    import pandas as pd

    table = pd.DataFrame(rows)
    ours = table[~table.method.str.startswith(("best single", "uniform"))]
    single = table[table.method.str.startswith("best single")].set_index("dataset").test
    below = (ours.test <= ours.dataset.map(single)).groupby(ours.method).mean()
    print("\nshare of datasets where the aggregator is at or below the best single model:")
    print(below.round(2).to_string())
    print("\nmedian fit seconds:")
    print(ours.groupby("method").seconds.median().round(2).to_string())
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
