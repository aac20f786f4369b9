"""The cross-fitting folds evaluated by one vmap: same losses, gradients and fits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.model_selection import KFold, train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

import aggregators._analytic as analytic
import aggregators._bilevel as bilevel
from aggregators import AggregatedClassifier, AggregatedRegressor, Aggregator, Hyperparameter
from aggregators._base import AggregationContext
from aggregators._bilevel import HyperSpace, Split, make_fold_problems
from aggregators._registry import resolve_aggregator
from aggregators.hypergrad import stack_problems
from aggregators.hypergrad._newton import block_hessian

DT = torch.float64


@pytest.fixture(scope="module")
def pool_outputs():
    X, y = load_breast_cancer(return_X_y=True)
    Xp, Xa, yp, ya = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    models = [LogisticRegression(max_iter=5000), GaussianNB(),
              DecisionTreeClassifier(max_depth=3, random_state=0)]
    Z = np.stack([m.fit(Xp, yp).predict_proba(Xa) for m in models], axis=1)
    ctx = AggregationContext(
        task="classification", n_models=3, n_outputs=2, n_features=X.shape[1],
        model_names=["lr", "nb", "tree"], classes=np.arange(2), n_train=137,
    )
    full = Split(torch.as_tensor(Z, dtype=DT), torch.as_tensor(ya), torch.as_tensor(Xa, dtype=DT))
    # 171 rows in 5 folds: training folds of 136 and 137 rows (padding is exercised).
    folds = [
        (full.take(torch.as_tensor(tr)), full.take(torch.as_tensor(va)))
        for tr, va in KFold(5, shuffle=True, random_state=0).split(Z)
    ]
    return ctx, folds


def _spy(monkeypatch) -> list:
    """Record whether each call of make_fold_problems batched its folds."""
    calls = []
    real = bilevel._batched_problem

    def spy(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(bilevel, "_batched_problem", spy)
    return calls


def _losses_and_grads(problem, theta, u):
    th = theta.clone().requires_grad_(True)
    out = []
    for loss in (problem.inner_loss, problem.outer_loss):
        value = loss(th, u)
        out += [value.detach(), torch.autograd.grad(value, th)[0]]
    return out


@pytest.mark.parametrize("name", ["stacking", "weights", "choquet", "sugeno", "uninorm", "laf"])
def test_batched_folds_equal_the_fold_by_fold_sum(pool_outputs, monkeypatch, name):
    ctx, folds = pool_outputs
    # Weights' closed form would stand in for the batch (see the next test).
    monkeypatch.setattr(analytic, "WEIGHTS_ANALYTIC", False)
    calls = _spy(monkeypatch)
    agg = resolve_aggregator(name)
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    batched, split, parts = make_fold_problems(agg, ctx, folds, space)
    assert calls == [True]
    # Choquet's validation rows are charged for unseen errors, over all folds' rows.
    charge = bilevel.unseen_error_charge(agg, ctx.task, sum(va.y.shape[0] for _, va in folds))
    sequential, _ = stack_problems(
        [bilevel.make_problem(agg, ctx, tr, va, space, charge=charge)[0] for tr, va in folds]
    )
    assert batched.blocks == sequential.blocks and len(parts) == len(folds)
    # Away from the starting point the check in make_fold_problems looked at.
    gen = torch.Generator().manual_seed(0)
    theta = batched.theta0 + 0.3 * torch.randn(batched.theta0.shape, generator=gen, dtype=DT)
    u = space.initial() + 0.2
    for a, b in zip(_losses_and_grads(batched, theta, u), _losses_and_grads(sequential, theta, u)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert [t.numel() for t in split(theta)] == list(batched.blocks)


def test_weights_closed_form_needs_no_batch(pool_outputs, monkeypatch):
    ctx, folds = pool_outputs
    calls = _spy(monkeypatch)
    agg = resolve_aggregator("weights")
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    problem, _, _ = make_fold_problems(agg, ctx, folds, space)
    # Its closed form answers every loss and derivative the engine asks: the
    # folds' autograd losses are not batched (nor checked against a batch).
    assert calls == [] and problem.inner_value_grad is not None
    sequential, _ = stack_problems(
        [bilevel.make_problem(agg, ctx, tr, va, space)[0] for tr, va in folds]
    )
    u = space.initial() + 0.2
    theta = problem.theta0 + 0.3
    for a, b in zip(_losses_and_grads(problem, theta, u), _losses_and_grads(sequential, theta, u)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    value, grad = problem.inner_value_grad(theta, u)
    torch.testing.assert_close(value, _losses_and_grads(sequential, theta, u)[0])
    torch.testing.assert_close(grad, _losses_and_grads(sequential, theta, u)[1])
    # Without the closed form, the folds are batched as before.
    monkeypatch.setattr(analytic, "WEIGHTS_ANALYTIC", False)
    problem, _, _ = make_fold_problems(agg, ctx, folds, space)
    assert calls == [True] and problem.inner_value_grad is None


def test_large_folds_take_hessian_blocks_fold_by_fold(pool_outputs, monkeypatch):
    ctx, folds = pool_outputs
    agg = resolve_aggregator("stacking")
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    small, _, _ = make_fold_problems(agg, ctx, folds, space)
    assert small.hessian_loss is None  # 137 rows x 2 classes: within the bound
    monkeypatch.setattr(bilevel, "BATCHED_HESSIAN_MAX_ENTRIES", 100)
    large, _, _ = make_fold_problems(agg, ctx, folds, space)
    assert large.hessian_loss is not None
    u = space.initial()
    _, g_small, h_small = block_hessian(small, small.theta0, u)
    _, g_large, h_large = block_hessian(large, large.theta0, u)
    torch.testing.assert_close(g_small, g_large, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_small, h_large, rtol=1e-10, atol=1e-12)


class _HostSyncWeights(Aggregator):
    """Convex weights whose forward reads a value on the host (``float``), which
    ``torch.vmap`` cannot batch."""

    short_name = "host_sync_weights"

    def hyperparameters(self, ctx):
        return [Hyperparameter("l2", 1e-2, 1e-4, 1.0)]

    def init_params(self, ctx, Z, y, X=None):
        return {"logits": ctx.zeros(ctx.n_models)}

    def forward(self, params, hyper, Z, X=None):
        w = torch.softmax(params["logits"], 0)
        if float(w.max().detach()) > 2.0:  # never true; the host read is the point
            w = w * 0
        return torch.log((Z * w[None, :, None]).sum(1).clamp_min(1e-12))

    def penalty(self, params, hyper):
        return 0.5 * hyper["l2"][0] * params["logits"].pow(2).sum()


class _RowCentredWeights(_HostSyncWeights):
    """Weights on outputs centred by their mean over the rows: a statistic that
    the padding rows would change, which only the start-up check can see."""

    short_name = "row_centred_weights"

    def forward(self, params, hyper, Z, X=None):
        w = torch.softmax(params["logits"], 0)
        logp = torch.log((Z * w[None, :, None]).sum(1).clamp_min(1e-12))
        return logp - logp.mean(0)


def test_what_does_not_batch_falls_back_to_the_fold_by_fold_sum(pool_outputs, monkeypatch):
    ctx, folds = pool_outputs
    calls = _spy(monkeypatch)
    for agg in (_HostSyncWeights(), _RowCentredWeights(), resolve_aggregator("moe")):
        space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
        problem, _, _ = make_fold_problems(agg, ctx, folds, space)
        sequential, _ = stack_problems(
            [bilevel.make_problem(agg, ctx, tr, va, space)[0] for tr, va in folds]
        )
        u = space.initial()
        for a, b in zip(
            _losses_and_grads(problem, problem.theta0, u),
            _losses_and_grads(sequential, sequential.theta0, u),
        ):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # The host read; the row statistic; MoE's per-fold load-balancing loss.
    assert calls == [False, False, False]


def test_large_folds_are_not_copied_into_a_batch(pool_outputs, monkeypatch):
    ctx, folds = pool_outputs
    calls = _spy(monkeypatch)
    agg = resolve_aggregator("stacking")
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    entries = sum(tr.Z.numel() + va.Z.numel() for tr, va in folds)
    monkeypatch.setattr(bilevel, "BATCHED_MAX_ENTRIES", entries)
    make_fold_problems(agg, ctx, folds, space)
    monkeypatch.setattr(bilevel, "BATCHED_MAX_ENTRIES", entries - 1)
    make_fold_problems(agg, ctx, folds, space)
    assert calls == [True, False]


def _fits(est, X, y, monkeypatch):
    calls = _spy(monkeypatch)
    batched = est.fit(X, y)
    pred_b, hist_b = batched.predict(X), batched.tuning_history_
    assert calls and all(calls)
    monkeypatch.setattr(bilevel, "_batched_problem", lambda *a: None)
    seq = est.fit(X, y)
    return pred_b, seq.predict(X), hist_b, seq.tuning_history_


def test_estimators_fit_the_same_batched_or_fold_by_fold(monkeypatch):
    X, y = load_breast_cancer(return_X_y=True)
    Xp, Xa, yp, ya = train_test_split(X, y, test_size=0.4, random_state=0, stratify=y)
    frozen = [("lr", LogisticRegression(max_iter=5000).fit(Xp, yp)),
              ("nb", GaussianNB().fit(Xp, yp))]
    clf = AggregatedClassifier(frozen, aggregator="stacking", random_state=0)
    pred_b, pred_s, hist_b, hist_s = _fits(clf, Xa, ya, monkeypatch)
    np.testing.assert_array_equal(pred_b, pred_s)
    np.testing.assert_allclose(
        hist_b["validation_loss"], hist_s["validation_loss"], rtol=1e-6, atol=1e-9
    )

    X, y = load_diabetes(return_X_y=True)
    Xp, Xa, yp, ya = train_test_split(X, y, test_size=0.5, random_state=0)
    frozen = [("ridge", Ridge().fit(Xp, yp)), ("lin", LinearRegression().fit(Xp, yp)),
              ("tree", DecisionTreeRegressor(max_depth=3, random_state=0).fit(Xp, yp))]
    monkeypatch.undo()
    # Regression stacking's folds are solved in closed form by default: this
    # compares the iterative folds' two ways.
    import aggregators._fit as fit_module

    monkeypatch.setattr(fit_module, "LINEAR_CLOSED_FORM", False)
    reg = AggregatedRegressor(frozen, aggregator="stacking", random_state=0)
    pred_b, pred_s, hist_b, hist_s = _fits(reg, Xa, ya, monkeypatch)
    np.testing.assert_allclose(pred_b, pred_s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        hist_b["validation_loss"], hist_s["validation_loss"], rtol=1e-6, atol=1e-9
    )
