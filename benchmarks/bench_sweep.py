"""Size sweep: how the fit time of tuned stacking grows with the rows (issue 20, item 3).

Base-model outputs are generated directly, so that no real model has to run
on a million rows: a latent true class ``y`` (5 classes), and for model ``m``
the probabilities ``softmax(s_m * onehot(y) + b_m + noise)`` with a skill
``s_m`` in [0.5, 2.5], a fixed per-class bias ``b_m`` and Gaussian noise of
scale ``0.5 .. 1.5``: models of varied quality whose errors are partly
independent. The regression variant (``--task reg``) draws a target
``y ~ N(0, 1)`` and predictions ``a_m y + c_m + noise``. The pool is stored
predictions (``PrecomputedModel`` keyed on column 0 of ``X``, which holds the
row number), so "predicting with the pool" is a lookup.

Sizes: 1 k, 10 k, 100 k and 1 M aggregation rows (``--max-rows`` cuts the
list), 8 and 32 models. Methods, each timed on the same rows in one process:

* ``ours tuned``: ``AggregatedClassifier(pool, aggregator="stacking")``
  (``AggregatedRegressor``) at its defaults;
* ``ours untuned``: the same with ``hyperparams="fixed"``;
* ``LRCV stacking``: ``LogisticRegressionCV(Cs=20, cv=5,
  scoring="neg_log_loss")`` on the stacked probabilities (what
  ``StackingClassifier(..., cv="prefit")`` feeds its final estimator) while
  rows x models stays under ``--peer-max-cells`` (its 100 fits grow fastest:
  244 s at 10 k rows and 8 models under load); ``RidgeCV`` (20 alphas,
  closed-form leave-one-out) for regression, at every size.

Printed per size: fit seconds, test loss on 20 000 other rows, the growth
exponent ``log(t2 / t1) / log(n2 / n1)`` between consecutive sizes (1 is
linear), and tuned / untuned. ``--device cuda`` runs our fits on the GPU
(the peer stays on the CPU); without CUDA it says so and exits cleanly.
Memory: the stored probabilities take ``n_rows x n_models x 5 x 8`` bytes
(1.3 GB at 1 M rows and 32 models), plus what the fit copies.

The default (``--max-rows 10000``) takes about 10 minutes on a loaded 2-core
machine; ``--max-rows 1000000`` runs all four sizes (hours on such a
machine: meant for a quiet one or ``--device cuda``).

``--sizes`` picks sizes directly (``--sizes 100000 1000000`` for the largest
two: the growth exponent between them, without the hours the smaller peers'
fits take); ``--cv-mode`` passes ``cv_mode`` to both of our fits (``exact``,
the estimator's default, or ``approx`` / ``auto``). Each row also records the
cross-fitting used (``tuning_history_.attrs["cv_solver"]``) and the inner
iterations summed over the outer evaluations.

Run: ``python benchmarks/bench_sweep.py [--max-rows 10000 | --sizes N ...]
[--models 8 32] [--task cls|reg|both] [--device cpu|cuda] [--cv-mode exact]
[--out sweep.csv]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.metrics import log_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import library_version, load_average, rmse, timed, warm_up  # noqa: E402

from aggregators import AggregatedClassifier, AggregatedRegressor  # noqa: E402
from base_models import PrecomputedModel  # noqa: E402

SIZES = (1_000, 10_000, 100_000, 1_000_000)
N_CLASSES = 5
N_TEST = 20_000


def generate(task: str, n_rows: int, n_models: int, seed: int):
    """Target of ``n_rows`` rows and the models' outputs on them:
    ``(n_models, n_rows, n_classes)`` probabilities or ``(n_models, n_rows)``
    predictions."""
    rng = np.random.default_rng(seed)
    if task == "reg":
        y = rng.standard_normal(n_rows)
        a = rng.uniform(0.6, 1.2, n_models)
        c = rng.normal(0, 0.2, n_models)
        noise = rng.uniform(0.3, 1.0, n_models)
        P = np.empty((n_models, n_rows))
        for m in range(n_models):
            P[m] = a[m] * y + c[m] + noise[m] * rng.standard_normal(n_rows)
        return y, P
    y = rng.integers(0, N_CLASSES, n_rows)
    skill = rng.uniform(0.5, 2.5, n_models)
    bias = rng.normal(0, 0.3, (n_models, N_CLASSES))
    noise = rng.uniform(0.5, 1.5, n_models)
    P = np.empty((n_models, n_rows, N_CLASSES))
    for m in range(n_models):  # one model at a time: no (models x rows x classes) temporaries
        z = noise[m] * rng.standard_normal((n_rows, N_CLASSES)) + bias[m]
        z[np.arange(n_rows), y] += skill[m]
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        P[m] = z / z.sum(axis=1, keepdims=True)
    return y, P


def pool_of(task: str, P: np.ndarray) -> list:
    """Stored predictions as frozen models, keyed on column 0 of ``X``."""
    if task == "cls":
        return [
            (f"m{m}", PrecomputedModel(P[m], key_column=0, classes=np.arange(N_CLASSES)))
            for m in range(len(P))
        ]
    return [(f"m{m}", PrecomputedModel(P[m][:, None], key_column=0, output="value"))
            for m in range(len(P))]


def run_size(task: str, n_rows: int, n_models: int, args) -> list[dict]:
    y_all, P = generate(task, n_rows + N_TEST, n_models, args.seed)
    X_all = np.arange(n_rows + N_TEST, dtype=np.float64)[:, None]
    X, y, X_test, y_test = X_all[:n_rows], y_all[:n_rows], X_all[n_rows:], y_all[n_rows:]
    pool = pool_of(task, P)
    if P.nbytes > 1e8:
        print(f"  stored outputs: {P.nbytes / 1e9:.2f} GB", flush=True)
    Est = AggregatedClassifier if task == "cls" else AggregatedRegressor
    rows = []
    steps = {}  # outer steps of our last fit

    def record(method, fit):
        try:
            predict, seconds, runs, kinds = timed(fit, repeats=args.repeats)
        except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
            print(f"  {method:14s} FAILED {type(e).__name__}: {e}", flush=True)
            return
        pred = predict(X_test)
        loss = log_loss(y_test, pred, labels=np.arange(N_CLASSES)) if task == "cls" \
            else rmse(pred, y_test)
        n_steps = steps.pop("n", None)
        solver = steps.pop("solver", None)
        inner = steps.pop("inner", None)
        print(f"  {task} {n_rows:>9,d} rows {n_models:2d} models  {method:14s} "
              f"{seconds:8.2f} s  test {loss:.4f}"
              + (f"  outer steps {n_steps} ({solver}, {inner} inner iterations)"
                 if n_steps is not None else ""), flush=True)
        rows.append({"task": task, "rows": n_rows, "models": n_models, "method": method,
                     "fit_s": seconds, "runs": runs, "test_loss": loss,
                     "outer_steps": n_steps, "cv_solver": solver, "inner_iter": inner,
                     "warnings": ",".join(kinds)})

    for method, params in (("ours tuned", {}), ("ours untuned", {"hyperparams": "fixed"})):
        def fit(params=params):
            est = Est(pool, aggregator="stacking", device=args.device, random_state=args.seed,
                      cv_mode=args.cv_mode, **params).fit(X, y)
            steps["n"] = int(getattr(est, "n_iter_", 0) or 0)
            history = est.tuning_history_
            steps["solver"] = history.attrs.get("cv_solver")
            steps["inner"] = int(history["inner_iter"].sum()) if len(history) else 0
            return est.predict_proba if task == "cls" else est.predict
        record(method, fit)

    if task == "reg" or n_rows * n_models <= args.peer_max_cells:
        def fit_peer():
            # The pool's "predictions" on the aggregation rows: stacked columns.
            def features(Xn):
                idx = Xn[:, 0].astype(np.int64)
                return np.concatenate([p[idx].reshape(len(idx), -1) for p in P], axis=1)

            if task == "cls":
                m = LogisticRegressionCV(Cs=20, cv=5, scoring="neg_log_loss", max_iter=1000)
                m.fit(features(X), y)
                return lambda Xn: m.predict_proba(features(Xn))
            m = RidgeCV(alphas=np.logspace(-4, 4, 20)).fit(features(X), y)
            return lambda Xn: m.predict(features(Xn))
        record("LRCV stacking" if task == "cls" else "RidgeCV stacking", fit_peer)
    return rows


def growth(table: pd.DataFrame) -> pd.DataFrame:
    """Exponent of the time's growth with rows between consecutive sizes."""
    out = []
    for (task, models, method), t in table.groupby(["task", "models", "method"], sort=False):
        t = t.sort_values("rows")
        for (n1, t1), (n2, t2) in zip(t[["rows", "fit_s"]].values, t[["rows", "fit_s"]].values[1:]):
            out.append({"task": task, "models": models, "method": method,
                        "rows": f"{int(n1):,d} -> {int(n2):,d}",
                        "exponent": math.log(t2 / t1) / math.log(n2 / n1)})
    return pd.DataFrame(out)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-rows", type=int, default=10_000,
                        help="largest size run (default 10 000; 1000000 for all four)")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="aggregation rows to run (instead of --max-rows' cut of "
                             "1 k, 10 k, 100 k, 1 M)")
    parser.add_argument("--cv-mode", choices=["exact", "approx", "auto"], default="exact",
                        help="cv_mode of our fits (default: the estimator's, exact)")
    parser.add_argument("--peer-max-cells", type=int, default=80_000,
                        help="LogisticRegressionCV runs while rows x models <= this")
    parser.add_argument("--models", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--task", choices=["cls", "reg", "both"], default="both")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (our fits only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each fit faster than 1 s (median reported)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the rows as CSV")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here; nothing run.")
        return pd.DataFrame()
    torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    sizes = sorted(args.sizes) if args.sizes else [n for n in SIZES if n <= args.max_rows]
    if sizes[0] < 10:
        parser.error(f"--sizes must be at least 10 rows each; got {args.sizes!r}")
    print(f"bench_sweep: sizes {sizes}, models {args.models}, device {args.device}, "
          f"cv_mode {args.cv_mode}, "
          f"torch {torch.__version__} threads={torch.get_num_threads()}, load average "
          f"{load_average()}, library {library_version()}", flush=True)
    print(f"torch warm-up: {warm_up(args.seed):.2f} s (not timed)")
    tasks = ["cls", "reg"] if args.task == "both" else [args.task]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted per fit by timed()
        for task in tasks:
            for n_models in args.models:
                for n_rows in sizes:
                    rows += run_size(task, n_rows, n_models, args)
                    if args.out:  # what has run survives a sweep cut short
                        pd.DataFrame(rows).to_csv(args.out, index=False)
    table = pd.DataFrame(rows)
    wide = table.pivot_table(index=["task", "models", "rows"], columns="method",
                             values="fit_s")
    if {"ours tuned", "ours untuned"} <= set(wide.columns):
        wide["tuned / untuned"] = wide["ours tuned"] / wide["ours untuned"]
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print("\nfit seconds:")
        print(wide.to_string())
        grown = growth(table)
        if len(grown):
            print("\ngrowth exponent of the fit time with rows (1 = linear):")
            print(grown.to_string(index=False))
    print(f"\ntotal {(time.perf_counter() - start) / 60:.1f} min; load average {load_average()}")
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
