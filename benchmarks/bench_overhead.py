"""The fixed cost of a fit: where a fit's time goes, and our fits against their peers.

Issue 20. On ``bench_vs_sklearn``'s datasets, splits and frozen pools (one
thread: ``threadpoolctl`` and ``torch.set_num_threads(1)``), for seeds 0-4:

* ``--time``: each method fitted ``--repeats`` times per seed, the methods
  alternated within every repeat so that a change of load hits them alike;
  per method the mean over the seeds of the median fit time, and its ratio
  to the first peer (RidgeCV stacking for regression, LogisticRegressionCV
  stacking for classification) and to Caruana's selection. ``pool`` is the
  frozen pool's predictions on the aggregation rows alone, which every fit
  here includes.
* ``--phases``: the mean time per fit of the steps of ``fit_aggregated``
  (each wrapped with a timer; the steps nest: ``solve_inner`` runs inside
  ``_refit``), over ``--repeats`` fits of each seed.
* ``--profile``: cProfile over those fits, the functions by cumulative time.

Methods: ``stacking``, ``stacking-fixed`` (``hyperparams="fixed"``),
``weights``, ``default`` (no ``aggregator``), ``ridgecv`` / ``lrcv``
(``StackingRegressor`` / ``StackingClassifier`` with ``RidgeCV`` over 20
alphas or ``LogisticRegressionCV(Cs=20, cv=5)``, ``cv="prefit"``),
``caruana`` (50 rounds, with the pool's predictions), ``pool``.

Run: ``python benchmarks/bench_overhead.py --time diabetes friedman1
--methods stacking stacking-fixed ridgecv pool``; ``--phases diabetes
--methods stacking``. Timings on a shared machine compare only within one
run: the header prints the load average.

Before and after a change: ``--against REV`` (a git revision of this
repository) exports ``REV``'s tree into a temporary folder and runs the same
command ``--rounds`` times alternately with that tree (its own copy of this
script, the library imported from there through ``PYTHONPATH``) and with the
working tree, so that a change of load hits both alike; peers such as
``ridgecv`` and ``pool`` in the methods anchor each run.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import StackingClassifier, StackingRegressor
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_sklearn as B  # noqa: E402
from _peers import caruana_selection, caruana_selection_sq  # noqa: E402

from aggregators import AggregatedClassifier, AggregatedRegressor  # noqa: E402

STEPS = (
    "fit_pool", "make_splits", "make_linear_cv_problem", "make_fold_problems",
    "make_acv_problem", "tune", "linear_full_fit", "_refit", "solve_inner",
    "_history_frame",
)


def setups(name: str, seeds) -> list[dict]:
    """Per seed: the frozen pool, the aggregation rows and the classes."""
    task = B.TASKS[name]
    out = []
    for seed in seeds:
        X, y = B.load(name, False, seed)
        X_pool, y_pool, X_agg, y_agg, _, _ = B.split(X, y, seed, stratify=task == "cls")
        pool = (B.regressor_pool if task == "reg" else B.pretrained_pool)(X_pool, y_pool, seed)
        out.append(dict(
            task=task, seed=seed, pool=pool, X=X_agg, y=y_agg,
            frozen=[(n, FrozenEstimator(m)) for n, m in pool.items()],
            classes=np.unique(y) if task == "cls" else None,
        ))
    return out


def fitter(method: str, s: dict):
    """A function of no arguments that fits ``method`` on one seed's rows."""
    task, frozen, X, y = s["task"], s["frozen"], s["X"], s["y"]
    if method == "pool":
        models = [m for _, m in frozen]
        out = "predict" if task == "reg" else "predict_proba"
        return lambda: [getattr(m, out)(X) for m in models]
    if method == "ridgecv":
        return lambda: StackingRegressor(
            frozen, final_estimator=RidgeCV(alphas=B.GRID), cv="prefit").fit(X, y)
    if method == "lrcv":
        return lambda: StackingClassifier(frozen, cv="prefit", final_estimator=LogisticRegressionCV(
            Cs=20, cv=5, scoring="neg_log_loss", max_iter=1000)).fit(X, y)
    if method == "caruana":
        if task == "cls":
            c = s["classes"]
            return lambda: caruana_selection(
                B.pool_proba(s["pool"], X, c), np.searchsorted(c, y))
        return lambda: caruana_selection_sq(B.pool_predict(s["pool"], X), y)
    Est = AggregatedRegressor if task == "reg" else AggregatedClassifier
    params = {} if method == "default" else {"aggregator": method.removesuffix("-fixed")}
    if method.endswith("-fixed"):
        params["hyperparams"] = "fixed"
    return lambda: Est(frozen, random_state=s["seed"], **params).fit(X, y)


