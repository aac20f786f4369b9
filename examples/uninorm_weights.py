"""How much each base model counts, and where "no opinion" lies: a Uninorm aggregator.

Trains a pool of five classifiers on 40 % of a bundled scikit-learn dataset,
freezes it, fits a learnable weighted uninorm (Melnikov & Hüllermeier 2016)
on the next 30 % (hyperparameters tuned by hypergradient) and reports, on the
last 30 %, its log-loss beside the uniform average. Then it reads the fitted
aggregator: the neutral element ``e`` (a model that outputs ``e`` has no
effect; agreeing models above ``e`` reinforce each other, below ``e`` they
weaken each other) and the per-model weights ``w_i`` in
``logit U = logit e + sum_i w_i (logit x_i - logit e)``, saved as a bar chart
in ``examples/output/``.

Run:  python examples/uninorm_weights.py [--dataset breast_cancer|wine|digits]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import datasets  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.frozen import FrozenEstimator  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, log_loss  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.naive_bayes import GaussianNB  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

from aggregators import AggregatedClassifier  # noqa: E402
from aggregators.uninorm import Uninorm  # noqa: E402

OUT = Path(__file__).resolve().parent / "output"


def pretrained_pool(X, y, seed=0):
    pool = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "naive_bayes": GaussianNB(),
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(15)),
        "tree": DecisionTreeClassifier(max_depth=4, random_state=seed),
        "forest": RandomForestClassifier(100, max_depth=6, random_state=seed),
    }
    return {name: model.fit(X, y) for name, model in pool.items()}


def main(dataset: str = "breast_cancer", seed: int = 0):
    X, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
    X_pool, X_rest, y_pool, y_rest = train_test_split(
        X, y, train_size=0.4, stratify=y, random_state=seed
    )
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    pool = pretrained_pool(X_pool, y_pool, seed)
    frozen = [(name, FrozenEstimator(model)) for name, model in pool.items()]

    clf = AggregatedClassifier(frozen, aggregator=Uninorm(), random_state=seed)
    clf.fit(X_agg, y_agg)
    proba = clf.predict_proba(X_test)
    uniform = np.mean([m.predict_proba(X_test) for m in pool.values()], axis=0)

    agg = clf.aggregator_
    weights, e = agg.weights_, agg.neutral_element_
    print(f"dataset: {dataset}  (pool on {len(X_pool)} rows, aggregator on "
          f"{len(X_agg)}, test on {len(X_test)})")
    print(f"test log-loss  uninorm {log_loss(y_test, proba):.4f}   "
          f"uniform average {log_loss(y_test, uniform):.4f}")
    print(f"test accuracy  uninorm {accuracy_score(y_test, clf.predict(X_test)):.4f}   "
          f"uniform average {accuracy_score(y_test, clf.classes_[uniform.argmax(1)]):.4f}")
    print("tuned hyperparameters:", {k: round(float(v), 5) for k, v in clf.hyperparams_.items()})
    # The weights act on log-odds of inputs shrunk towards 1/2 by s, so a large
    # s is compensated by larger weights: read the sum with s beside it.
    print(f"neutral element e = {e:.4f}; sum of weights = {weights.sum():.3f} "
          f"({'reinforcing' if weights.sum() > 1 else 'averaging / tempering'}); "
          f"input shrink s = {clf.hyperparams_['shrink']:.3g}")
    print(weights.round(4).to_string())

    OUT.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    order = weights.sort_values(ascending=False)
    bars = ax.bar(order.index, order.to_numpy(), color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", padding=2)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.text(len(order) - 0.5, 1.0, " w = 1 (uninorm)", va="bottom", ha="right",
            color="grey", fontsize=9)
    ax.set_ylabel("weight $w_i$")
    ax.set_ylim(0, max(1.15, order.max() * 1.18))
    ax.set_title(f"Uninorm aggregator on {dataset}: learned weights per base model")
    ax.text(
        0.98, 0.95,
        f"neutral element e = {e:.3f}\n"
        f"sum of weights = {weights.sum():.2f}\n"
        f"input shrink s = {clf.hyperparams_['shrink']:.3g}\n"
        f"test log-loss {log_loss(y_test, proba):.3f} (uniform avg {log_loss(y_test, uniform):.3f})",
        transform=ax.transAxes, ha="right", va="top", fontsize=9,
        bbox=dict(boxstyle="round", fc="white", ec="0.7"),
    )
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    path = OUT / f"uninorm_weights_{dataset}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")
    return clf


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="breast_cancer",
                        choices=["breast_cancer", "wine", "digits", "iris"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.dataset, args.seed)
