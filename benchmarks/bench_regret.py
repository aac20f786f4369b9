"""Regret of each aggregator against the best single model and greedy selection.

Over bundled and generated datasets x seeds, a 40 / 30 / 30 split (pool /
aggregation / test rows) and a frozen pool of six diverse models trained on
the pool rows, each aggregator is fitted on the aggregation rows at its
defaults and scored on the test rows (log-loss; mean squared error for
regression). Printed per dataset, as means over the seeds:

* the **regret** of each method's test loss, relative to the best single
  model chosen on the aggregation rows (``vs single``, in %) and to Caruana's
  greedy selection, 50 rounds (``vs greedy``, in %): positive is worse;
* how well the loss each choice is made on predicts the test loss, across
  the candidates of ``aggregator="auto"``: the tuned validation loss
  (``validation_loss_``; for the untuned greedy / single model, their loss
  on the aggregation rows) and auto's out-of-fold estimate
  (``candidates_["estimate"]``): Spearman correlation with the test losses
  and mean (estimate - test) error;
* ``auto`` as fitted, next to other rules applied to the same fits: the
  lowest tuned validation loss (``by val. loss``), the lowest estimate
  (``argmin``), the first candidate in auto's order within 0.5, 1 or 2
  standard errors of the lowest estimate (auto uses ``N_STANDARD_ERRORS``), and
  ``1 se`` with greedy selection before the single model; and auto's fit
  time over stacking's. The estimate is auto's (``candidates_["estimate"]``:
  held-out losses charged for the errors the rows cannot show); a candidate
  raced out after a fold has no standard error and is never picked.

Hyperparameters tuned: ``weights`` 3 (few), ``stacking`` one per model plus
one (many), ``choquet`` 3; the single model and greedy selection none.

Run: ``python benchmarks/bench_regret.py [--seeds 0 1 2 3 4] [--datasets ...]
[--out regret.csv]``; ``--from regret.csv`` re-summarises saved rows;
``--reuse regret.csv --outer-steps 1 --out other.csv`` refits only ``auto``
(with another protocol) next to the candidates' saved fits; ``--fold-steps
choquet=2`` sets one candidate's fold steps (``--fold-steps`` alone: every
candidate at ``--outer-steps``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn import datasets
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import Ridge
from sklearn.metrics import log_loss, mean_squared_error
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVR
from sklearn.tree import DecisionTreeRegressor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_sklearn import pretrained_pool  # noqa: E402

from aggregators import AggregatedClassifier, AggregatedRegressor, GreedySelection  # noqa: E402
from aggregators import auto as auto_module  # noqa: E402
from aggregators.auto import CANDIDATES  # noqa: E402

GREEDY_FIRST = ["greedy", "single", "weights", "stacking", "choquet"]
CLASSIFICATION = ["breast_cancer", "wine", "iris", "digits", "synthetic"]
REGRESSION = ["diabetes", "friedman1"]
#: The candidates of "auto", fitted on their own (same names as ``candidates_``).
METHODS = {
    "greedy": lambda: GreedySelection(n_rounds=50),
    "single": lambda: GreedySelection(n_rounds=1),
    "weights": lambda: "weights",
    "stacking": lambda: "stacking",
    "choquet": lambda: "choquet",
}


def load(name: str, seed: int):
    if name == "synthetic":
        return datasets.make_classification(
            n_samples=1500, n_features=20, n_informative=10, n_redundant=4, n_classes=5,
            n_clusters_per_class=2, flip_y=0.05, random_state=seed,
        )
    if name == "friedman1":
        return datasets.make_friedman1(1500, noise=1.0, random_state=seed)
    return getattr(datasets, f"load_{name}")(return_X_y=True)


def pool(task: str, X, y, seed: int) -> dict:
    """Six diverse models, trained on the pool rows (then frozen by the caller):
    for classification ``bench_vs_sklearn.py``'s pool."""
    if task == "cls":
        return pretrained_pool(X, y, seed)
    models = {
        "ridge": make_pipeline(StandardScaler(), Ridge()),
        "knn": make_pipeline(StandardScaler(), KNeighborsRegressor(10)),
        "tree": DecisionTreeRegressor(max_depth=5, random_state=seed),
        "forest": RandomForestRegressor(100, random_state=seed),
        "gb": GradientBoostingRegressor(random_state=seed),
        "svr": make_pipeline(StandardScaler(), SVR()),
    }
    return {name: m.fit(X, y) for name, m in models.items()}


