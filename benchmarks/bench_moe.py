"""SparseMoE versus k, sparse versus dense predict, ModelSelection, and DESlib's dynamic selection.

Protocol, per dataset: a stratified 40 / 30 / 30 split (fixed seed). The
first 40 % trains a pool of base models once (then frozen); the next 30 % is
all that an aggregation method sees (DESlib's DSEL); the last 30 % is the
test set.

* ``regions``: synthetic specialists. Four regions (quadrants of the first
  two of 8 features); in region ``r`` the label is the sign of feature
  ``2 + r``. Expert ``r`` is a 200-tree random forest trained on region ``r``
  only, so each expert is good on its own region and near chance elsewhere.
* ``breast_cancer``, ``wine``, ``digits`` (bundled with scikit-learn): a pool
  of five models with a real prediction cost: random forest (300 trees),
  extra trees (300), kNN (k=15), an MLP and an RBF SVC with probabilities.

Methods: best single (lowest log-loss on the aggregation rows), the uniform
average, ``SparseMoE(k)`` for ``k`` in 1, 2, m, ``ModelSelection("weights")``,
and DESlib's KNORA-E and META-DES (on the same frozen pool, DSEL = the
aggregation rows) when they run.

Columns: test accuracy and log-loss; ``calls`` the share of (row, model)
base-model calls made at predict time (1 = dense); ``t_sparse`` / ``t_dense``
the median wall time over ``--repeats`` of ``predict_proba`` with routing and
with ``dense=True`` (the predictions agree to 1e-9) on the test rows tiled to
at least ``--time-rows`` rows (50 000; 10 000 with ``--quick``), and their ratio (for the uniform average: one pass of
every base model). DESlib 0.3.7 needs a one-line shim to run with
scikit-learn 1.9 (:func:`_deslib_compat`). The machine is shared with other jobs: timings are indicative.

``--quickstart``: only ``SparseMoE()``'s fit on the quickstart's pool and
splits (``examples/quickstart.py``; breast_cancer unless ``--datasets``
names others), seeds 0-2: median fit time, outer evaluations, test log-loss.

Run: ``python benchmarks/bench_moe.py [--quick] [--datasets regions wine]``;
``python benchmarks/bench_moe.py --quickstart [--datasets breast_cancer digits]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from aggregators import AggregatedClassifier, ModelSelection, SparseMoE


def regions(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8))
    owner = (X[:, 0] > 0).astype(int) * 2 + (X[:, 1] > 0).astype(int)
    y = (X[np.arange(n), 2 + owner] > 0).astype(int)
    return X, y, owner


def make_task(name, quick):
    if name == "regions":
        X, y, owner = regions(2000 if quick else 4000)
    else:
        loader = {"breast_cancer": load_breast_cancer, "wine": load_wine, "digits": load_digits}[name]
        X, y = loader(return_X_y=True)
        owner = np.zeros(len(y), int)
    idx = np.arange(len(y))
    i_pool, i_rest = train_test_split(idx, train_size=0.4, stratify=y, random_state=0)
    i_agg, i_test = train_test_split(i_rest, test_size=0.5, stratify=y[i_rest], random_state=0)
    trees = 100 if quick else 300
    if name == "regions":
        pool = {}
        for r in range(4):
            sel = i_pool[owner[i_pool] == r]
            pool[f"rf_region{r}"] = RandomForestClassifier(
                trees, min_samples_leaf=3, random_state=r, n_jobs=1
            ).fit(X[sel], y[sel])
    else:
        pool = {
            "forest": RandomForestClassifier(trees, random_state=0, n_jobs=1),
            "extra": ExtraTreesClassifier(trees, random_state=0, n_jobs=1),
            "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(15)),
            "mlp": make_pipeline(StandardScaler(), MLPClassifier((64,), max_iter=1000, random_state=0)),
            "svc": make_pipeline(StandardScaler(), SVC(probability=True, random_state=0)),
        }
        for m in pool.values():
            m.fit(X[i_pool], y[i_pool])
    return X, y, owner, pool, i_agg, i_test


def timed(f, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def row(name, y, proba, classes, calls, ts, td):
    pred = classes[proba.argmax(1)]
    return {
        "method": name, "acc": accuracy_score(y, pred),
        "logloss": log_loss(y, np.clip(proba, 1e-15, 1), labels=classes),
        "calls": calls, "t_sparse": ts, "t_dense": td,
        "ratio": (td / ts) if ts and td else float("nan"),
    }


def run(name, quick, repeats, time_rows):
    X, y, owner, pool, i_agg, i_test = make_task(name, quick)
    Xa, ya, Xt, yt = X[i_agg], y[i_agg], X[i_test], y[i_test]
    classes = np.unique(y)
    frozen = [(n, FrozenEstimator(m)) for n, m in pool.items()]
    m = len(pool)
    rows = []
    P_agg = {n: mdl.predict_proba(Xa) for n, mdl in pool.items()}
    best = min(P_agg, key=lambda n: log_loss(ya, P_agg[n], labels=classes))
    # Wall times are taken on the test rows tiled to >= time_rows rows, where the
    # base models' per-row cost, not their per-call overhead, dominates.
    Xtime = np.tile(Xt, (int(np.ceil(time_rows / len(Xt))), 1))
    P_test = {n: mdl.predict_proba(Xt) for n, mdl in pool.items()}
    _, t_all = timed(lambda: [mdl.predict_proba(Xtime) for mdl in pool.values()], repeats)
    rows.append(row(f"best single ({best})", yt, P_test[best], classes, 1 / m, None, None))
    rows.append(row("uniform average", yt, np.mean(list(P_test.values()), 0), classes, 1.0, None, t_all))

    fit_opts = {"random_state": 0, "max_outer_iter": 5 if quick else 15, "cv": None if quick else 3}
    extra = {}
    for k in sorted({1, 2, m}):
        est = AggregatedClassifier(frozen, aggregator=SparseMoE(k=k), **fit_opts)
        t0 = time.perf_counter()
        est.fit(Xa, ya)
        fit_s = time.perf_counter() - t0
        proba = est.predict_proba(Xt)
        calls = est.last_routing_.sum() / (len(Xt) * m)
        _, ts = timed(lambda: est.predict_proba(Xtime), repeats)
        if name == "regions" and k == 1:
            agg = est.aggregator_
            import torch

            params, hyper = agg._fitted_tensors(torch.device("cpu"), torch.float64)
            with torch.no_grad():
                mask = agg.route(params, hyper, torch.as_tensor(Xt, dtype=torch.float64)).numpy()
            extra["owner_routed_k1"] = float(mask[np.arange(len(Xt)), owner[i_test]].mean())
        _, td = timed(lambda: est.predict_proba(Xtime, dense=True), repeats)
        dense = est.predict_proba(Xt, dense=True)
        # Equal up to the base models' own floating point: BLAS sums may
        # differ in the last bits with the batch size.
        np.testing.assert_allclose(proba, dense, rtol=1e-9, atol=1e-12)
        r = row(f"SparseMoE k={k}", yt, proba, classes, calls, ts, td)
        r["fit_s"] = fit_s
        rows.append(r)

    est = AggregatedClassifier(frozen, aggregator=ModelSelection("weights"), **fit_opts)
    t0 = time.perf_counter()
    est.fit(Xa, ya)
    fit_s = time.perf_counter() - t0
    proba = est.predict_proba(Xt)
    calls = est.last_routing_.sum() / (len(Xt) * m)
    _, ts = timed(lambda: est.predict_proba(Xtime), repeats)
    _, td = timed(lambda: est.predict_proba(Xtime, dense=True), repeats)
    sel = est.aggregator_.selected_
    r = row(f"ModelSelection(weights) keeps {list(sel.index[sel])}", yt, proba, classes, calls, ts, td)
    r["fit_s"] = fit_s
    rows.append(r)

    for label, cls_name in (("DESlib KNORA-E", "KNORAE"), ("DESlib META-DES", "METADES")):
        try:
            import deslib.des as des

            cls = _deslib_compat(getattr(des, cls_name))
            ds = cls(pool_classifiers=list(pool.values()), random_state=0)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.fit(Xa, ya)
            fit_s = time.perf_counter() - t0
            proba = ds.predict_proba(Xt)
            _, ts = timed(lambda: ds.predict_proba(Xtime), repeats)
            r = row(label, yt, proba, classes, float("nan"), ts, None)
            r["fit_s"] = fit_s
            rows.append(r)
        except Exception as e:  # report exactly how it breaks
            rows.append({"method": f"{label}: FAILED {type(e).__name__}: {str(e)[:120]}"})
    return rows, extra


def _deslib_compat(cls):
    """DESlib 0.3.7 calls ``self._validate_data``, removed in scikit-learn 1.9.

    Without this shim ``fit`` fails with ``AttributeError: 'KNORAE' object has
    no attribute '_validate_data'``. The shim forwards to the public
    ``sklearn.utils.validation.validate_data`` (the documented replacement).
    """
    from sklearn.utils.validation import validate_data

    if hasattr(cls, "_validate_data"):
        return cls
    return type(cls.__name__, (cls,), {
        "_validate_data": lambda self, *a, **kw: validate_data(self, *a, **kw)
    })


def fmt(v, spec):
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def quickstart_fits(datasets, seeds, repeats: int) -> None:
    """``SparseMoE()``'s fit on the quickstart's pool and splits (issue 14: under 2 s on
    breast_cancer): per dataset and seed the median fit time of ``repeats`` fits (one
    thread), the outer evaluations and the test log-loss."""
    import os
    import statistics
    import sys
    from pathlib import Path

    import torch
    from sklearn import datasets as sk_datasets
    from threadpoolctl import threadpool_limits

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import quickstart

    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()}")
    print("| dataset | seed | fit s (median) | outer evaluations | test log-loss |")
    print("|---|---|---|---|---|")
    with threadpool_limits(1):
        for name in datasets:
            X, y = getattr(sk_datasets, f"load_{name}")(return_X_y=True)
            for seed in seeds:
                X_pool, X_rest, y_pool, y_rest = train_test_split(
                    X, y, train_size=0.4, stratify=y, random_state=seed)
                X_agg, X_test, y_agg, y_test = train_test_split(
                    X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed)
                pool = quickstart.pretrained_pool(X_pool, y_pool, seed)
                frozen = [(n, FrozenEstimator(m)) for n, m in pool.items()]
                times = []
                for r in range(repeats + 1):  # the first fit warms torch up, untimed
                    t0 = time.perf_counter()
                    est = AggregatedClassifier(frozen, aggregator=SparseMoE(),
                                               random_state=seed).fit(X_agg, y_agg)
                    if r:
                        times.append(time.perf_counter() - t0)
                loss = log_loss(y_test, est.predict_proba(X_test), labels=np.unique(y))
                print(f"| {name} | {seed} | {statistics.median(times):.2f} | "
                      f"{len(est.tuning_history_)} | {loss:.4f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller pools, fewer outer steps, one split")
    ap.add_argument("--quickstart", action="store_true",
                    help="only SparseMoE's fit time on the quickstart's pool and splits, seeds 0-2")
    ap.add_argument("--datasets", nargs="+", default=["regions", "breast_cancer", "wine", "digits"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-rows", type=int, default=None,
                    help="rows predicted for the wall times (default 10 000, quick; 50 000)")
    args = ap.parse_args()
    if args.quickstart:
        names = [d for d in args.datasets if d != "regions"]
        quickstart_fits(names if "--datasets" in sys.argv else ["breast_cancer"], [0, 1, 2],
                        args.repeats)
        return
    for name in args.datasets:
        time_rows = args.time_rows or (10000 if args.quick else 50000)
        rows, extra = run(name, args.quick, args.repeats, time_rows)
        print(f"\n### {name}" + ("  (quick)" if args.quick else ""))
        if extra:
            print("share of test rows whose k=1 expert is the region's owner:",
                  f"{extra['owner_routed_k1']:.3f}")
        print("| method | acc | log-loss | calls | fit s | predict s sparse | dense | dense/sparse |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "acc" not in r:
                print(f"| {r['method']} | | | | | | | |")
                continue
            print(f"| {r['method']} | {r['acc']:.4f} | {r['logloss']:.4f} | {fmt(r['calls'], '.3f')} | "
                  f"{fmt(r.get('fit_s'), '.1f')} | {fmt(r['t_sparse'], '.3f')} | "
                  f"{fmt(r['t_dense'], '.3f')} | {fmt(r['ratio'], '.2f')} |")


if __name__ == "__main__":
    main()
