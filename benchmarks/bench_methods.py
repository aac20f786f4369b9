"""The hypergradient methods compared: accuracy, cost, and what tuning with each gives.

The measured version of the lecture's comparison table
(``../shared/seeds/001_05d31a67e8412855.txt``, "Algorithm comparison").
Protocol of ``bench_vs_sklearn.py`` (its helpers, imported): per dataset a
stratified 40 / 30 / 30 split; six classifiers pretrained on the first 40 %
and frozen; the aggregation rows (30 %) are all any method sees; the last
30 % is the test set. Two aggregators: ``Stacking`` (one L2 weight per base
model, a 6-vector) and ``LearnedWeights`` (temperature, L2, entropy).

Part 1, accuracy and cost of one hypergradient, at the aggregator's initial
hyperparameters, on one stratified half / half split of the aggregation rows
(float64, CPU):

* reference: implicit CG (tolerance 1e-13) at an inner optimum solved
  tightly (L-BFGS to a gradient of 1e-10, then two Newton steps on the dense
  Hessian). Checked against central finite differences of the validation
  loss at re-solved optima (printed: their relative difference);
* the methods that need an inner optimum are given the L-BFGS solution at
  the engine's default tolerance (1e-7), cold-started, as ``tune`` would
  give them (HOAG: at its own tolerance ``eps_k``); the unrolled ones start
  from the problem's ``theta0`` and pay for their own steps;
* "ms" is the median time of the hypergradient call, "+inner ms" adds the
  median time of that cold-started inner solve.

Part 2, tuning: ``AggregatedClassifier(frozen pool, aggregator, tuner=method,
random_state=0)`` with every other option at its default (5 cross-fitted
folds, L-BFGS-B outer loop). Reported: fit time, outer evaluations, the
cross-fitted validation log-loss at the tuned hyperparameters *with the inner
problems solved to optimality* (a second fit with those hyperparameters
fixed: the unrolled methods' own validation losses are taken at their T-th
iterate, not comparable), and the test log-loss. "untuned" keeps the initial
hyperparameters.

Run: ``python benchmarks/bench_methods.py [--quick] [--datasets digits]
[--repeats 5]``. ``--quick``: breast_cancer only, at most 5 outer
iterations, 1 timing repeat. Timings on a shared machine are only comparable
within one run; the header records the load average.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_sklearn import (  # noqa: E402
    library_version,
    load,
    pool_proba,
    pretrained_pool,
    split,
    warm_up,
)

from aggregators import AggregatedClassifier, LearnedWeights, Stacking  # noqa: E402
from aggregators._base import AggregationContext  # noqa: E402
from aggregators._bilevel import HyperSpace, Split, make_problem  # noqa: E402
from aggregators.hypergrad import METHODS, hoag_tolerance, hypergradient, solve_inner  # noqa: E402

DT = torch.float64
AGGREGATORS = {"stacking": Stacking, "weights": LearnedWeights}

#: What each method assumes / costs (the "+ / -" of the lecture's table).
ASSUMES = {
    "implicit-cg": "IFT at theta*, H v = dQ by CG",
    "implicit-neumann": "IFT, H^-1 ~ Neumann, 50 terms",
    "hoag": "IFT, inner + CG tol eps_k -> 0",
    "truncated-reverse": "20 steps back from theta*",
    "reverse": "100 GD steps from theta0, stored",
    "forward": "100 GD steps, d theta/dh carried",
    "drmad": "reverse on a straight line",
    "t1-t2": "one step: H^-1 ~ lr I",
    "darts-fd": "one step, FD mixed derivative",
}

#: Part 1 rows: (label, method, options, where theta comes from).
VARIANTS = [
    ("implicit-cg", "implicit-cg", {}, "optimum"),
    ("implicit-neumann K=10", "implicit-neumann", {"n_terms": 10}, "optimum"),
    ("implicit-neumann K=50", "implicit-neumann", {}, "optimum"),
    ("implicit-neumann K=200", "implicit-neumann", {"n_terms": 200}, "optimum"),
    ("hoag k=0", "hoag", {"iteration": 0}, "hoag"),
    ("hoag k=5", "hoag", {"iteration": 5}, "hoag"),
    ("hoag k=30", "hoag", {"iteration": 30}, "hoag"),
    ("truncated-reverse K=5", "truncated-reverse", {"n_steps": 5}, "optimum"),
    ("truncated-reverse K=20", "truncated-reverse", {}, "optimum"),
    ("truncated-reverse K=100", "truncated-reverse", {"n_steps": 100}, "optimum"),
    ("reverse T=100", "reverse", {}, "start"),
    ("reverse T=1000", "reverse", {"n_steps": 1000}, "start"),
    ("forward T=100", "forward", {}, "start"),
    ("forward T=1000", "forward", {"n_steps": 1000}, "start"),
    ("drmad T=100", "drmad", {}, "start"),
    ("drmad T=1000", "drmad", {"n_steps": 1000}, "start"),
    ("t1-t2", "t1-t2", {}, "optimum"),
    ("darts-fd one-step", "darts-fd", {}, "optimum"),
    ("darts-fd cg", "darts-fd", {"solver": "cg"}, "optimum"),
]
QUICK_VARIANTS = {
    "implicit-cg", "implicit-neumann K=50", "hoag k=0", "hoag k=30", "truncated-reverse K=20",
    "reverse T=100", "forward T=100", "drmad T=100", "t1-t2", "darts-fd one-step",
    "darts-fd cg",
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def median_time(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


# -- part 1: one hypergradient ------------------------------------------------------------
def aggregator_problem(pool, X_agg, y_agg, classes, agg, seed):
    """The bilevel problem of ``agg`` on a stratified half / half split of the rows."""
    Z = np.transpose(pool_proba(pool, X_agg, classes), (1, 0, 2))  # (rows, models, classes)
    yk = np.searchsorted(classes, y_agg)
    tr, va = train_test_split(np.arange(len(yk)), test_size=0.5, stratify=yk, random_state=seed)
    Zt, yt = torch.as_tensor(Z, dtype=DT), torch.as_tensor(yk)
    ctx = AggregationContext(
        task="classification", n_models=Z.shape[1], n_outputs=len(classes),
        n_features=X_agg.shape[1], model_names=list(pool), classes=classes,
    )
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    prob, _, _ = make_problem(
        agg, ctx, Split(Zt[tr], yt[tr]), Split(Zt[va], yt[va]), space
    )
    return prob, space.initial()


def tight_optimum(prob, h, theta0=None):
    """L-BFGS to 1e-10, then Newton steps to bring the gradient to rounding level.

    The Newton system is solved on the Hessian's range (eigendecomposition):
    softmax intercepts have an exact null direction. ``torch.linalg.lstsq``
    (gelsy) sometimes left a residual of 1e-10 there.
    """
    theta, _, _ = solve_inner(prob, h, theta0, max_iter=5000, tol=1e-10)
    for _ in range(3):
        H = torch.autograd.functional.hessian(lambda t: prob.inner_loss(t, h), theta)
        g = prob.inner_grad(theta, h)
        ev, U = torch.linalg.eigh(H)
        keep = ev > 1e-10 * ev[-1]
        theta = theta - U[:, keep] @ ((U[:, keep].T @ g) / ev[keep])
    return theta


def finite_difference(prob, h, theta, eps=1e-4):
    fd = torch.zeros_like(h)
    for i in range(h.numel()):
        e = torch.zeros_like(h)
        e[i] = eps
        qp = prob.outer_loss(tight_optimum(prob, h + e, theta), h + e)
        qm = prob.outer_loss(tight_optimum(prob, h - e, theta), h - e)
        fd[i] = (qp - qm) / (2 * eps)
    return fd


def accuracy_table(prob, h, variants, repeats: int) -> tuple[pd.DataFrame, str]:
    theta_ref = tight_optimum(prob, h)
    ref = hypergradient(prob, theta_ref, h, "implicit-cg", max_iter=20 * theta_ref.numel(), tol=1e-13)
    fd = finite_difference(prob, h, theta_ref)
    note = (
        f"dim theta {theta_ref.numel()}, dim h {h.numel()}; reference: inner gradient "
        f"{float(prob.inner_grad(theta_ref, h).abs().max()):.1e}, CG residual "
        f"{ref.info['residual']:.1e}, vs finite differences {rel_err(fd, ref.grad):.1e}"
    )
    solved = {}

    def inner_at(tol):
        if tol not in solved:
            (theta, _, _), sec = median_time(lambda: solve_inner(prob, h, tol=tol), repeats)
            solved[tol] = theta, sec
        return solved[tol]

    rows = []
    for label, method, options, start in variants:
        if start == "start":
            theta, inner_s = prob.theta0, 0.0
        else:
            tol = 1e-7
            if start == "hoag":
                tol = max(hoag_tolerance(options["iteration"]), 1e-7)
            theta, inner_s = inner_at(tol)
        res, sec = median_time(lambda: hypergradient(prob, theta, h, method, **options), repeats)
        rows.append({
            "variant": label, "method": method, "rel_err": rel_err(res.grad, ref.grad),
            "ms": 1e3 * sec, "+inner ms": 1e3 * (sec + inner_s),
        })
    return pd.DataFrame(rows), note


# -- part 2: tuning --------------------------------------------------------------------------
def exact_validation_loss(frozen, agg_name, hyper, X, y, seed) -> float:
    """Cross-fitted validation log-loss at ``hyper`` with optimal inner solutions."""
    fixed = {k: np.asarray(v, dtype=float).ravel() for k, v in hyper.items()}
    est = AggregatedClassifier(
        frozen, aggregator=agg_name, hyperparams=fixed, max_inner_iter=5000, random_state=seed
    ).fit(X, y)
    return float(est.validation_loss_)


def tuning_table(frozen, agg_name, data, seed, max_outer_iter) -> pd.DataFrame:
    X_agg, y_agg, X_test, y_test = data
    rows = []
    for method in ["untuned", *METHODS]:
        opts = {"hyperparams": "fixed"} if method == "untuned" else {"tuner": method}
        if max_outer_iter is not None:
            opts["max_outer_iter"] = max_outer_iter
        est = AggregatedClassifier(frozen, aggregator=agg_name, random_state=seed, **opts)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            est.fit(X_agg, y_agg)
            fit_s = time.perf_counter() - t0
        hyper = {k: np.asarray(v) for k, v in est.hyperparams_.items()}
        rows.append({
            "method": method,
            "outer evals": int(est.n_iter_),
            "fit s": fit_s,
            "val ll": exact_validation_loss(frozen, agg_name, hyper, X_agg, y_agg, seed),
            "test ll": log_loss(y_test, est.predict_proba(X_test), labels=est.classes_),
            "warnings": ",".join(sorted({w.category.__name__ for w in caught})),
        })
        print(f"    tuned with {method}: {fit_s:.1f}s", flush=True)
    return pd.DataFrame(rows)


# -- the tables ----------------------------------------------------------------------------------
def comparison(acc: pd.DataFrame, tun: pd.DataFrame) -> pd.DataFrame:
    """One row per method: its default variant's accuracy and cost, and its tuning."""
    default_variant = {
        "implicit-cg": "implicit-cg", "implicit-neumann": "implicit-neumann K=50",
        "hoag": "hoag k=0", "truncated-reverse": "truncated-reverse K=20",
        "reverse": "reverse T=100", "forward": "forward T=100", "drmad": "drmad T=100",
        "t1-t2": "t1-t2", "darts-fd": "darts-fd one-step",
    }
    rows = []
    for _, t in tun.iterrows():
        m = t["method"]
        a = acc[acc.variant == default_variant.get(m, "")]
        rows.append({
            "method": m,
            "assumes": ASSUMES.get(m, "initial hyperparameters"),
            "rel err": a.rel_err.iloc[0] if len(a) else math.nan,
            "ms (+inner)": (
                f"{a['ms'].iloc[0]:.1f} ({a['+inner ms'].iloc[0]:.1f})" if len(a) else "-"
            ),
            "evals": t["outer evals"],
            "fit s": t["fit s"],
            "val ll": t["val ll"],
            "test ll": t["test ll"],
            "warn": t["warnings"],
        })
    return pd.DataFrame(rows)