def run(name: str, seed: int, reuse: list[dict] | None = None) -> list[dict]:
    task = "reg" if name in REGRESSION else "cls"
    X, y = load(name, seed)
    strat = y if task == "cls" else None
    X_pool, X_rest, y_pool, y_rest = train_test_split(
        X, y, train_size=0.4, stratify=strat, random_state=seed)
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest if task == "cls" else None,
        random_state=seed)
    frozen = [(k, FrozenEstimator(m)) for k, m in pool(task, X_pool, y_pool, seed).items()]
    Est = AggregatedClassifier if task == "cls" else AggregatedRegressor

    def test_loss(est):
        if task == "cls":
            return log_loss(y_test, est.predict_proba(X_test), labels=est.classes_)
        return mean_squared_error(y_test, est.predict(X_test))

    def fit(agg):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            est = Est(frozen, aggregator=agg, random_state=seed).fit(X_agg, y_agg)
            return est, time.perf_counter() - t0

    rows = []
    base = dict(dataset=name, seed=seed, n_agg=len(y_agg))
    if reuse is not None:  # the candidates' own fits from an earlier run
        rows = [r for r in reuse if r["dataset"] == name and r["seed"] == seed
                and r["method"] in METHODS]
    for method, make in METHODS.items():
        if reuse is not None:
            break
        est, sec = fit(make())
        val = est.validation_loss_
        if not np.isfinite(val):  # nothing tuned: its loss on the aggregation rows
            if task == "cls":
                val = log_loss(y_agg, est.predict_proba(X_agg), labels=est.classes_)
            else:  # in the standardised units validation_loss_ has
                val = mean_squared_error(y_agg, est.predict(X_agg)) / est.y_scale_**2
        rows.append({**base, "method": method, "seconds": sec, "test": test_loss(est),
                     "val_loss": val})
    est, sec = fit("auto")
    cand = est.candidates_
    scale = 1.0 if task == "cls" else float(est.y_scale_) ** 2
    for method in cand.index:
        r = next(r for r in rows if r["method"] == method)
        r["estimate"] = cand.loc[method, "estimate"]
        r["se_diff"] = cand.loc[method, "se_diff"]
        r["held_out_loss"] = cand.loc[method, "held_out_loss"]
        r["folds"] = cand.loc[method, "folds"]
        r["test_std"] = r["test"] / scale  # standardised units, as the estimates
    rows.append({**base, "method": "auto", "seconds": sec, "test": test_loss(est),
                 "chosen": str(cand.index[cand["chosen"]][0]),
                 "n_outer": auto_module.N_OUTER, "outer_steps": auto_module.OUTER_STEPS,
                 "fold_steps": str(auto_module.FOLD_OUTER_STEPS),
                 "n_se": auto_module.N_STANDARD_ERRORS,
                 "race_se": auto_module.RACE_STANDARD_ERRORS,
                 "race_dominated_se": auto_module.RACE_DOMINATED_STANDARD_ERRORS})
    return rows


def choice(group: pd.DataFrame, rule: str, n_se: float = 1.0, order=None) -> str:
    """The candidate a rule picks: ``"val"``, the lowest tuned validation loss;
    ``"argmin"``, the lowest estimate; ``"se"``, the first in ``order`` (auto's
    by default) within ``n_se`` standard errors of the lowest estimate."""
    cands = group[group["method"].isin(METHODS)].set_index("method")
    order = [name for name, _ in CANDIDATES] if order is None else order
    cands = cands.loc[[m for m in order if m in cands.index]]
    if rule != "val" and "folds" in cands and cands["folds"].notna().all():
        cands = cands[cands["folds"] == cands["folds"].max()]  # not the raced-out ones
    if rule == "val":
        return str(cands["val_loss"].idxmin())
    L = cands["estimate"].to_numpy()
    gap = L - L.min()
    se = cands["se_diff"].to_numpy()
    ok = gap <= (n_se * np.nan_to_num(se, nan=-np.inf) if rule == "se" else 0.0) + 1e-15
    return str(cands.index[np.flatnonzero(ok)[0]])


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (name, seed), g in df.groupby(["dataset", "seed"], sort=False):
        t = g.set_index("method")["test"]
        rules = {"by val. loss": choice(g, "val"), "argmin": choice(g, "argmin"),
                 "0.5 se": choice(g, "se", 0.5), "1 se": choice(g, "se", 1.0),
                 "2 se": choice(g, "se", 2.0),
                 "1 se, greedy first": choice(g, "se", 1.0, GREEDY_FIRST)}
        tests = {**t.to_dict(), **{k: t[v] for k, v in rules.items()}}
        cands = g[g["method"].isin(METHODS)]
        row = {"dataset": name, "seed": seed}
        for m, v in tests.items():
            row[f"{m}|vs single"] = 100 * (v / t["single"] - 1)
            row[f"{m}|vs greedy"] = 100 * (v / t["greedy"] - 1)
            row[f"{m}|test"] = v
        row["rho val"] = spearmanr(cands["val_loss"], cands["test"]).statistic
        row["rho est"] = spearmanr(cands["estimate"], cands["test_std"]).statistic
        row["err val"] = float(np.mean(cands["val_loss"] - cands["test_std"]))
        row["err est"] = float(np.mean(cands["estimate"] - cands["test_std"]))
        row["auto/stacking time"] = t.get("auto") and (
            g.set_index("method").loc["auto", "seconds"]
            / g.set_index("method").loc["stacking", "seconds"])
        row["auto chose"] = g.set_index("method").loc["auto", "chosen"]
        out.append(row)
    return pd.DataFrame(out)


