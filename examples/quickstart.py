"""Quickstart: combine a pool of pretrained classifiers with tuned aggregators.

Trains a small pool on 40 % of a bundled scikit-learn dataset, freezes it,
fits hyperagg's aggregators on the next 30 % (their hyperparameters tuned by
validation-loss hypergradients inside ``fit``), and compares them on the last
30 % with the best single model, the uniform average and scikit-learn's
``StackingClassifier``. One split of a few hundred rows misleads (which
method wins changes from split to split), so this is repeated over 5 random
splits and the table gives each method's mean test log-loss with its
standard deviation. The default estimator, ``AggregatedClassifier(pool)``
with no ``aggregator`` argument, is marked. Saves plots of the tuning
trajectory of the first split and of how the default chose there.

Run:  python examples/quickstart.py [--dataset breast_cancer|wine|digits|iris] [--splits 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn import datasets  # noqa: E402
from sklearn.ensemble import RandomForestClassifier, StackingClassifier  # noqa: E402
from sklearn.frozen import FrozenEstimator  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, log_loss  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.naive_bayes import GaussianNB  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

from aggregators import AggregatedClassifier, available_aggregators  # noqa: E402

OUT = Path(__file__).resolve().parent / "output"
#: Named aggregators in the table besides the default; ``--aggregators`` adds
#: others (``select``, ``moe``, ``sugeno``, ``uninorm``, ``laf``), left out
#: by default to keep five splits within about a minute and a half.
SHOWN = ("stacking", "weights", "choquet")
DEFAULT = "hyperagg default"


def pretrained_pool(X, y, seed=0):
    """Five diverse models, trained once and then frozen."""
    pool = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "naive_bayes": GaussianNB(),
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(15)),
        "tree": DecisionTreeClassifier(max_depth=4, random_state=seed),
        "forest": RandomForestClassifier(100, max_depth=6, random_state=seed),
    }
    return {name: model.fit(X, y) for name, model in pool.items()}


def one_split(X, y, seed: int, shown=SHOWN) -> tuple[list[dict], dict]:
    """Every method on one 40 / 30 / 30 split; returns its rows and the fits."""
    X_pool, X_rest, y_pool, y_rest = train_test_split(
        X, y, train_size=0.4, stratify=y, random_state=seed
    )
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    classes = np.unique(y)
    pool = pretrained_pool(X_pool, y_pool, seed)
    frozen = [(name, FrozenEstimator(m)) for name, m in pool.items()]
    rows = []

    def report(name, proba, seconds):
        rows.append({
            "split": seed,
            "method": name,
            "test_log_loss": log_loss(y_test, proba, labels=classes),
            "test_accuracy": accuracy_score(y_test, classes[proba.argmax(1)]),
            "fit_seconds": seconds,
        })

    # Best single model, chosen on the aggregation rows (never on the test rows).
    agg_losses = {n: log_loss(y_agg, m.predict_proba(X_agg), labels=classes)
                  for n, m in pool.items()}
    best = min(agg_losses, key=agg_losses.get)
    report("best single model", pool[best].predict_proba(X_test), 0.0)
    report("uniform average",
           np.mean([m.predict_proba(X_test) for m in pool.values()], axis=0), 0.0)
    t0 = time.perf_counter()
    sk = StackingClassifier(frozen, cv="prefit").fit(X_agg, y_agg)
    report("sklearn StackingClassifier", sk.predict_proba(X_test), time.perf_counter() - t0)

    fitted = {}
    names = [None] + [a for a in shown if a in available_aggregators()]
    for agg in names:
        # No aggregator argument: the library's default.
        params = {} if agg is None else {"aggregator": agg}
        t0 = time.perf_counter()
        est = AggregatedClassifier(frozen, random_state=seed, **params).fit(X_agg, y_agg)
        seconds = time.perf_counter() - t0
        report(DEFAULT if agg is None else f"hyperagg {agg}", est.predict_proba(X_test), seconds)
        fitted["default" if agg is None else agg] = est
    fitted["sizes"] = (len(y_pool), len(y_agg), len(y_test))
    return rows, fitted


def main(
    dataset: str = "breast_cancer", splits: int = 5, seed: int = 0, shown=SHOWN
) -> pd.DataFrame:
    start = time.perf_counter()
    X, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
    rows, first, chosen = [], None, []
    for s in range(seed, seed + splits):
        split_rows, fitted = one_split(X, y, s, shown)
        rows += split_rows
        # candidates_ names the best single model "single" (greedy selection of one round).
        cands = fitted["default"].candidates_
        chosen.append(str(cands.index[cands["chosen"]][0]))
        first = first or fitted
    runs = pd.DataFrame(rows)
    table = runs.groupby("method", sort=False).agg(
        log_loss_mean=("test_log_loss", "mean"),
        log_loss_std=("test_log_loss", "std"),
        accuracy_mean=("test_accuracy", "mean"),
        fit_seconds_mean=("fit_seconds", "mean"),
    )
    table.index = [f"{m}  <- the default" if m == DEFAULT else m for m in table.index]
    n_pool, n_agg, n_test = first["sizes"]
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 160,
                           "display.max_columns", None):
        print(f"\n{dataset}: {splits} random splits; each trains the pool on {n_pool} rows, "
              f"fits the aggregators on {n_agg} and tests on the other {n_test}. Test "
              f"log-loss: mean and standard deviation over the splits.\n")
        print(table)
        print(f"\nthe default chose per split: {', '.join(chosen)}")
        for agg in ("stacking", "weights"):
            if agg in first:
                print(f"\ntuned hyperparameters of hyperagg {agg} (split {seed}):")
                for k, v in first[agg].hyperparams_.items():
                    shown_v = v.round(5).to_dict() if hasattr(v, "to_dict") else round(v, 5)
                    print(f"  {k}: {shown_v}")
        if "weights" in first:
            print(f"\nlearned weights (split {seed}):")
            print(first["weights"].aggregator_.weights_.round(3).to_string())

    plot_tuning(first, OUT / f"quickstart_tuning_{dataset}.png")
    plot_choice(first["default"], OUT / f"quickstart_choice_{dataset}.png", seed)
    print(f"\ntotal run time {time.perf_counter() - start:.1f} s")
    return table


def plot_tuning(fitted: dict, path: Path) -> None:
    """Validation loss and hyperparameters along the outer iterations."""
    shown = [a for a in ("stacking", "weights") if a in fitted]
    fig, axes = plt.subplots(2, len(shown), figsize=(5.5 * len(shown), 7), squeeze=False)
    for j, agg in enumerate(shown):
        hist = fitted[agg].tuning_history_
        axes[0, j].plot(hist["step"], hist["validation_loss"], marker="o")
        axes[0, j].set_title(f"{agg}: cross-fitted validation log-loss")
        axes[0, j].set_xlabel("outer step")
        hp_cols = [c for c in hist.columns if c not in
                   ("step", "validation_loss", "hypergrad_norm", "inner_iter", "seconds")]
        for col in hp_cols:
            axes[1, j].plot(hist["step"], hist[col], marker=".", label=col)
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("outer step")
        axes[1, j].set_title(f"{agg}: hyperparameters")
        if hp_cols:
            axes[1, j].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nsaved the tuning trajectory to {path}")


def plot_choice(default, path: Path, split: int) -> None:
    """How the default chose: each candidate's held-out estimate, the margin
    within which the simplest candidate is kept, and the winner."""
    cands = default.candidates_
    n_se = cands.attrs["n_se"]
    raced = cands["folds"] == cands["folds"].max()
    best = cands.loc[raced, "estimate"].min()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    y = np.arange(len(cands))[::-1]
    colors = ["tab:green" if c else ("tab:blue" if r else "lightgray")
              for c, r in zip(cands["chosen"], raced)]
    ax.barh(y, cands["estimate"], color=colors)
    # A candidate is within the margin when its estimate minus n_se standard
    # errors (of its difference to the best) reaches the best's estimate.
    margin = n_se * cands.loc[raced, "se_diff"].fillna(0.0).to_numpy()
    ax.errorbar(cands.loc[raced, "estimate"], y[raced.to_numpy()],
                xerr=[margin, np.zeros_like(margin)], fmt="none", ecolor="black", capsize=3)
    ax.axvline(best, color="black", lw=0.8, ls="--")
    n_folds = cands["folds"].max()
    ax.set_yticks(y, [f"{name} ({f}/{n_folds} folds)"
                      for name, f in zip(cands.index, cands["folds"])])
    ax.set_xlabel(f"held-out log-loss, charged for unseen errors\n(whiskers: {n_se:g} standard "
                  "errors of the difference to the lowest, dashed)")
    ax.set_title(f"aggregator='auto', split {split}: the simplest candidate whose whisker\n"
                 "reaches the lowest is kept (green; gray: dropped by the race)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved the default's choice to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="breast_cancer",
                        choices=["breast_cancer", "wine", "digits", "iris"])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first split")
    parser.add_argument("--aggregators", nargs="+", default=list(SHOWN),
                        help=f"named aggregators shown besides the default (default: "
                             f"{' '.join(SHOWN)}; choose from {sorted(available_aggregators())})")
    args = parser.parse_args()
    if args.splits < 1:
        parser.error(f"--splits must be at least 1; got {args.splits}")
    unknown = sorted(set(args.aggregators) - set(available_aggregators()))
    if unknown:
        parser.error(f"unknown aggregator(s) {unknown}; choose from "
                     f"{sorted(available_aggregators())}")
    main(args.dataset, args.splits, args.seed, tuple(args.aggregators))
