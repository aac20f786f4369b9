"""The same fits on the CPU and on CUDA, side by side in one process.

Synthetic binary task of ``bench_choquet_scale.py`` (32 noisy base models
stored as :class:`base_models.PrecomputedModel`, so only the aggregator's
cost is measured), ``AggregatedClassifier(..., cv=None, max_outer_iter=8)``
with ``stacking``, ``weights`` and a 2-additive ``Choquet``; the whole
``fit`` (base outputs to the device once, hypergradient tuning, refit) is
timed, then ``predict_proba`` on all rows. Each configuration runs once
untimed first (CUDA context, kernels). Prints seconds per device and the
CPU / CUDA ratio, and checks that both devices reach the same validation
loss. Without CUDA only the CPU column is filled.

Run: ``python benchmarks/bench_device.py [--rows 100000 1000000]
[--cpu-max-rows 100000]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_choquet_scale import synthetic_pool  # noqa: E402

from aggregators import AggregatedClassifier, Choquet, LearnedWeights, Stacking  # noqa: E402
from base_models import PrecomputedModel  # noqa: E402

AGGREGATORS = {
    "stacking": Stacking,
    "weights": LearnedWeights,
    "choquet k=2": lambda: Choquet(additivity=2),
}


def make(n_rows: int, n_models: int, seed: int):
    y, probs = synthetic_pool(n_rows, n_models, seed)
    X = pd.DataFrame({"row": np.arange(n_rows)})
    pool = [
        (f"m{j:02d}", PrecomputedModel(np.column_stack([1 - probs[:, j], probs[:, j]]),
                                       classes=[0, 1]))
        for j in range(n_models)
    ]
    return X, y, pool


def run(agg_name, X, y, pool, device, seed):
    clf = AggregatedClassifier(
        pool, aggregator=AGGREGATORS[agg_name](), cv=None, max_outer_iter=8,
        tuner_options={"max_iter": 20}, device=device, random_state=seed,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    clf.fit(X, y)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    clf.predict_proba(X)
    return fit_s, time.perf_counter() - t0, clf.validation_loss_, clf.n_iter_


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000])
    ap.add_argument("--models", type=int, default=32)
    ap.add_argument("--cpu-max-rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    has_cuda = torch.cuda.is_available()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{os.cpu_count()} cores, CUDA: "
          f"{torch.cuda.get_device_name(0) if has_cuda else 'none'}", flush=True)
    small = make(2000, args.models, args.seed)
    for device in ["cpu"] + (["cuda"] if has_cuda else []):
        for name in AGGREGATORS:
            run(name, *small, device, args.seed)  # warm-up
    rows = []
    for n in args.rows:
        X, y, pool = make(n, args.models, args.seed)
        for name in AGGREGATORS:
            row = {"rows": n, "aggregator": name}
            for device in ("cpu", "cuda"):
                if (device == "cuda" and not has_cuda) or (device == "cpu" and n > args.cpu_max_rows):
                    continue
                fit_s, pred_s, val, n_iter = run(name, X, y, pool, device, args.seed)
                row.update({f"{device} fit s": fit_s, f"{device} predict s": pred_s,
                            f"{device} val loss": val, f"{device} outer evals": n_iter})
            if "cpu fit s" in row and "cuda fit s" in row:
                row["fit cpu/cuda"] = row["cpu fit s"] / row["cuda fit s"]
            rows.append(row)
            print(row, flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 220, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


if __name__ == "__main__":
    main()
