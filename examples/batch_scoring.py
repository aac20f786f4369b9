"""Deploy: fit, save, score a Parquet file, survive an interruption, load on the CPU.

1. trains a pool of four models on a synthetic 3-class task and fits a tuned
   ``stacking`` aggregator over it;
2. saves it with ``aggregators.save`` (a file that loads without running code);
3. writes a Parquet file of ``--rows`` new rows with an ``id`` column;
4. scores it with ``aggregators.score_file`` in chunks, interrupts the run
   halfway, and finishes it with ``resume=True`` (only the missing chunks are
   scored; the output equals an uninterrupted run's);
5. loads the file again with ``device="cpu"``, as a CPU-only machine would,
   and checks the predictions; then shows the equivalent ``hyperagg`` commands.

Run:  python examples/batch_scoring.py [--rows 200000] [--chunk-rows 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import make_classification
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB

from aggregators import AggregatedClassifier, load, save, score_file

FEATURES = [f"x{i}" for i in range(12)]


def task(n, seed):
    X, y = make_classification(n, len(FEATURES), n_informative=8, n_classes=3,
                               random_state=seed)
    return pd.DataFrame(X, columns=FEATURES), y


class Interrupted(Exception):
    """Stands in for a killed job (the tests kill a real process with SIGKILL)."""


def main(rows: int = 200_000, chunk_rows: int = 20_000, folder: str | None = None) -> pd.DataFrame:
    """Run the walk-through in ``folder``, or in a temporary folder removed afterwards."""
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return walk_through(Path(folder), rows, chunk_rows)
    with tempfile.TemporaryDirectory(prefix="hyperagg-deploy-") as tmp:
        return walk_through(Path(tmp), rows, chunk_rows)


def walk_through(folder: Path, rows: int, chunk_rows: int) -> pd.DataFrame:

    # 1. A frozen pool and a tuned aggregator.
    X, y = task(6000, seed=0)
    pool = [
        ("logreg", LogisticRegression(max_iter=1000)),
        ("naive_bayes", GaussianNB()),
        ("forest", RandomForestClassifier(100, max_depth=8, random_state=0)),
        ("boosting", HistGradientBoostingClassifier(max_iter=100, random_state=0)),
    ]
    pool = [(name, FrozenEstimator(m.fit(X[:3000], y[:3000]))) for name, m in pool]
    clf = AggregatedClassifier(pool, aggregator="stacking", random_state=0).fit(X[3000:], y[3000:])

    # 2. Save.
    model = save(clf, folder / "ensemble.hyperagg")
    print(f"saved {model} ({model.stat().st_size / 1024:.0f} KiB)")

    # 3. New rows to score, with an id column.
    new, _ = task(rows, seed=1)
    new.insert(0, "id", np.arange(rows) + 10_000_000)
    src = folder / "rows.parquet"
    new.to_parquet(src, index=False)

    # 4. Score, interrupted after three chunks, then resumed.
    out = folder / "scores.parquet"
    est = load(model)
    predict, calls = est.predict_proba, []

    def fails_after_three_chunks(Xc):
        if len(calls) == 3:
            raise Interrupted
        calls.append(len(Xc))
        return predict(Xc)

    est.predict_proba = fails_after_three_chunks
    try:
        score_file(est, src, out, chunk_rows=chunk_rows, id_column="id", progress=False)
    except Interrupted:
        partial = sorted(p.name for p in (folder / "scores.parquet.partial").glob("chunk-????????.arrow"))
        print(f"interrupted: {len(partial)} chunks done ({partial[0]} ...), "
              f"output exists: {out.exists()}")
    del est.predict_proba
    t0 = time.perf_counter()
    report = score_file(est, src, out, chunk_rows=chunk_rows, id_column="id", resume=True)
    print(f"resumed: {report.chunks_resumed} of {report.chunks} chunks reused, "
          f"{report.rows_scored:,} rows written in {time.perf_counter() - t0:.1f} s")

    whole = folder / "whole.parquet"
    score_file(model, src, whole, chunk_rows=chunk_rows, id_column="id", progress=False)
    scores = pd.read_parquet(out)
    assert scores.equals(pd.read_parquet(whole)), "a resumed run must equal an uninterrupted one"
    print(scores.head())

    # 5. Load where there is no GPU, and compare.
    cpu = load(model, device="cpu")
    head = new.head(1000).set_index("id")[FEATURES]
    diff = np.abs(cpu.predict_proba(head) - scores.filter(like="proba_").head(1000).to_numpy())
    print(f"loaded on the CPU: max difference to the scored file {diff.max():.1e}")

    print("\nThe same from a shell (pass --folder DIR to keep these files):")
    print(f"  hyperagg info {model}")
    print(f"  hyperagg score {model} {src} {out} --id-column id --chunk-rows {chunk_rows}"
          " [--resume] [--on-bad-rows skip]")
    print(f"  hyperagg score {model} rows_folder/ scores_folder/ --scheduler tcp://HOST:8786")
    return scores


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--chunk-rows", type=int, default=20_000)
    ap.add_argument("--folder", help="keep the model and the files here (default: a "
                    "temporary folder, removed at the end)")
    args = ap.parse_args()
    main(args.rows, args.chunk_rows, args.folder)
