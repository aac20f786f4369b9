"""Closed-form derivatives of ``LearnedWeights`` problems (``_analytic.attach_weights_derivatives``).

Each callable the engine takes (inner loss and gradient, Hessian blocks and
products, outer gradients in the logits and the hyperparameters, mixed
product) equals autograd on the problem's own losses to 1e-10 in float64,
for both pools, binary and multiclass, weighted rows and regression; the
hypergradient too; and whole fits tune to the same hyperparameters with and
without the closed form.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification, make_regression
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

import aggregators._analytic as analytic
from aggregators import AggregatedClassifier, AggregatedRegressor, LearnedWeights
from aggregators._bilevel import HyperSpace, make_fold_problems, make_problem

from test_analytic import (  # noqa: E402
    ATOL, DT, _data, _folds, _plain, assert_closed_forms_equal_autograd,
    assert_hypergradient_equals_autograd,
)

CASES = [
    ("classification", 3, False, LearnedWeights()),
    ("classification", 3, True, LearnedWeights(pool="log")),
    ("classification", 2, True, LearnedWeights()),
    ("classification", 4, False, LearnedWeights(pool="log", entropy=0.3)),
    ("regression", 1, False, LearnedWeights()),
    ("regression", 1, True, LearnedWeights(l2=0.5)),
]
IDS = ["linear", "log-weighted", "binary-weighted", "log-entropy", "regression",
       "regression-weighted"]


def _space(agg, ctx):
    # Every hyperparameter tuned, so each one's derivative is checked.
    tuned = type(agg).tuned_by_default
    type(agg).tuned_by_default = ("temperature", "l2", "entropy")
    try:
        return HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    finally:
        type(agg).tuned_by_default = tuned


@pytest.mark.parametrize("task, n_classes, weighted, agg", CASES, ids=IDS)
def test_callables_equal_autograd(task, n_classes, weighted, agg):
    full, ctx = _data(task, n_classes, weighted)
    if task == "classification":  # a class no model predicts in some rows: the clamp
        full.Z[:5, :, 0] = 0.0
        full.Z[:5] /= full.Z[:5].sum(-1, keepdim=True)
    space = _space(agg, ctx)
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), space)
    assert joint.inner_value_grad is not None and joint.mixed_product is not None
    plain = _plain(joint)
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(joint.theta0.numel(), generator=gen, dtype=DT)
    v = torch.randn(theta.numel(), generator=gen, dtype=DT)
    u = space.initial() + torch.linspace(-0.5, 1.0, space.initial().numel(), dtype=DT)

    assert_closed_forms_equal_autograd(joint, plain, theta, v, u)

    assert_hypergradient_equals_autograd(joint, plain, u)


def test_refit_problem_gets_the_closed_form():
    full, ctx = _data("classification", 3, True)
    agg = LearnedWeights()
    space = _space(agg, ctx)
    prob, _, _ = make_problem(agg, ctx, full, None, space)
    assert prob.inner_value_grad is not None
    theta = 0.3 * torch.arange(prob.theta0.numel(), dtype=DT).cos()
    u = space.initial() + 0.3
    torch.testing.assert_close(prob.inner_value_grad(theta, u)[1],
                               _plain(prob).inner_grad(theta, u), rtol=0, atol=ATOL)


def test_subclass_with_own_forward_keeps_autograd():
    class Sharper(LearnedWeights):
        def forward(self, params, hyper, Z, X=None):
            return 2.0 * super().forward(params, hyper, Z, X)

    full, ctx = _data("classification", 3, False)
    agg = Sharper()
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), _space(agg, ctx))
    assert joint.inner_value_grad is None


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_whole_fit_matches_autograd(monkeypatch, task):
    if task == "classification":
        X, y = make_classification(400, 8, n_informative=5, n_classes=3,
                                   n_clusters_per_class=1, random_state=0)
        models = [LogisticRegression(max_iter=500), GaussianNB(),
                  DecisionTreeClassifier(max_depth=3, random_state=0)]
        Est = AggregatedClassifier
    else:
        X, y = make_regression(400, 8, noise=20.0, random_state=0)
        models = [LinearRegression(), DecisionTreeRegressor(max_depth=3, random_state=0)]
        Est = AggregatedRegressor
    pool = [(f"m{i}", FrozenEstimator(m.fit(X[:150], y[:150]))) for i, m in enumerate(models)]
    fits = []
    for flag in (False, True):
        monkeypatch.setattr(analytic, "WEIGHTS_ANALYTIC", flag)
        fits.append(Est(pool, aggregator="weights", random_state=0).fit(X[150:], y[150:]))
    plain, fast = fits
    assert len(plain.tuning_history_) == len(fast.tuning_history_)
    assert fast.validation_loss_ == pytest.approx(plain.validation_loss_, rel=1e-5)
    for name, value in plain.hyperparams_.items():
        np.testing.assert_allclose(np.log(fast.hyperparams_[name]), np.log(value), atol=1e-3)
    np.testing.assert_allclose(fast.aggregator_.weights_.values,
                               plain.aggregator_.weights_.values, atol=1e-4)


def test_default_tunes_temperature_and_l2_within_the_budget():
    """Entropy held by default; the shared stage's budget bounds the outer evaluations."""
    X, y = make_classification(500, 8, n_informative=5, n_classes=3,
                               n_clusters_per_class=1, random_state=1)
    models = [LogisticRegression(max_iter=500), GaussianNB(),
              DecisionTreeClassifier(max_depth=3, random_state=0)]
    pool = [(f"m{i}", FrozenEstimator(m.fit(X[:200], y[:200]))) for i, m in enumerate(models)]
    est = AggregatedClassifier(pool, aggregator="weights", random_state=0).fit(X[200:], y[200:])
    hist = est.tuning_history_
    assert 1 < len(hist) <= 8
    assert hist["entropy"].nunique() == 1
    assert hist["entropy"].iloc[0] == pytest.approx(LearnedWeights().entropy)
    assert hist["temperature"].nunique() > 1 and hist["l2"].nunique() > 1


def test_subclass_with_other_mixing_is_checked_and_keeps_autograd():
    """A subclass whose weights differ (not the softmax) fails the check at attach time."""
    class Squared(LearnedWeights):
        @staticmethod
        def _weights(params):
            a = params["logits"].pow(2) + 1.0
            w = a / a.sum(0)
            return w if w.dim() == 2 else w[:, None]

    full, ctx = _data("classification", 3, False)
    agg = Squared()
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), _space(agg, ctx))
    assert joint.inner_value_grad is None
