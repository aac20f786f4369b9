"""Scale of the 2-additive Choquet aggregator: 32 base models, 100 000 rows.

Synthetic binary problem: a latent signal ``s ~ N(0, 1)`` per row, labels
``y ~ Bernoulli(sigmoid(3 s))``; base model ``j`` sees ``s`` through noise
shared by its group of four models (so models within a group are redundant)
plus noise of its own, with its own sharpness, and outputs
``sigmoid(a_j (s + noise))``. The probabilities are stored predictions
(:class:`base_models.PrecomputedModel`, looked up by the row index of a
one-column DataFrame ``X``), so only the aggregator's cost is measured.

The whole ``AggregatedClassifier.fit`` is timed: collecting the base outputs,
tuning ``temperature``, ``interaction`` and ``l2`` by implicit hypergradients
and the final refit on all rows. 32 models give a 2-additive capacity with 32
singleton and 496 pair masses (529 inner parameters with the threshold;
the gain is the tuned temperature's inverse). Settings for scale: ``cv=None`` (one inner-train / validation
split, 25 % validation), ``max_outer_iter=8`` (L-BFGS-B then makes at most 16
evaluations), ``tol=1e-6`` and at most 20 conjugate-gradient steps per
hypergradient (``tuner_options={"max_iter": 20}``); the rest are the
estimator's defaults (float64, implicit-cg, inner L-BFGS to a gradient of
1e-7 or 500 steps).

Run: ``python benchmarks/bench_choquet_scale.py [--rows 100000] [--models 32]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss

from aggregators import AggregatedClassifier
from aggregators.choquet import Choquet
from base_models import PrecomputedModel


def synthetic_pool(n_rows: int, n_models: int, seed: int = 0):
    """Labels and ``n_models`` noisy probability columns (positive class)."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(n_rows)
    y = (rng.random(n_rows) < 1 / (1 + np.exp(-3 * s))).astype(int)
    n_groups = max(1, n_models // 4)
    group_noise = rng.standard_normal((n_rows, n_groups)) * rng.uniform(0.3, 1.0, n_groups)
    probs = np.empty((n_rows, n_models))
    for j in range(n_models):
        noise = group_noise[:, j % n_groups] + 0.5 * rng.standard_normal(n_rows)
        sharp = rng.uniform(1.0, 4.0)
        probs[:, j] = 1 / (1 + np.exp(-sharp * (s + noise)))
    return y, probs


def main(
    n_rows: int = 100_000, n_models: int = 32, seed: int = 0, max_outer_iter: int = 8,
    cg_iter: int = 20, tol: float = 1e-6,
) -> float:
    y, probs = synthetic_pool(n_rows, n_models, seed)
    X = pd.DataFrame({"row": np.arange(n_rows)}, index=np.arange(n_rows))
    pool = [
        (
            f"m{j:02d}",
            PrecomputedModel(np.column_stack([1 - probs[:, j], probs[:, j]]), classes=[0, 1]),
        )
        for j in range(n_models)
    ]
    clf = AggregatedClassifier(
        pool, aggregator=Choquet(additivity=2), cv=None, max_outer_iter=max_outer_iter,
        tol=tol, tuner_options={"max_iter": cg_iter}, random_state=seed,
    )
    t0 = time.perf_counter()
    clf.fit(X, y)
    wall = time.perf_counter() - t0
    p = clf.predict_proba(X)[:, 1]
    uniform = probs.mean(1)
    hist = clf.tuning_history_
    print(f"rows={n_rows} models={n_models} additivity=2 cv=None dtype=float64 "
          f"max_outer_iter={max_outer_iter} tol={tol} cg max_iter={cg_iter} "
          f"torch threads={torch.get_num_threads()}")
    print(f"fit wall time (tuning included): {wall:.1f} s   "
          f"(tuning {clf.tuning_time_:.1f} s, {clf.n_iter_} outer evaluations, "
          f"{int(hist['inner_iter'].sum())} inner L-BFGS iterations)")
    tuned = ", ".join(f"{k}={v:.3g}" for k, v in clf.hyperparams_.items())
    print(f"tuned hyperparameters: {tuned}")
    print(f"validation log-loss {clf.validation_loss_:.4f} (first evaluation "
          f"{hist['validation_loss'].iloc[0]:.4f})")
    print(f"training log-loss: choquet {log_loss(y, p):.4f}  uniform average "
          f"{log_loss(y, uniform):.4f}")
    return wall


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--models", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-outer-iter", type=int, default=8)
    ap.add_argument("--cg-iter", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-6)
    args = ap.parse_args()
    main(args.rows, args.models, args.seed, args.max_outer_iter, args.cg_iter, args.tol)
