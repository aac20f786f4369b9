"""Batch scoring: ``score_file`` against a hand-written pandas loop and ``score_dask``.

A Parquet file of ``--rows`` rows x 20 features (a 3-class ``make_classification``
task), the quickstart's pool (logistic regression, naive Bayes, 15-NN, a tree,
a 100-tree forest) trained on 4 000 rows and frozen, and an aggregator fitted on
3 000 more: ``stacking`` and ``SparseMoE(k=1)``. Each way of scoring the file
runs in its own fresh process, so that its peak resident memory (``ru_maxrss``)
is its own:

* ``score_file``   -- ``aggregators.score_file(model_path, input, output)``;
* ``pandas loop``  -- the hand-written baseline: ``pd.read_parquet`` of the file,
  ``predict_proba`` per chunk of ``--chunk-rows``, ``DataFrame.to_parquet``;
* ``score_dask``   -- ``score_dask`` on a ``LocalCluster`` of 2 worker processes,
  ``read_parquet`` -> ``to_parquet`` (its memory is the largest worker's peak).

Also printed: the share of ``score_file``'s time spent inside the estimator's
``predict_proba`` (base models and aggregation), i.e. what the framework adds,
and with ``--rss-rows`` the peak memory of ``score_file`` and of the pandas
loop on larger files: ``score_file``'s should not grow with the file.

Run: ``python benchmarks/bench_scoring.py [--rows 1000000] [--rss-rows 10000000]
[--chunk-rows 100000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

N_FEATURES = 20
FEATURES = [f"x{i:02d}" for i in range(N_FEATURES)]


def _task(n, seed):
    from sklearn.datasets import make_classification  # noqa: PLC0415

    X, y = make_classification(
        n, N_FEATURES, n_informative=10, n_redundant=4, n_classes=3, class_sep=0.8,
        random_state=seed,
    )
    return X, y


def write_input(path: Path, rows: int, chunk: int = 1_000_000) -> None:
    """``rows`` rows in Parquet, written a million at a time (any size fits in memory)."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        X, _ = _task(n, seed=1000 + start // chunk)
        table = pa.table({"id": np.arange(start, start + n), **{c: X[:, j] for j, c in enumerate(FEATURES)}})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=128 * 1024)
    writer.close()


def fit_models(folder: Path) -> dict:
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415
    from sklearn.frozen import FrozenEstimator  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.naive_bayes import GaussianNB  # noqa: PLC0415
    from sklearn.neighbors import KNeighborsClassifier  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415
    from sklearn.tree import DecisionTreeClassifier  # noqa: PLC0415

    from aggregators import AggregatedClassifier, SparseMoE, save  # noqa: PLC0415

    X, y = _task(7000, seed=0)
    X = pd.DataFrame(X, columns=FEATURES)
    pool = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "naive_bayes": GaussianNB(),
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(15)),
        "tree": DecisionTreeClassifier(max_depth=4, random_state=0),
        "forest": RandomForestClassifier(100, max_depth=6, random_state=0),
    }
    frozen = [(n, FrozenEstimator(m.fit(X[:4000], y[:4000]))) for n, m in pool.items()]
    paths = {}
    for name, agg in (("stacking", "stacking"), ("moe k=1", SparseMoE(k=1))):
        est = AggregatedClassifier(frozen, aggregator=agg, random_state=0).fit(X[4000:], y[4000:])
        paths[name] = str(save(est, folder / f"{name.replace(' ', '_').replace('=', '')}.hyperagg"))
    return paths


