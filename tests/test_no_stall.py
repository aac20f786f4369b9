"""The outer optimiser leaves a start where the validation loss is flat (issue 14, item 3).

With ``shrink_towards="pool"`` a large shared ``l2`` pins the meta-learner to
the pool, so the validation loss is flat there and its hypergradient tiny:
L-BFGS-B's first step (the projected negative gradient) barely moved, the
relative decrease fell below ``tol`` and tuning stopped at its start, 14-25 %
above the best loss over the range.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier

from aggregators import AggregatedClassifier, Stacking


def _fit(pool, X, y, **kw):
    agg = Stacking(l2=30.0, per_model_l2=False, shrink_towards="pool")
    return AggregatedClassifier(
        pool, aggregator=agg, prefit=True, random_state=0, **kw
    ).fit(X, y)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_hyperparameter_reaches_the_grid_minimum_from_a_flat_start(seed):
    X, y = make_classification(
        600, 10, n_informative=6, n_classes=3, class_sep=1.5, random_state=seed
    )
    Xtr, Xa, ytr, ya = train_test_split(X, y, test_size=0.5, random_state=seed, stratify=y)
    pool = [
        ("nb", GaussianNB().fit(Xtr, ytr)),
        ("knn", KNeighborsClassifier(5).fit(Xtr, ytr)),
        ("dt", DecisionTreeClassifier(max_depth=6, random_state=0).fit(Xtr, ytr)),
    ]
    fixed = {"l2_scale": 1e-2}  # one tuned hyperparameter: the shared l2
    est = _fit(pool, Xa, ya, hyperparams=fixed, tune_ranges={"l2": (1e-4, 1e2, "log")})
    # Every hyperparameter fixed: one cross-fitted evaluation at that point.
    grid = [
        _fit(pool, Xa, ya, hyperparams={**fixed, "l2": v}).validation_loss_
        for v in np.logspace(-4, 2, 50)
    ]
    assert est.tuning_history_["l2"].iloc[-1] < 1.0  # it left the flat start at 30
    assert est.validation_loss_ <= 1.001 * min(grid)
