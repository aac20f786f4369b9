"""Cost of every aggregator at its defaults, next to ``GridSearchCV``-tuned stacking.

Issue 14, item 6: at its defaults each aggregator's fit should be no slower
than scikit-learn's stacking tuned by ``GridSearchCV`` (20 values of ``C`` on
``np.logspace(-4, 4, 20)`` x 5 folds, ``cv="prefit"`` over
``FrozenEstimator`` s, ``scoring="neg_log_loss"``) on the same aggregation
rows. Both sides are timed from the same pretrained pool, base-model
predictions included (each side calls the frozen models as a user's fit
would: ours once, the grid once per candidate and fold).

Data: ``synthetic`` is ``make_classification`` with ``--classes`` classes
and 10 informative features, split into pool / aggregation / test rows
(8 000 / ``--rows`` / ``--rows``); ``breast_cancer`` and ``digits`` are
scikit-learn's bundled sets split 50 / 25 / 25 %. The pool is up to 8
diverse classifiers (``--models`` keeps the first ones), trained on the pool
rows. Each aggregator is fitted with ``AggregatedClassifier(pool,
aggregator=name, random_state=seed)`` and nothing else; the table gives fit
seconds and test log-loss per seed, then the medians, and the ratio of each
fit time to the grid's.

Run, e.g.::

    python benchmarks/bench_cost.py --data synthetic --rows 6000 --classes 5
    python benchmarks/bench_cost.py --data breast_cancer --seeds 0 1 2
    python benchmarks/bench_cost.py --aggregators choquet laf --no-grid

Timings share the CPU with whatever else runs: compare the columns of one run
(same process, same load), and give ``uptime`` with them.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_breast_cancer, load_digits, make_classification
from sklearn.ensemble import (
    ExtraTreesClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
    StackingClassifier,
)
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from aggregators import AggregatedClassifier

AGGREGATORS = ["stacking", "weights", "choquet", "sugeno", "uninorm", "laf", "moe", "select"]


def classifier_pool(seed: int) -> list[tuple[str, object]]:
    """Eight classifiers of different families (the first ``--models`` are used)."""
    return [
        ("lr", make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))),
        ("rf", RandomForestClassifier(100, min_samples_leaf=2, random_state=seed)),
        ("nb", GaussianNB()),
        ("knn", make_pipeline(StandardScaler(), KNeighborsClassifier(15))),
        ("hgb", HistGradientBoostingClassifier(max_iter=100, random_state=seed)),
        ("tree", DecisionTreeClassifier(max_depth=6, random_state=seed)),
        ("et", ExtraTreesClassifier(100, min_samples_leaf=2, random_state=seed)),
        ("mlp", make_pipeline(StandardScaler(),
                              MLPClassifier((64,), max_iter=300, random_state=seed))),
    ]


def load(name: str, rows: int, classes: int, seed: int):
    """``(X_pool, y_pool, X_agg, y_agg, X_test, y_test)``."""
    if name == "synthetic":
        X, y = make_classification(
            8000 + 2 * rows, 20, n_informative=10, n_redundant=4, n_classes=classes,
            class_sep=0.8, flip_y=0.03, random_state=seed,
        )
        X_pool, X_rest, y_pool, y_rest = train_test_split(
            X, y, train_size=8000, random_state=seed, stratify=y)
    else:
        X, y = (load_breast_cancer if name == "breast_cancer" else load_digits)(return_X_y=True)
        X_pool, X_rest, y_pool, y_rest = train_test_split(
            X, y, test_size=0.5, random_state=seed, stratify=y)
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    return X_pool, y_pool, X_agg, y_agg, X_test, y_test


def grid_stacking(pool) -> GridSearchCV:
    """Unfitted ``GridSearchCV`` over ``C`` of scikit-learn's stacking on the frozen pool."""
    stack = StackingClassifier(
        pool, final_estimator=LogisticRegression(max_iter=1000), cv="prefit")
    return GridSearchCV(stack, {"final_estimator__C": np.logspace(-4, 4, 20)}, cv=5,
                        scoring="neg_log_loss")


def run(args) -> pd.DataFrame:
    rows = []
    for seed in args.seeds:
        X_pool, y_pool, X_agg, y_agg, X_test, y_test = load(
            args.data, args.rows, args.classes, seed)
        pool = [(n, FrozenEstimator(m.fit(X_pool, y_pool)))
                for n, m in classifier_pool(seed)[: args.models]]
        labels = np.unique(np.concatenate([y_agg, y_test]))
        single = {n: log_loss(y_agg, m.predict_proba(X_agg), labels=labels) for n, m in pool}
        best = min(single, key=single.get)
        best_test = log_loss(y_test, dict(pool)[best].predict_proba(X_test), labels=labels)
        print(f"== {args.data} seed {seed}: {len(y_agg)} aggregation rows, {len(y_test)} test "
              f"rows, {len(pool)} models, {len(labels)} classes; best single ({best}) test "
              f"{best_test:.4f}", flush=True)
        rows.append({"seed": seed, "method": "best single", "seconds": 0.0, "test": best_test})
        methods = (["grid stacking"] if args.grid else []) + list(args.aggregators)
        for method in methods:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                if method == "grid stacking":
                    est = grid_stacking(pool).fit(X_agg, y_agg)
                else:
                    est = AggregatedClassifier(
                        pool, aggregator=method, random_state=seed).fit(X_agg, y_agg)
                seconds = time.perf_counter() - t0
            test = log_loss(y_test, est.predict_proba(X_test), labels=labels)
            extra = ""
            if method != "grid stacking":
                inner = int(est.tuning_history_["inner_iter"].sum())
                extra = f"  n_iter {est.n_iter_}, inner {inner}"
            msgs = sorted({type(w.message).__name__ for w in caught
                           if not issubclass(w.category, (DeprecationWarning, FutureWarning))})
            print(f"   {method:14s} {seconds:8.2f} s  test {test:.4f}{extra}"
                  + (f"  {msgs}" if msgs else ""), flush=True)
            rows.append({"seed": seed, "method": method, "seconds": seconds, "test": test})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["synthetic", "breast_cancer", "digits"],
                    default="synthetic")
    ap.add_argument("--rows", type=int, default=6000,
                    help="aggregation rows, and as many test rows (synthetic only)")
    ap.add_argument("--models", type=int, default=8, help="pool size, 1..8")
    ap.add_argument("--classes", type=int, default=5, help="classes (synthetic only)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--aggregators", nargs="+", default=AGGREGATORS)
    ap.add_argument("--no-grid", dest="grid", action="store_false",
                    help="skip GridSearchCV stacking")
    args = ap.parse_args()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench_cost: torch threads {torch.get_num_threads()}, load average "
          f"{load_avg:.2f} at start", flush=True)
    table = run(args)
    summary = table.groupby("method", sort=False).agg(
        seconds=("seconds", "median"), test=("test", "mean"))
    if args.grid:
        summary["x grid"] = summary.seconds / summary.loc["grid stacking", "seconds"]
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load_end:.2f} at the end")
    print("median fit seconds, mean test log-loss over seeds:")
    print(summary.round(4).to_string())


if __name__ == "__main__":
    main()
