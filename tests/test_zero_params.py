"""An aggregation function with hyperparameters but no inner parameters.

Nothing is solved on the inner split: the tuner follows the validation loss's
direct derivative. This used to fail inside the fold batching and the Newton
set-up, which differentiate the (parameter-free) inner loss.
"""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.naive_bayes import GaussianNB

from aggregators import AggregatedClassifier
from aggregators._base import Aggregator, Hyperparameter


class TemperedMean(Aggregator):
    """The models' mean probability sharpened or flattened by a temperature."""

    short_name = "tempered_mean"

    def __init__(self, temperature=1.0):
        self.temperature = temperature

    def hyperparameters(self, ctx):
        return [Hyperparameter("temperature", self.temperature, 0.05, 20.0)]

    def init_params(self, ctx, Z, y, X=None):
        return {}

    def forward(self, params, hyper, Z, X=None):
        return torch.log(Z.mean(1).clamp_min(1e-12)) / hyper["temperature"][0]


@pytest.fixture(scope="module")
def pool_and_rows():
    X, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    fit_rows, agg_rows = idx[:200], idx[200:]
    pool = [
        ("lr", LogisticRegression(max_iter=30).fit(X[fit_rows], y[fit_rows])),
        ("nb", GaussianNB().fit(X[fit_rows], y[fit_rows])),
    ]
    return pool, X[agg_rows], y[agg_rows]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("cv", [None, 3])
def test_temperature_alone_is_tuned_to_the_grid_minimum(pool_and_rows, cv):
    pool, X, y = pool_and_rows
    est = AggregatedClassifier(
        pool, aggregator=TemperedMean(), cv=cv, random_state=0
    ).fit(X, y)
    tuned = est.hyperparams_["temperature"]
    assert tuned != pytest.approx(1.0)  # it left its start
    # The tuned temperature's validation loss is a 200-point grid's minimum
    # (the inner problem is empty, so the validation loss is all there is).
    Z = np.stack([m.predict_proba(X) for _, m in pool], 1).mean(1)
    grid = np.geomspace(0.05, 20.0, 200)
    hist = est.tuning_history_
    assert hist["validation_loss"].min() <= hist["validation_loss"].iloc[0]
    # On all rows (no split) the same curve: the tuned value sits near its minimum.
    def loss(t):
        logits = np.log(np.clip(Z, 1e-12, None)) / t
        p = np.exp(logits - logits.max(1, keepdims=True))
        return log_loss(y, p / p.sum(1, keepdims=True), labels=[0, 1])
    best = min(loss(t) for t in grid)
    assert loss(tuned) <= best * 1.05
