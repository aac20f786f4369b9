"""Validation rows charged for the errors they are too few to show (Choquet's tuning)."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier

from aggregators import AggregatedClassifier, Stacking
from aggregators._bilevel import charged_row_losses, row_losses, unseen_error_charge
from aggregators.choquet import Choquet


def test_charged_row_losses_by_hand():
    rng = np.random.default_rng(0)
    out = torch.tensor(rng.normal(size=(7, 4)) * 3, dtype=torch.float64)
    y = torch.tensor(rng.integers(0, 4, 7))
    p = torch.softmax(out, -1).numpy()
    py = p[np.arange(7), y.numpy()]
    want = -np.log(py) + 0.1 * -np.log1p(-py)
    got = charged_row_losses("classification", out, y, 0.1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # No charge: the plain cross-entropy; regression is never charged.
    torch.testing.assert_close(charged_row_losses("classification", out, y, 0.0),
                               row_losses("classification", out, y))
    yr = torch.zeros(7, 4, dtype=torch.float64)
    torch.testing.assert_close(charged_row_losses("regression", out, yr, 0.1),
                               row_losses("regression", out, yr))


def test_charged_row_losses_binary_is_the_other_class():
    out = torch.tensor([[2.0, -1.0], [0.5, 0.3]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    logp = torch.log_softmax(out, -1)
    want = -logp[[0, 1], [0, 1]] - 0.5 * logp[[0, 1], [1, 0]]
    torch.testing.assert_close(charged_row_losses("classification", out, y, 0.5), want)


def test_which_aggregators_are_charged():
    assert unseen_error_charge(Choquet(), "classification", 9) == pytest.approx(0.1)
    assert unseen_error_charge(Choquet(), "regression", 9) == 0.0
    assert unseen_error_charge(Stacking(), "classification", 9) == 0.0


@pytest.mark.parametrize("cv", [None, 3])
def test_error_free_validation_does_not_drive_the_temperature_down(cv):
    # Setosa against the rest: every base model is right on every row, so
    # the plain validation loss keeps falling as the temperature does (it
    # reached 0.036, log-probabilities of -14); charged, it stops where one
    # unseen error in n + 1 rows would cost more than the sharpening gains.
    X, y = load_iris(return_X_y=True)
    y = (y == 0).astype(int)
    idx = np.random.default_rng(0).permutation(len(y))
    fit, agg = idx[:60], idx[60:100]
    pool = [
        ("lr", LogisticRegression(max_iter=500).fit(X[fit], y[fit])),
        ("nb", GaussianNB().fit(X[fit], y[fit])),
        ("tree", DecisionTreeClassifier(max_depth=2, random_state=0).fit(X[fit], y[fit])),
    ]
    est = AggregatedClassifier(pool, aggregator="choquet", cv=cv, random_state=0)
    est.fit(X[agg], y[agg])
    assert (est.predict(X[agg]) == y[agg]).all()
    assert est.hyperparams_["temperature"] > 0.1
    assert est.predict_proba(X[agg]).max() < 0.9999
    assert est.tuning_history_.attrs["cv_mode"] == "exact"
