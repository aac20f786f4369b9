"""Quickstart: combine a pool of pretrained classifiers with tuned aggregators.

Trains a small pool on 40 % of a bundled scikit-learn dataset, freezes it,
fits hyperagg's aggregators on the next 30 % (their hyperparameters tuned by
validation-loss hypergradients inside ``fit``), and compares them on the last
30 % with the best single model, the uniform average and scikit-learn's
``StackingClassifier``. Saves a plot of the tuning trajectory.

Run:  python examples/quickstart.py [--dataset breast_cancer|wine|digits]
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


def main(dataset: str = "breast_cancer", seed: int = 0) -> pd.DataFrame:
    X, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
    X_pool, X_rest, y_pool, y_rest = train_test_split(
        X, y, train_size=0.4, stratify=y, random_state=seed
    )
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    pool = pretrained_pool(X_pool, y_pool, seed)
    frozen = [(name, FrozenEstimator(m)) for name, m in pool.items()]

    rows = []

    def report(name, proba, seconds):
        rows.append(
            {
                "method": name,
                "test_log_loss": log_loss(y_test, proba, labels=np.unique(y)),
                "test_accuracy": accuracy_score(y_test, np.unique(y)[proba.argmax(1)]),
                "fit_seconds": seconds,
            }
        )

    # Best single model, chosen on the aggregation rows (never on the test rows).
    agg_losses = {n: log_loss(y_agg, m.predict_proba(X_agg)) for n, m in pool.items()}
    best = min(agg_losses, key=agg_losses.get)
    report(f"best single ({best})", pool[best].predict_proba(X_test), 0.0)
    report(
        "uniform average",
        np.mean([m.predict_proba(X_test) for m in pool.values()], axis=0),
        0.0,
    )
    t0 = time.perf_counter()
    sk = StackingClassifier(frozen, cv=5).fit(X_agg, y_agg)
    report("sklearn StackingClassifier", sk.predict_proba(X_test), time.perf_counter() - t0)

    fitted = {}
    for agg in sorted(available_aggregators()):
        t0 = time.perf_counter()
        est = AggregatedClassifier(frozen, aggregator=agg, random_state=seed)
        est.fit(X_agg, y_agg)
        report(f"hyperagg {agg}", est.predict_proba(X_test), time.perf_counter() - t0)
        fitted[agg] = est

    table = pd.DataFrame(rows).set_index("method")
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 120):
        print(f"\n{dataset}: pool trained on {len(X_pool)} rows, aggregators fitted on "
              f"{len(X_agg)}, tested on {len(X_test)}\n")
        print(table)
        for agg in ("stacking", "weights"):
            if agg in fitted:
                print(f"\ntuned hyperparameters of hyperagg {agg}:")
                for k, v in fitted[agg].hyperparams_.items():
                    print(f"  {k}: {v.round(5).to_dict() if hasattr(v, 'to_dict') else round(v, 5)}")
        if "weights" in fitted:
            print("\nlearned weights:")
            print(fitted["weights"].aggregator_.weights_.round(3).to_string())

    plot_tuning(fitted, OUT / f"quickstart_tuning_{dataset}.png")
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
        axes[1, j].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nsaved the tuning trajectory to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="breast_cancer",
                        choices=["breast_cancer", "wine", "digits", "iris"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.dataset, args.seed)
