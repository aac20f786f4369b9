"""ModelSelection: relaxed subset of base models around any aggregation function.

The pool: three complementary models (each a logistic regression on its own
third of the informative features), an exact duplicate of the first, and a
model that reads a pure-noise feature.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from aggregators import AggregatedClassifier, AggregatedRegressor, Choquet, ModelSelection, SparseMoE
from aggregators._base import AggregationContext
from aggregators.selection import loss_scale, neutralise, redundancy
from base_models import CallableModel

FAST = {"cv": None, "max_outer_iter": 3}


def _data(n, rng):
    X = rng.normal(size=(n, 10))
    logit = 1.5 * X[:, :9].sum(1)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return X, y


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    X_pool, y_pool = _data(1500, rng)
    X_agg, y_agg = _data(600, rng)

    def sub(cols):
        lr = LogisticRegression().fit(X_pool[:, cols], y_pool)
        return CallableModel(lambda X: lr.predict_proba(np.asarray(X)[:, cols]), classes=[0, 1])

    a = sub([0, 1, 2])

    def noise(X):
        p = 1 / (1 + np.exp(-3 * np.asarray(X)[:, 9]))
        return np.c_[1 - p, p]

    models = [("a", a), ("b", sub([3, 4, 5])), ("c", sub([6, 7, 8])), ("a_dup", a),
              ("noise", CallableModel(noise, classes=[0, 1]))]
    return models, X_agg, y_agg


def test_neutralise_keeps_and_drops():
    g = torch.Generator().manual_seed(0)
    Z = torch.rand((7, 3, 2), generator=g, dtype=torch.float64)
    base = Z.mean(0)
    out = neutralise(Z, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), base)
    torch.testing.assert_close(out[:, 0], Z[:, 0])
    torch.testing.assert_close(out[:, 1], base[1].expand(7, 2))  # no information left
    torch.testing.assert_close(out[:, 2], 0.5 * Z[:, 2] + 0.5 * base[2])
    # A hard zero ignores whatever the entry held (sparse-inference placeholders).
    Z[:, 1] = float("nan")
    assert torch.isfinite(neutralise(Z, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), base.nan_to_num())).all()


def test_redundancy_flags_exact_duplicates():
    g = torch.Generator().manual_seed(0)
    Z = torch.rand((50, 3, 2), generator=g, dtype=torch.float64)
    Z[:, 2] = Z[:, 0]
    R = redundancy(Z)
    assert float(R[0, 2]) == pytest.approx(1.0) and float(R[2, 0]) == pytest.approx(1.0)
    assert float(R[0, 1]) < 0.1 and float(R.diagonal().abs().sum()) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_selection_keeps_useful_drops_duplicate_and_noise(pool, seed):
    models, X, y = pool
    est = AggregatedClassifier(
        models, aggregator=ModelSelection("weights"), random_state=seed, **FAST
    ).fit(X, y)
    sel = est.aggregator_.selected_
    assert sel["b"] and sel["c"]
    assert sel["a"] != sel["a_dup"]  # exactly one copy of the duplicated model
    assert not sel["noise"]
    # Dropped models are never called at predict time.
    est.predict_proba(X)
    assert (est.last_routing_[~sel] == 0).all() and (est.last_routing_[sel] == len(X)).all()
    # The relaxed mask agrees with the hard subset.
    assert ((est.aggregator_.keep_probabilities_ > 0.5) == sel).all()


@pytest.mark.parametrize("inner", ["stacking", Choquet(), SparseMoE(k=2)],
                         ids=["stacking", "choquet", "moe"])
def test_selection_wraps_any_aggregator(pool, inner):
    models, X, y = pool
    est = AggregatedClassifier(
        models, aggregator=ModelSelection(inner), random_state=0, **FAST
    ).fit(X, y)
    proba = est.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-10)
    np.testing.assert_allclose(proba, est.predict_proba(X, dense=True), atol=1e-12)
    assert "selection_sparsity" in est.hyperparams_
    assert type(est.aggregator_.aggregator_) is type(inner if not isinstance(inner, str) else
                                                     est.aggregator_._inner())
    if not isinstance(inner, SparseMoE):  # a gate can also route around the noise model
        assert not est.aggregator_.selected_["noise"]


def test_selection_is_smooth_only_around_a_function_smooth_in_its_inputs(pool):
    # Choquet's minima of its inputs become kinks in the keep logits that
    # blend them; weights and stacking are smooth in their inputs.
    assert not ModelSelection(Choquet()).smooth
    assert ModelSelection("stacking").smooth and ModelSelection("weights").smooth
    # SparseMoE's training relaxation is smooth, and it mixes its inputs linearly.
    assert ModelSelection(SparseMoE()).smooth
    models, X, y = pool
    with warnings.catch_warnings():
        # The final fit stops at a kink: expected, so no ConvergenceWarning.
        warnings.simplefilter("error", ConvergenceWarning)
        AggregatedClassifier(models, aggregator=ModelSelection(Choquet()), random_state=0,
                             **FAST).fit(X, y)


def test_selection_error_cases(pool):
    models, X, y = pool
    with pytest.raises(ValueError, match="cannot wrap another ModelSelection"):
        AggregatedClassifier(models, aggregator=ModelSelection(ModelSelection()), **FAST).fit(X, y)
    with pytest.raises(ValueError, match="temperature must be positive"):
        AggregatedClassifier(models, aggregator=ModelSelection(temperature=0), **FAST).fit(X, y)


def _regression_pool(n, rng):
    """Rows ``[signal, noise_1..noise_4]`` and ``y = signal + noise``; model ``j``
    predicts ``signal + sigma_j * noise_j``: accurate models whose outputs all
    correlate above 0.9 (through the signal) while their errors are independent."""
    X = np.c_[3 * rng.normal(size=n), rng.normal(size=(n, 4))]
    y = X[:, 0] + 0.3 * rng.normal(size=n)
    return X, y


REG_SIGMAS = {"best": 0.3, "m1": 0.9, "m2": 1.0, "m3": 1.1}


@pytest.mark.parametrize("seed", [0, 1])
def test_selection_regression_keeps_the_clearly_best_model(seed):
    # On standardised targets an accurate pool's mean squared error is a few
    # hundredths of the target's variance: penalties in absolute units, and a
    # redundancy measured on the outputs (which agree through the signal),
    # used to outweigh every gain and keep a single model, not always the best.
    rng = np.random.default_rng(seed)
    X, y = _regression_pool(400, rng)
    X_test, y_test = _regression_pool(2000, rng)
    models = [
        (name, CallableModel(lambda X, j=j, s=s: np.asarray(X)[:, 0] + s * np.asarray(X)[:, j + 1],
                             output="value"))
        for j, (name, s) in enumerate(REG_SIGMAS.items())
    ]
    est = AggregatedRegressor(
        models, aggregator=ModelSelection("weights"), random_state=seed, **FAST
    ).fit(X, y)
    assert est.aggregator_.selected_["best"]
    mse = np.mean((est.predict(X_test) - y_test) ** 2)
    best_alone = np.mean((X_test[:, 0] + 0.3 * X_test[:, 1] - y_test) ** 2)
    assert mse <= 1.05 * best_alone


def test_loss_scale_is_the_best_models_training_loss():
    g = torch.Generator().manual_seed(0)
    y = torch.randn((50, 1), generator=g, dtype=torch.float64)
    Z = torch.stack([y + 0.1, y + 0.5], dim=1)  # (50, 2 models, 1)
    ctx = AggregationContext(task="regression", n_models=2, n_outputs=1, n_features=1,
                             model_names=["a", "b"], classes=None, device=torch.device("cpu"),
                             dtype=torch.float64, generator=g, n_train=50)
    assert float(loss_scale(ctx, Z, y)) == pytest.approx(0.01)
