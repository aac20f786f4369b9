"""Tuning on a subsample (``max_tuning_rows``) against tuning on all rows: test loss and time.

Issue 20. ``max_tuning_rows="auto"`` tunes the hyperparameters on 10 000
rows of a larger aggregation set and fits the aggregation function on all
of them. This measures what that costs in test loss, on data whose default
regularisation is not far off (unlike ``bench_sweep``'s near-separable
probabilities): ``make_classification`` (20 features, 8 informative, 4
classes, 5 % flipped labels, ``class_sep=0.8``) or ``make_friedman1``
(``noise=1``), a pool of five (classification) or four (regression)
scikit-learn models fitted on 3 000 other rows, ``--rows`` aggregation rows
and 20 000 test rows; per seed and aggregator, one fit for each value of
``--max-tuning-rows`` (``all`` is ``None``), with its test loss (log-loss
or RMSE) and fit time.

Run: ``python benchmarks/bench_tuning_rows.py [--rows 40000] [--task cls|reg]
[--aggregators stacking weights choquet] [--seeds 0 1 2]
[--max-tuning-rows 10000 20000 all]``. One thread; about 5 minutes for the
defaults on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
from sklearn.datasets import make_classification, make_friedman1
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import log_loss
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import library_version, load_average, rmse, warm_up  # noqa: E402

from aggregators import AggregatedClassifier, AggregatedRegressor  # noqa: E402

N_POOL, N_TEST = 3_000, 20_000


def problem(task: str, n_rows: int, seed: int):
    """``(pool, X, y, X_test, y_test)``: the pool fitted on ``N_POOL`` other rows."""
    n = N_POOL + n_rows + N_TEST
    if task == "cls":
        X, y = make_classification(n, 20, n_informative=8, n_classes=4, flip_y=0.05,
                                   class_sep=0.8, random_state=seed)
        models = [
            ("lr", LogisticRegression(max_iter=500)),
            ("nb", GaussianNB()),
            ("tree", DecisionTreeClassifier(max_depth=6, random_state=0)),
            ("rf", RandomForestClassifier(50, max_depth=8, random_state=0, n_jobs=1)),
            ("hgb", HistGradientBoostingClassifier(max_iter=50, random_state=0)),
        ]
    else:
        X, y = make_friedman1(n, 10, noise=1.0, random_state=seed)
        models = [
            ("ridge", Ridge()),
            ("tree", DecisionTreeRegressor(max_depth=6, random_state=0)),
            ("rf", RandomForestRegressor(50, max_depth=8, random_state=0, n_jobs=1)),
            ("hgb", HistGradientBoostingRegressor(max_iter=50, random_state=0)),
        ]
    pool = [(name, FrozenEstimator(m.fit(X[:N_POOL], y[:N_POOL]))) for name, m in models]
    a, b = N_POOL, N_POOL + n_rows
    return pool, X[a:b], y[a:b], X[b:], y[b:]


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--task", choices=["cls", "reg"], default="cls")
    parser.add_argument("--aggregators", nargs="+", default=["stacking", "weights", "choquet"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-tuning-rows", nargs="+", default=["10000", "all"])
    args = parser.parse_args(argv)
    settings = [None if v == "all" else int(v) for v in args.max_tuning_rows]
    torch.set_num_threads(1)
    print(f"bench_tuning_rows: {args.task}, {args.rows} aggregation rows, library "
          f"{library_version()}, load average {load_average()}", flush=True)
    Est = AggregatedClassifier if args.task == "cls" else AggregatedRegressor
    rows = []
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Untimed: torch's one-time start-up, and each aggregator's first fit of this task.
        warm_up()
        pool, X, y, _, _ = problem(args.task, 2_000, args.seeds[0])
        for agg in args.aggregators:
            Est(pool, aggregator=agg, random_state=0).fit(X, y)
        for seed in args.seeds:
            pool, X, y, X_test, y_test = problem(args.task, args.rows, seed)
            for agg in args.aggregators:
                for setting in settings:
                    t = time.perf_counter()
                    est = Est(pool, aggregator=agg, random_state=seed,
                              max_tuning_rows=setting).fit(X, y)
                    seconds = time.perf_counter() - t
                    loss = (log_loss(y_test, est.predict_proba(X_test)) if args.task == "cls"
                            else rmse(est.predict(X_test), y_test))
                    label = "all" if setting is None else str(setting)
                    rows.append({"seed": seed, "aggregator": agg, "max_tuning_rows": label,
                                 "test_loss": loss, "fit_s": seconds})
                    print(f"  seed {seed} {agg:9s} max_tuning_rows={label:>6s}  "
                          f"test {loss:.5f}  {seconds:6.1f} s", flush=True)
    table = pd.DataFrame(rows)
    ref = "all" if "all" in table["max_tuning_rows"].values else None
    if ref is not None:
        base = table[table["max_tuning_rows"] == ref].set_index(["seed", "aggregator"])
        table["loss_vs_all_pct"] = [
            100 * (r.test_loss / base.loc[(r.seed, r.aggregator), "test_loss"] - 1)
            for r in table.itertuples()
        ]
        table["time_vs_all"] = [
            r.fit_s / base.loc[(r.seed, r.aggregator), "fit_s"] for r in table.itertuples()
        ]
    summary = table.groupby(["aggregator", "max_tuning_rows"], sort=False).mean(
        numeric_only=True).drop(columns="seed")
    print("\nmeans over seeds:")
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    return table


if __name__ == "__main__":
    main()