def time_methods(name: str, methods, seeds, repeats: int) -> None:
    runs = setups(name, seeds)
    fits = {m: [fitter(m, s) for s in runs] for m in methods}
    for m in methods:  # torch's and scikit-learn's first-call costs, untimed
        fits[m][0]()
    times = {m: [[] for _ in runs] for m in methods}
    for _ in range(repeats):
        for i in range(len(runs)):
            for m in methods:
                t0 = time.perf_counter()
                fits[m][i]()
                times[m][i].append(time.perf_counter() - t0)
    mean = {m: 1e3 * np.mean([statistics.median(t) for t in times[m]]) for m in methods}
    peer = next((m for m in ("ridgecv", "lrcv") if m in mean), None)
    for m in methods:
        ratios = "".join(
            f"  {mean[m] / mean[p]:5.2f}x {p}" for p in (peer, "caruana") if p in mean and p != m
        )
        print(f"{name:14s} {m:16s} {mean[m]:9.2f} ms{ratios}", flush=True)


def phases(name: str, methods, seeds, repeats: int, profile: bool) -> None:
    import aggregators._fit as fit_module

    spent: dict = {}

    def timer(f):
        @functools.wraps(f)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent[f.__name__] = spent.get(f.__name__, 0.0) + time.perf_counter() - t0
        return timed

    originals = {s: getattr(fit_module, s) for s in STEPS if hasattr(fit_module, s)}
    for s, f in originals.items():
        setattr(fit_module, s, timer(f))
    try:
        runs = setups(name, seeds)
        for m in methods:
            fits = [fitter(m, s) for s in runs]
            fits[0]()
            spent.clear()
            prof = cProfile.Profile() if profile else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            for _ in range(repeats):
                for f in fits:
                    f()
            if prof:
                prof.disable()
            n = repeats * len(fits)
            print(f"{name} {m}: {1e3 * (time.perf_counter() - t0) / n:.2f} ms a fit"
                  + (" (under cProfile)" if prof else ""))
            for s, v in sorted(spent.items(), key=lambda kv: -kv[1]):
                print(f"    {s:24s} {1e3 * v / n:8.2f} ms")
            if prof:
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
                print(text.getvalue())
    finally:
        for s, f in originals.items():
            setattr(fit_module, s, f)


def against(rev: str, rounds: int, argv: list[str]) -> None:
    """Run this command on ``rev``'s tree and on the working tree, alternately."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", rev], check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        trees = [(rev, Path(tmp)), ("working tree", root)]
        for r in range(rounds):
            for label, tree in trees:
                env = {**os.environ, "PYTHONPATH": str(tree)}
                print(f"=== round {r + 1}, {label}", flush=True)
                # Run from the temporary folder, so that the working tree is not
                # imported from the current directory.
                subprocess.run(
                    [sys.executable, str(tree / "benchmarks" / "bench_overhead.py"), *argv],
                    check=True, env=env, cwd=tmp,
                )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--time", action="store_true")
    mode.add_argument("--phases", action="store_true")
    mode.add_argument("--profile", action="store_true")
    parser.add_argument("datasets", nargs="+", choices=sorted(B.TASKS))
    parser.add_argument("--methods", nargs="+", default=["stacking", "stacking-fixed"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also run REV's tree, alternating with the working tree")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternations with --against")
    args = parser.parse_args(argv)
    if args.against is not None:
        rest = list(sys.argv[1:] if argv is None else argv)
        i = rest.index("--against")
        del rest[i:i + 2]
        if "--rounds" in rest:
            i = rest.index("--rounds")
            del rest[i:i + 2]
        against(args.against, args.rounds, rest)
        return
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import aggregators

    print(f"# hyperagg {B.library_version()} (imported from "
          f"{Path(aggregators.__file__).parent}); load average {os.getloadavg()}; "
          f"seeds {args.seeds}, {args.repeats} repeats", flush=True)
    with threadpool_limits(1):
        for name in args.datasets:
            if args.time:
                time_methods(name, args.methods, args.seeds, args.repeats)
            else:
                phases(name, args.methods, args.seeds, args.repeats, args.profile)


if __name__ == "__main__":
    main()
