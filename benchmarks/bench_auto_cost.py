"""Where ``aggregator="auto"``'s fit time goes, next to ``stacking`` alone (issue 14).

On ``bench_vs_sklearn``'s datasets, splits and frozen pools (one thread, as
``bench_overhead.py``), for each seed: the default estimator's fit and
``stacking``'s, alternated, and the time of every candidate fit inside
auto's (``fold``: on an outer fold's training rows; ``final``: the winner on
all rows), per candidate, as a count and a mean per auto fit. The header
prints the load average: timings compare only within one run.

Run: ``python benchmarks/bench_auto_cost.py breast_cancer diabetes --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead as O  # noqa: E402

import aggregators.auto as A  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="+", choices=sorted(O.B.TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    log: list = []
    inner = A._fit_on_outputs

    def timed(params, agg, pool, X, y, y_model, rows, **kw):
        t0 = time.perf_counter()
        try:
            return inner(params, agg, pool, X, y, y_model, rows, **kw)
        finally:
            name = type(agg).__name__ + str(getattr(agg, "n_rounds", ""))
            kind = "final" if len(rows) == len(pool.outputs) else "fold"
            log.append((name, kind, time.perf_counter() - t0))

    A._fit_on_outputs = timed
    print("load average", os.getloadavg(), flush=True)
    with threadpool_limits(1):
        for name in args.datasets:
            runs = O.setups(name, args.seeds)
            auto = [O.fitter("default", s) for s in runs]
            stack = [O.fitter("stacking", s) for s in runs]
            auto[0](), stack[0]()  # first-call costs, untimed
            t_auto, t_stack, parts = [], [], {}
            for r in range(args.repeats):
                for i, s in enumerate(runs):
                    log.clear()
                    t0 = time.perf_counter()
                    est = auto[i]()
                    t_auto.append(time.perf_counter() - t0)
                    for key, kind, sec in log:
                        parts.setdefault((key, kind), []).append(sec)
                    if r == 0:
                        c = est.candidates_
                        print(f"{name} seed {s['seed']}: chosen {c.index[c.chosen][0]}, "
                              f"folds {c.folds.to_dict()}", flush=True)
                    t0 = time.perf_counter()
                    stack[i]()
                    t_stack.append(time.perf_counter() - t0)
            a, b = statistics.median(t_auto), statistics.median(t_stack)
            print(f"{name}: default {a:.3f} s, stacking {b:.3f} s, {a / b:.1f}x "
                  f"(medians of {len(t_auto)} fits)")
            for (key, kind), sec in sorted(parts.items(), key=lambda kv: -sum(kv[1])):
                print(f"    {key:20s} {kind:5s} {len(sec) / len(t_auto):4.1f} fits "
                      f"x {1e3 * np.mean(sec):7.1f} ms = {1e3 * sum(sec) / len(t_auto):7.1f} "
                      "ms per auto fit", flush=True)


if __name__ == "__main__":
    main()