# -- the workers (each in a fresh process) ----------------------------------------
def _reset_peak() -> None:
    """Forget the peak RSS so far (Linux >= 4.0).

    A child made by fork+exec starts with its parent's peak, which would
    otherwise be counted as the child's.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(method: str, model: str, src: str, dst: str, chunk_rows: int) -> dict:
    _reset_peak()
    from aggregators import load, score_dask, score_file  # noqa: PLC0415

    est = load(model)
    start_mb = _peak_mb()
    t0 = time.perf_counter()
    inside = 0.0
    if method == "score_file":
        predict = est.predict_proba

        def timed(X):
            nonlocal inside
            t = time.perf_counter()
            out = predict(X)
            inside += time.perf_counter() - t
            return out

        est.predict_proba = timed
        score_file(est, src, dst, chunk_rows=chunk_rows, id_column="id", progress=False)
    elif method == "pandas loop":
        df = pd.read_parquet(src)
        parts = []
        for start in range(0, len(df), chunk_rows):
            chunk = df.iloc[start : start + chunk_rows]
            proba = est.predict_proba(chunk[FEATURES])
            part = pd.DataFrame(proba, columns=[f"proba_{c}" for c in est.classes_])
            part.insert(0, "id", chunk["id"].to_numpy())
            part["prediction"] = est.classes_[proba.argmax(1)]
            parts.append(part)
        pd.concat(parts, ignore_index=True).to_parquet(dst)
    elif method == "score_dask":
        import dask.dataframe as dd  # noqa: PLC0415
        from distributed import Client, LocalCluster  # noqa: PLC0415

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.run(_reset_peak)
            t0 = time.perf_counter()  # the cluster's start-up is not scoring
            ddf = dd.read_parquet(src, blocksize=None)
            score_dask(est, ddf, id_column="id").to_parquet(dst, write_index=False)
            seconds = time.perf_counter() - t0
            workers = client.run(_peak_mb)
        return {"seconds": seconds, "peak_mb": max(workers.values()),
                "start_mb": None, "inside": None}
    else:
        raise ValueError(method)
    return {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(), "start_mb": start_mb,
            "inside": inside or None}


def run_worker(method, model, src, dst, chunk_rows) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, model, src, dst, str(chunk_rows)],
        capture_output=True, text=True, check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rss-rows", type=int, nargs="*", default=[],
                    help="also measure score_file's peak memory on files this long")
    ap.add_argument("--chunk-rows", type=int, default=100_000)
    ap.add_argument("--methods", nargs="*", default=["score_file", "pandas loop", "score_dask"])
    ap.add_argument("--repeat", type=int, default=3, help="runs per method (median reported)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, model, src, dst, chunk = args.worker
        print(json.dumps(worker(method, model, src, dst, int(chunk))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        paths = fit_models(tmp)
        src = tmp / "rows.parquet"
        write_input(src, args.rows)
        print(f"{args.rows:,} rows x {N_FEATURES} features ({src.stat().st_size / 2**20:.0f} MiB "
              f"Parquet), pool and aggregators fitted and file written in "
              f"{time.perf_counter() - t:.0f} s; chunk_rows={args.chunk_rows:,}, "
              f"{os.cpu_count()} cores\n")
        rows = []
        for agg, model in paths.items():
            runs: dict[str, list] = {m: [] for m in args.methods}
            # Methods alternate within each repeat, so that a busy machine
            # slows them alike; the median run is reported.
            for _ in range(args.repeat):
                for method in args.methods:
                    dst = tmp / f"out-{method.replace(' ', '_')}"
                    dst = dst.with_suffix(".parquet") if method != "score_dask" else dst
                    runs[method].append(run_worker(method, model, str(src), str(dst),
                                                   args.chunk_rows))
            base = None
            for method, rs in runs.items():
                r = sorted(rs, key=lambda x: x["seconds"])[len(rs) // 2]
                r = {**r, "peak_mb": max(x["peak_mb"] for x in rs)}
                if method == "pandas loop":
                    base = r["seconds"]
                rows.append({"aggregator": agg, "method": method, "rows": args.rows, **r})
                each = ", ".join(f"{x['seconds']:.1f}" for x in rs)
                print(f"  {agg:9s} {method:12s} {r['seconds']:7.1f} s  "
                      f"{args.rows / r['seconds']:10,.0f} rows/s  peak {r['peak_mb']:6.0f} MiB"
                      f"  (runs: {each} s)")
            for r in rows:
                if r["aggregator"] == agg and base:
                    r["time / pandas loop"] = r["seconds"] / base
        for n in args.rss_rows:
            big = tmp / f"rows{n}.parquet"
            write_input(big, n)
            for method in ("score_file", "pandas loop"):
                r = run_worker(method, paths["stacking"], str(big), str(tmp / "big.parquet"),
                               args.chunk_rows)
                rows.append({"aggregator": "stacking", "method": method, "rows": n, **r})
                print(f"  stacking  {method:12s} {n:,} rows: {r['seconds']:.1f} s, "
                      f"peak {r['peak_mb']:.0f} MiB")
            big.unlink()
        table = pd.DataFrame(rows)
        table["rows/s"] = table["rows"] / table["seconds"]
        table["in predict_proba"] = table["inside"] / table["seconds"]
        cols = ["aggregator", "method", "rows", "seconds", "rows/s", "peak_mb", "start_mb",
                "time / pandas loop", "in predict_proba"]
        print()
        print(table.reindex(columns=cols).to_string(index=False, float_format=lambda v: f"{v:,.3g}"))


if __name__ == "__main__":
    main()
