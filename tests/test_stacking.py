"""Stacking's shrinkage towards the scaled-identity pool (``shrink_towards``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.tree import DecisionTreeRegressor

from aggregators import AggregatedClassifier, AggregatedRegressor, Stacking


def _explicit_penalty(coef, scale, l2, l2_scale):
    """``0.5 sum_m l2_m ||C_m - s_m I||^2 + 0.5 l2_scale c ||s||^2``, scales explicit."""
    c = coef.shape[1]
    eye = torch.eye(c, dtype=coef.dtype)
    dev = coef - scale[:, None, None] * eye
    return 0.5 * (l2 * dev.pow(2).sum((1, 2))).sum() + 0.5 * l2_scale[0] * c * scale.pow(2).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pool_penalty_is_the_explicit_one_minimised_over_the_scales(seed):
    g = torch.Generator().manual_seed(seed)
    m, c = 4, 3
    coef = torch.randn(m, c, c, generator=g, dtype=torch.float64)
    l2 = torch.rand(m, generator=g, dtype=torch.float64) * 10 + 1e-3
    l2_scale = torch.tensor([0.3], dtype=torch.float64)
    agg = Stacking()
    closed = agg.penalty({"coef": coef}, {"l2": l2, "l2_scale": l2_scale})

    # The minimiser of the explicit penalty over s (a stationary point of a
    # strictly convex quadratic), and its value.
    mean_diag = coef.diagonal(dim1=1, dim2=2).mean(1)
    s = (mean_diag * l2 / (l2 + l2_scale)).requires_grad_(True)
    explicit = _explicit_penalty(coef, s, l2, l2_scale)
    (grad,) = torch.autograd.grad(explicit, s)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-12, rtol=0)
    torch.testing.assert_close(closed, explicit.detach(), atol=1e-12, rtol=1e-12)
    # And "zero" is the plain ridge penalty.
    zero = Stacking(shrink_towards="zero").penalty({"coef": coef}, {"l2": l2})
    torch.testing.assert_close(zero, 0.5 * (l2 * coef.pow(2).sum((1, 2))).sum())


def _fit_pool_directly(P, y, l2_scale):
    """The tempered pool ``softmax(sum_m s_m P_m + b)`` fitted by SciPy.

    ``P``: (n_models, n_rows, n_classes); minimises the mean log-loss plus
    ``0.5 * l2_scale * n_classes * ||s||^2`` (intercept ``b`` unpenalised).
    """
    m, n, c = P.shape

    def objective(v):
        s, b = v[:m], v[m:]
        logits = np.tensordot(s, P, axes=1) + b
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -logp[np.arange(n), y].mean() + 0.5 * l2_scale * c * (s**2).sum()

    v0 = np.concatenate([np.full(m, 1.0 / m), np.zeros(c)])
    res = minimize(objective, v0, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-14})
    return res.x[:m], res.x[m:]


def test_huge_l2_leaves_the_tempered_pool_not_the_prior(cancer_pool, frozen_pool):
    d = cancer_pool
    l2_scale = 1e-2
    fixed = {"l2": 1e4, "l2_scale": l2_scale}
    # 1e4 is beyond the default limit of 100: the bounds say it is meant.
    wide = (1e-3, 1e4)
    est = AggregatedClassifier(
        frozen_pool, aggregator=Stacking(l2_bounds=wide), hyperparams=fixed, max_outer_iter=0,
        random_state=0,
    ).fit(d.X_agg, d.y_agg)
    coef = est.aggregator_.params_["coef"]
    # Each block is (nearly) its own scale times the identity.
    eye = np.eye(coef.shape[1])
    scale = est.aggregator_.scale_.to_numpy()
    np.testing.assert_allclose(coef, scale[:, None, None] * eye, atol=1e-3)

    P = np.stack([m.predict_proba(d.X_agg) for m in d.pool.values()])
    s_ref, b_ref = _fit_pool_directly(P, d.y_agg, l2_scale)
    np.testing.assert_allclose(scale, s_ref, atol=2e-3)
    P_test = np.stack([m.predict_proba(d.X_test) for m in d.pool.values()])
    logits = np.tensordot(s_ref, P_test, axes=1) + b_ref
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(est.predict_proba(d.X_test), expected, atol=2e-3)

    # Shrunk towards zero instead, the same L2 leaves (nearly) the class prior.
    zero = AggregatedClassifier(
        frozen_pool, aggregator=Stacking(shrink_towards="zero", l2_bounds=wide),
        hyperparams={"l2": 1e4},
        max_outer_iter=0, random_state=0,
    ).fit(d.X_agg, d.y_agg)
    prior = np.bincount(d.y_agg) / len(d.y_agg)
    np.testing.assert_allclose(zero.predict_proba(d.X_test), np.tile(prior, (len(d.X_test), 1)),
                               atol=1e-3)
    with pytest.raises(AttributeError, match="shrink_towards='pool'"):
        zero.aggregator_.scale_


def test_pool_hyperparameters_classifier_only(cancer_pool, frozen_pool):
    d = cancer_pool
    est = AggregatedClassifier(
        frozen_pool, aggregator=Stacking(), max_outer_iter=3, random_state=0
    ).fit(d.X_agg, d.y_agg)
    assert set(est.hyperparams_) == {"l2", "l2_scale"}
    zero = AggregatedClassifier(
        frozen_pool, aggregator=Stacking(shrink_towards="zero"), max_outer_iter=3,
        random_state=0,
    ).fit(d.X_agg, d.y_agg)
    assert set(zero.hyperparams_) == {"l2"}
    # Regressors are shrunk towards zero whatever shrink_towards says.
    X, y = load_diabetes(return_X_y=True)
    ests = [("ridge", Ridge(0.1)), ("tree", DecisionTreeRegressor(max_depth=3, random_state=0))]
    reg = AggregatedRegressor(ests, aggregator=Stacking(), max_outer_iter=2, random_state=0)
    assert set(reg.fit(X, y).hyperparams_) == {"l2"}


def test_bad_shrink_target(cancer_pool, frozen_pool):
    d = cancer_pool
    est = AggregatedClassifier(frozen_pool, aggregator=Stacking(shrink_towards="one"))
    with pytest.raises(ValueError, match="shrink_towards must be 'pool' or 'zero'; got 'one'"):
        est.fit(d.X_agg, d.y_agg)


def test_l2_bounds_follow_the_training_rows():
    """``l2_bounds=None``: the floor is ``0.1 / n_train`` (the penalty is on the
    mean loss), ``1e-3`` without a row count; a given range is kept."""
    import torch

    from aggregators._base import AggregationContext

    def bounds(agg, n_train):
        ctx = AggregationContext(
            task="classification", n_models=3, n_outputs=2, n_features=4,
            model_names=["a", "b", "c"], dtype=torch.float64, n_train=n_train,
        )
        return {h.name: (h.low, h.high) for h in agg.hyperparameters(ctx)}

    assert bounds(Stacking(), 400) == {"l2": (0.1 / 400, 1e2), "l2_scale": (0.1 / 400, 1e2)}
    assert bounds(Stacking(), None)["l2"] == (1e-3, 1e2)
    assert bounds(Stacking(l2_bounds=(1e-2, 10.0)), 400)["l2"] == (1e-2, 10.0)


def test_estimator_passes_the_training_rows(cancer_pool, frozen_pool):
    from aggregators import AggregatedClassifier

    seen = []

    class Spy(Stacking):
        def hyperparameters(self, ctx):
            seen.append(ctx.n_train)
            return super().hyperparameters(ctx)

    d = cancer_pool
    AggregatedClassifier(frozen_pool, aggregator=Spy(), cv=3, random_state=0,
                         max_outer_iter=1).fit(d.X_agg, d.y_agg)
    assert seen == [round(len(d.y_agg) * 2 / 3)]