FORMATS = {
    "rel_err": "{:.1e}".format, "rel err": lambda v: "-" if not np.isfinite(v) else f"{v:.1e}",
    "ms": "{:.2f}".format, "+inner ms": "{:.2f}".format, "fit s": "{:.2f}".format,
    "val ll": "{:.5f}".format, "test ll": "{:.5f}".format,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="breast_cancer only, <= 5 outer iterations, fewer variants")
    parser.add_argument("--datasets", nargs="+", default=None,
                        choices=("breast_cancer", "wine", "digits", "synthetic"),
                        help="default: breast_cancer digits (quick: breast_cancer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timing repeats of each hypergradient (default 5, quick 1)")
    args = parser.parse_args(argv)
    datasets = args.datasets or (["breast_cancer"] if args.quick else ["breast_cancer", "digits"])
    repeats = args.repeats or (1 if args.quick else 5)
    variants = [v for v in VARIANTS if not args.quick or v[0] in QUICK_VARIANTS]
    max_outer_iter = 5 if args.quick else None

    print(
        f"bench_methods: seed {args.seed}, {'quick' if args.quick else 'full'} run, torch "
        f"{torch.__version__} threads={torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start, library {library_version()}"
    )
    print(f"torch warm-up: {warm_up(args.seed):.2f}s (not timed)")
    pd.set_option("display.width", 250)
    for name in datasets:
        X, y = load(name, args.quick, args.seed)
        X_pool, y_pool, X_agg, y_agg, X_test, y_test = split(X, y, args.seed)
        classes = np.unique(y)
        pool = pretrained_pool(X_pool, y_pool, args.seed)
        frozen = [(n, FrozenEstimator(m)) for n, m in pool.items()]
        print(f"\n=== {name}: {len(classes)} classes, {len(pool)} pretrained models; "
              f"aggregation rows {len(X_agg)}, test rows {len(X_test)}", flush=True)
        for agg_name, cls in AGGREGATORS.items():
            print(f"  [{agg_name}] one hypergradient ...", flush=True)
            prob, h = aggregator_problem(pool, X_agg, y_agg, classes, cls(), args.seed)
            acc, note = accuracy_table(prob, h, variants, repeats)
            print(f"  [{agg_name}] tuning ...", flush=True)
            tun = tuning_table(frozen, agg_name, (X_agg, y_agg, X_test, y_test),
                               args.seed, max_outer_iter)
            print(f"\n--- {name} / {agg_name}: one hypergradient at the initial "
                  f"hyperparameters ({note})")
            print(acc.drop(columns="method").to_string(index=False, formatters=FORMATS))
            print(f"\n--- {name} / {agg_name}: comparison (rel err and ms of each method's "
                  f"default variant; val ll with optimal inner solutions; "
                  f"load average {os.getloadavg()[0]:.2f})")
            print(comparison(acc, tun).to_string(index=False, formatters=FORMATS), flush=True)


if __name__ == "__main__":
    main()
