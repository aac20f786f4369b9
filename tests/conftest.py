"""Shared fixtures: a pretrained pool on breast_cancer, the 40/30/30 protocol.

The pool is trained once per test session on 40 % of the rows and then only
used frozen; aggregators see the next 30 % and are judged on the last 30 %
(the benchmark's protocol, ``benchmarks/bench_vs_sklearn.py``).
"""

from __future__ import annotations

import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils import Bunch


@pytest.fixture(scope="session")
def cancer_pool():
    """Five classifiers pretrained on 40 % of breast_cancer, and the other rows.

    Returns
    -------
    Bunch
        ``pool`` (name -> fitted estimator), ``X_agg, y_agg`` (30 %, what the
        aggregators are fitted on), ``X_test, y_test`` (30 %).
    """
    X, y = load_breast_cancer(return_X_y=True)
    X_pool, X_rest, y_pool, y_rest = train_test_split(
        X, y, train_size=0.4, stratify=y, random_state=0
    )
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0
    )
    pool = {
        "lr": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "nb": GaussianNB(),
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(15)),
        "tree": DecisionTreeClassifier(max_depth=4, random_state=0),
        "forest": RandomForestClassifier(50, max_depth=5, random_state=0),
    }
    for model in pool.values():
        model.fit(X_pool, y_pool)
    return Bunch(pool=pool, X_agg=X_agg, y_agg=y_agg, X_test=X_test, y_test=y_test)


@pytest.fixture
def frozen_pool(cancer_pool):
    """``[(name, FrozenEstimator(model))]``: survives ``clone`` without refitting."""
    return [(name, FrozenEstimator(m)) for name, m in cancer_pool.pool.items()]