def report(df: pd.DataFrame) -> None:
    s = summarise(df)
    pd.set_option("display.width", 250, "display.max_columns", 40, "display.precision", 4)
    methods = [*METHODS, "auto", "by val. loss", "argmin", "0.5 se", "1 se", "2 se",
               "1 se, greedy first"]
    for ref in ("vs single", "vs greedy"):
        tab = s.groupby("dataset", sort=False)[[f"{m}|{ref}" for m in methods]].mean()
        tab.columns = methods
        tab.loc["MEAN"] = tab.mean()
        print(f"\nmean regret of the test loss {ref} (%; over seeds; positive = worse)")
        print(tab.round(2).to_string())
    tab = s.groupby("dataset", sort=False)[[f"{m}|test" for m in methods]].mean()
    tab.columns = methods
    print("\nmean test loss (log-loss; MSE for regression)")
    print(tab.round(4).to_string())
    by = s.groupby("dataset", sort=False)
    est = by[["rho val", "rho est", "err val", "err est"]].mean()
    est["auto/stacking time"] = by["auto/stacking time"].median()
    est.loc["MEAN"] = est.mean()
    print("\nhow the choosing losses predict the test loss across candidates "
          "(Spearman rho and estimate - test, means over seeds); auto's fit time over "
          "stacking's (median over seeds)")
    print(est.round(3).to_string())
    print("\nauto's choices:", s.groupby("dataset", sort=False)["auto chose"].agg(list).to_dict())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--datasets", nargs="+", default=CLASSIFICATION + REGRESSION)
    parser.add_argument("--out", default=None, help="CSV of the raw rows")
    parser.add_argument("--from", dest="src", default=None, help="summarise a saved CSV")
    parser.add_argument("--reuse", default=None,
                        help="CSV of an earlier run: fit only auto, take the candidates' "
                             "own fits (deterministic) from it")
    parser.add_argument("--outer-steps", type=int, default=None,
                        help="set aggregators.auto.OUTER_STEPS (to measure the trade-off)")
    parser.add_argument("--fold-steps", nargs="*", default=None, metavar="NAME=K",
                        help="set aggregators.auto.FOLD_OUTER_STEPS (none given: empty)")
    parser.add_argument("--n-outer", type=int, default=None,
                        help="set aggregators.auto.N_OUTER")
    parser.add_argument("--race-se", type=float, default=None,
                        help="set aggregators.auto.RACE_STANDARD_ERRORS (inf: no racing)")
    parser.add_argument("--race-dominated-se", type=float, default=None,
                        help="set aggregators.auto.RACE_DOMINATED_STANDARD_ERRORS (inf: off)")
    args = parser.parse_args(argv)
    if args.src:
        report(pd.read_csv(args.src))
        return
    if args.outer_steps is not None:
        auto_module.OUTER_STEPS = args.outer_steps
    if args.fold_steps is not None:
        auto_module.FOLD_OUTER_STEPS = {
            k: int(v) for k, v in (item.split("=") for item in args.fold_steps)}
    if args.n_outer is not None:
        auto_module.N_OUTER = args.n_outer
    if args.race_se is not None:
        auto_module.RACE_STANDARD_ERRORS = args.race_se
    if args.race_dominated_se is not None:
        auto_module.RACE_DOMINATED_STANDARD_ERRORS = args.race_dominated_se
    reuse = None if args.reuse is None else pd.read_csv(args.reuse).to_dict("records")
    torch_threads()
    rows = []
    for name in args.datasets:
        for seed in args.seeds:
            rows += run(name, seed, reuse)
            last = [r for r in rows if r["dataset"] == name and r["seed"] == seed]
            print(f"{name} seed {seed}: " + "  ".join(
                f"{r['method']} {r['test']:.4f} ({r['seconds']:.1f}s)" for r in last)
                + f"  auto chose {last[-1]['chosen']}", flush=True)
            if args.out:
                pd.DataFrame(rows).to_csv(args.out, index=False)
    report(pd.DataFrame(rows))


def torch_threads() -> None:
    """One thread: the machine is shared, and the problems are small."""
    import torch

    torch.set_num_threads(1)


if __name__ == "__main__":
    main()
