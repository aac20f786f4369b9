"""``weights``' cost, outer evaluations and test loss, variants side by side (issues 14 and 20).

On ``bench_vs_sklearn``'s splits and frozen pools (one thread), per dataset
and seed: each variant of ``aggregator="weights"`` fitted ``--repeats``
times, the variants alternated within every repeat; per variant the median
fit time (the pool's predictions included, as for Caruana's selection), the
outer evaluations (rows of ``tuning_history_``) and the test loss (log-loss
or RMSE). Caruana's greedy selection (50 rounds, with the pool's
predictions) is timed alongside.

Variants (``--variants``, see ``VARIANTS``): ``default``, the library as
it is; ``autograd``, without the closed-form derivatives; ``before``,
autograd, every hyperparameter tuned and no evaluation budget (the library
before issue 20's work on ``weights``); the others name the hyperparameters
tuned (``all``, ``t-l2``: temperature and ``l2``, ``l2``) and, with
``-b8``, the shared stage's budget of 8 outer evaluations.

Run: ``python benchmarks/bench_weights.py --datasets breast_cancer wine
digits diabetes friedman1 --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.metrics import log_loss, mean_squared_error
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_sklearn as B  # noqa: E402
from _peers import caruana_selection, caruana_selection_sq  # noqa: E402

import aggregators._analytic as analytic  # noqa: E402
from aggregators import AggregatedClassifier, AggregatedRegressor, LearnedWeights  # noqa: E402

#: variant -> (closed form, hyperparameters tuned, shared-stage budget)
ALL = ("temperature", "l2", "entropy")
VARIANTS = {
    "default": None,
    "autograd": (False, None, None),
    "before": (False, ALL, False),
    "all": (True, ALL, False),
    "all-b8": (True, ALL, True),
    "t-l2": (True, ("temperature", "l2"), False),
    "t-l2-b8": (True, ("temperature", "l2"), True),
    "l2-b8": (True, ("l2",), True),
    "l2": (True, ("l2",), False),
    "t-b8": (True, ("temperature",), True),
}


@contextlib.contextmanager
def variant(name: str):
    """The library switched to ``name`` for the duration (``None`` entries: as it is)."""
    saved = (analytic.WEIGHTS_ANALYTIC, LearnedWeights.tuned_by_default,
             LearnedWeights.shared_stage)
    try:
        spec = VARIANTS[name] or (None, None, None)
        for attr, owner, value in zip(
            ("WEIGHTS_ANALYTIC", "tuned_by_default", "shared_stage"),
            (analytic, LearnedWeights, LearnedWeights), spec,
        ):
            if value is not None:
                setattr(owner, attr, value)
        yield
    finally:
        (analytic.WEIGHTS_ANALYTIC, LearnedWeights.tuned_by_default,
         LearnedWeights.shared_stage) = saved


def run(name: str, seed: int, variants, repeats: int) -> list[dict]:
    task = B.TASKS[name]
    X, y = B.load(name, False, seed)
    X_pool, y_pool, X_agg, y_agg, X_te, y_te = B.split(X, y, seed, stratify=task == "cls")
    pool = (B.regressor_pool if task == "reg" else B.pretrained_pool)(X_pool, y_pool, seed)
    frozen = [(n, FrozenEstimator(m)) for n, m in pool.items()]
    classes = np.unique(y)
    Est = AggregatedRegressor if task == "reg" else AggregatedClassifier

    def test_loss(est) -> float:
        if task == "reg":
            return float(np.sqrt(mean_squared_error(y_te, est.predict(X_te))))
        return float(log_loss(y_te, est.predict_proba(X_te), labels=classes))

    if task == "cls":
        def caruana():
            return caruana_selection(B.pool_proba(pool, X_agg, classes),
                                     np.searchsorted(classes, y_agg))
    else:
        def caruana():
            return caruana_selection_sq(B.pool_predict(pool, X_agg), y_agg)

    times = {v: [] for v in (*variants, "caruana")}
    fitted = {}
    for r in range(repeats + 1):  # the first round warms torch up, untimed
        for v in (*variants, "caruana"):
            t0 = time.perf_counter()
            if v == "caruana":
                caruana()
            else:
                with variant(v):
                    est = Est(frozen, aggregator="weights", random_state=seed).fit(X_agg, y_agg)
                fitted[v] = est
            if r:
                times[v].append(time.perf_counter() - t0)
    rows = []
    for v in variants:
        est = fitted[v]
        rows.append(dict(dataset=name, seed=seed, variant=v,
                         fit_ms=1e3 * statistics.median(times[v]),
                         n_eval=len(est.tuning_history_), test_loss=test_loss(est),
                         val_loss=float(est.validation_loss_),
                         hyper={k: np.round(np.asarray(val), 4).tolist()
                                for k, val in est.hyperparams_.items()}))
    rows.append(dict(dataset=name, seed=seed, variant="caruana",
                     fit_ms=1e3 * statistics.median(times["caruana"])))
    return rows


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+",
                        default=["breast_cancer", "wine", "digits", "diabetes", "friedman1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["default", "before"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# load average {os.getloadavg()}", flush=True)
    rows = []
    with threadpool_limits(1):
        for name in args.datasets:
            for seed in args.seeds:
                for row in run(name, seed, args.variants, args.repeats):
                    rows.append(row)
                    print({k: (round(v, 5) if isinstance(v, float) else v)
                           for k, v in row.items()}, flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby(["dataset", "variant"], sort=False)[
        ["fit_ms", "n_eval", "test_loss"]].mean()
    with pd.option_context("display.width", 160, "display.float_format", "{:.4f}".format):
        print(summary)
    print(f"# load average {os.getloadavg()}")
    return table


if __name__ == "__main__":
    main()
