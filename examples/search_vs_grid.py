"""HypergradSearchCV next to GridSearchCV: the path the gradient takes, and what a grid cannot search.

A pool of ten classifiers is trained on 40 % of scikit-learn's ``digits`` and
frozen; the searches see the next 30 %; the last 30 % is the test set.

Left: GridSearchCV's 5-fold log-loss over 20 values of one L2 weight shared
by all models (``Stacking(per_model_l2=False)``), and HypergradSearchCV's
outer steps on the same cross-validated loss, which reach the grid's minimum
in a handful of evaluations. Right: with one L2 weight per base model (10
hyperparameters, 20**10 grid points) HypergradSearchCV solves them all
together; the bars are the solved values.

Run: ``python examples/search_vs_grid.py``; the figure goes to
``examples/output/search_vs_grid.png``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import loguniform  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.frozen import FrozenEstimator  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import log_loss  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split  # noqa: E402
from sklearn.naive_bayes import GaussianNB  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

from aggregators import AggregatedClassifier, HypergradSearchCV, Stacking  # noqa: E402

OUT = Path(__file__).resolve().parent / "output"


def pool(X, y, seed=0):
    models = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        "logreg_C0.01": make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000)),
        "nb": GaussianNB(),
        "knn5": make_pipeline(StandardScaler(), KNeighborsClassifier(5)),
        "knn25": make_pipeline(StandardScaler(), KNeighborsClassifier(25)),
        "tree3": DecisionTreeClassifier(max_depth=3, random_state=seed),
        "tree8": DecisionTreeClassifier(max_depth=8, random_state=seed),
        "forest": RandomForestClassifier(50, random_state=seed),
        "forest_shallow": RandomForestClassifier(50, max_depth=4, random_state=seed),
        "nb_smooth": GaussianNB(var_smoothing=1e-2),
    }
    return [(name, FrozenEstimator(m.fit(X, y))) for name, m in models.items()]


def main(seed: int = 0) -> None:
    warnings.simplefilter("ignore")
    X, y = load_digits(return_X_y=True)
    X_pool, X_rest, y_pool, y_rest = train_test_split(
        X, y, train_size=0.4, stratify=y, random_state=seed
    )
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    frozen = pool(X_pool, y_pool, seed)
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    # "fixed": the searches solve the L2 weights alone, as the grid varies them
    # alone, so that the solve's path lies on the grid's curve (by default a
    # search also tunes l2_scale, which the estimator's "tune" would).
    shared = AggregatedClassifier(
        frozen, aggregator=Stacking(per_model_l2=False), hyperparams="fixed", random_state=seed
    )

    t0 = time.perf_counter()
    grid_values = np.logspace(-4, 2, 20)
    grid = GridSearchCV(
        clone(shared).set_params(max_outer_iter=0),
        {"hyperparams": [{"l2": float(v)} for v in grid_values]},
        cv=cv, scoring="neg_log_loss",
    ).fit(X_agg, y_agg)
    t_grid = time.perf_counter() - t0

    t0 = time.perf_counter()
    one = HypergradSearchCV(
        shared, {"aggregator__l2": loguniform(1e-4, 1e2)}, cv=cv, scoring="neg_log_loss"
    ).fit(X_agg, y_agg)
    t_one = time.perf_counter() - t0

    per_model = clone(shared).set_params(aggregator=Stacking())
    t0 = time.perf_counter()
    many = HypergradSearchCV(
        per_model, {"aggregator__l2": loguniform(1e-4, 1e2)}, cv=cv, scoring="neg_log_loss"
    ).fit(X_agg, y_agg)
    t_many = time.perf_counter() - t0

    def test_ll(search):
        est = search.best_estimator_
        return log_loss(y_test, est.predict_proba(X_test), labels=est.classes_)

    print(f"{'search':<38}{'seconds':>9}{'CV log-loss':>13}{'test log-loss':>15}")
    for name, s, t in (
        ("GridSearchCV, 1 shared L2 (20 points)", grid, t_grid),
        ("HypergradSearchCV, 1 shared L2", one, t_one),
        ("HypergradSearchCV, 10 per-model L2", many, t_many),
    ):
        print(f"{name:<38}{t:>9.2f}{-s.best_score_:>13.4f}{test_ll(s):>15.4f}")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.semilogx(grid_values, -grid.cv_results_["mean_test_score"], "o-", color="0.6",
                 label=f"GridSearchCV: 20 points x 5 folds ({t_grid:.1f} s)")
    hist = one.solve_histories_[0]
    ax1.semilogx(hist["l2"], hist["validation_loss"], "o-", color="C3",
                 label=f"HypergradSearchCV: {len(hist)} outer steps ({t_one:.1f} s)")
    for i, (a, b) in enumerate(zip(hist["l2"], hist["validation_loss"])):
        ax1.annotate(str(i), (a, b), textcoords="offset points", xytext=(4, 4), fontsize=8,
                     color="C3")
    ax1.set_yscale("log")
    ax1.set_xlabel("shared L2 weight")
    ax1.set_ylabel("5-fold validation log-loss")
    ax1.set_title("one hyperparameter: the gradient path and the grid")
    ax1.legend(fontsize=8)

    l2 = many.best_params_["aggregator__l2"]
    ax2.barh(list(l2.index), l2.values, color="C0")
    ax2.set_xscale("log")
    ax2.set_xlabel("solved L2 weight (large = model shrunk away)")
    ax2.set_title(f"10 per-model L2 weights solved together ({t_many:.1f} s)")
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    path = OUT / "search_vs_grid.png"
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
