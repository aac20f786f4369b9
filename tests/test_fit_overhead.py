"""Fixed costs of a fit cut without changing what it returns (issue 20)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from aggregators._base import Hyperparameter
from aggregators._bilevel import HyperSpace
from aggregators._fit import _history_frame
from base_models._sklearn import _estimator_task


def _rowwise(history, space, n_folds):
    """The history frame built one dict per row (the construction it replaces)."""
    names = space.entry_names()
    rows = []
    for step, e in enumerate(history):
        vals = space.flat_values(torch.as_tensor(e["h"], dtype=space.dtype))
        row = {"step": step, "validation_loss": e["outer_loss"] / n_folds,
               "hypergrad_norm": e["hypergrad_norm"], "inner_iter": e["inner_iter"],
               "seconds": e["seconds"]}
        row.update(dict(zip(names, vals)))
        rows.append(row)
    columns = ["step", "validation_loss", "hypergrad_norm", "inner_iter", "seconds", *names]
    return pd.DataFrame(rows, columns=columns)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_steps", [0, 1, 6])
def test_history_frame_by_columns_equals_by_rows(n_steps, dtype):
    specs = [
        Hyperparameter("l2", np.full(3, 0.1), 1e-4, 1e2, size=3, labels=("a", "b", "c")),
        Hyperparameter("temperature", 1.0, 0.5, 2.0),
        Hyperparameter("shift", 0.0, -1.0, 1.0, log=False),
    ]
    space = HyperSpace(specs, {"temperature": 1.5}, torch.device("cpu"), dtype)
    gen = np.random.default_rng(0)
    history = [
        {"h": gen.normal(size=4), "outer_loss": float(gen.random()) * 5,
         "hypergrad_norm": float(gen.random()), "inner_iter": int(gen.integers(0, 9)),
         "seconds": float(gen.random())}
        for _ in range(n_steps)
    ]
    got, want = _history_frame(history, space, 5), _rowwise(history, space, 5)
    pd.testing.assert_frame_equal(got, want, check_exact=True)


@pytest.mark.parametrize(
    "model, task",
    [
        (make_pipeline(StandardScaler(), LogisticRegression()), "classification"),
        (LinearRegression(), "regression"),
        (StandardScaler(), None),
    ],
)
def test_estimator_task_from_one_tags_call(model, task):
    X, y = np.arange(20.0).reshape(10, 2), np.array([0, 1] * 5)
    fitted = model.fit(X, y)
    assert _estimator_task(fitted) == task
    assert _estimator_task(FrozenEstimator(fitted)) == task


def test_estimator_task_of_a_duck_typed_model():
    class Duck:
        _estimator_type = "regressor"

        def fit(self, X, y):
            return self

        def predict(self, X):
            return np.zeros(len(X))

    assert _estimator_task(Duck()) == "regression"


def test_fold_aggregators_are_independent_copies():
    """The folds' aggregators are deep copies of one clone: none shares a
    nested aggregation function with another, the fitted one or the spec."""
    from sklearn.datasets import make_regression
    from sklearn.linear_model import Ridge
    from sklearn.tree import DecisionTreeRegressor

    from aggregators import AggregatedRegressor, ModelSelection, Stacking

    X, y = make_regression(120, 4, noise=5.0, random_state=0)
    inner = Stacking()
    spec = ModelSelection(inner)
    est = AggregatedRegressor(
        [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=2, random_state=0))],
        aggregator=spec, cv=3, max_outer_iter=1, random_state=0,
    ).fit(X, y)
    folds = est.fold_aggregators_
    assert len(folds) == 3
    nested = [f.aggregator for f in folds] + [est.aggregator_.aggregator, inner]
    assert len({id(a) for a in nested}) == len(nested)
    assert len({id(f) for f in folds}) == 3
    for f in folds:
        assert not hasattr(spec, "params_") and hasattr(f, "params_")
        assert f.get_params().keys() == spec.get_params().keys()
