"""Closed-form derivatives of linear-design problems (``aggregators/_analytic.py``).

Every callable the engine takes from a stacking problem (inner loss and
gradient, Hessian-vector product, Hessian blocks, outer gradients, mixed
product) and the hypergradient built from them equal the autograd path to
1e-10 in float64; whole fits reach the same hyperparameters and validation
loss either way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier

import aggregators._analytic as analytic
from aggregators import AggregatedClassifier, LearnedWeights, Stacking
from aggregators._base import AggregationContext
from aggregators._bilevel import HyperSpace, Split, make_fold_problems, make_problem
from aggregators.hypergrad import BilevelProblem, implicit_hypergradient, solve_inner
from aggregators.hypergrad._newton import block_sizes, hessian_blocks
from aggregators.hypergrad._problem import outer_grads

DT = torch.float64
ATOL = 1e-10


def assert_closed_forms_equal_autograd(joint, plain, theta, v, u) -> None:
    """Every closed form attached to ``joint`` equals autograd through ``plain``
    (the same losses without them) at ``theta``, ``u``, along ``v``: the inner
    value, gradient, Hessian blocks and mixed product always, the
    Hessian-vector product and the outer derivatives where attached."""
    value, grad = joint.inner_value_grad(theta, u)
    with torch.enable_grad():
        th = theta.clone().requires_grad_(True)
        ref_value = plain.inner_loss(th, u)
        (ref_grad,) = torch.autograd.grad(ref_value, th, create_graph=True)
        (ref_hv,) = torch.autograd.grad(ref_grad, th, v, retain_graph=True)
        ref_blocks = hessian_blocks(ref_grad, th, block_sizes(plain, theta))
    torch.testing.assert_close(value, ref_value.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(grad, ref_grad.detach(), rtol=0, atol=ATOL)
    if joint.inner_hvp is not None:
        torch.testing.assert_close(joint.inner_hvp(theta, u)(v), ref_hv, rtol=0, atol=ATOL)
    assert joint.inner_hessian is not None
    torch.testing.assert_close(joint.inner_hessian(theta, u), ref_blocks.detach(),
                               rtol=0, atol=ATOL)
    if joint.outer_value_grads is not None:
        for got, want in zip(joint.outer_value_grads(theta, u), outer_grads(plain, theta, u)):
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    with torch.enable_grad():
        hh = u.clone().requires_grad_(True)
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(plain.inner_loss(th, hh), th, create_graph=True)
        (ref_mixed,) = torch.autograd.grad(g, hh, v)
    torch.testing.assert_close(joint.mixed_product(theta, u, v), ref_mixed, rtol=0, atol=ATOL)



def assert_hypergradient_equals_autograd(joint, plain, u, *, tol=1e-10, max_iter=5000) -> None:
    """At the inner optimum for ``u``, the implicit hypergradient through the
    closed forms attached to ``joint`` equals autograd's through ``plain``."""
    theta_star, _, converged = solve_inner(joint, u, joint.theta0, tol=tol, max_iter=max_iter)
    assert converged
    got = implicit_hypergradient(joint, theta_star, u, solver="direct", tol=1e-14)
    want = implicit_hypergradient(plain, theta_star, u, solver="direct", tol=1e-14)
    assert got.info["analytic"] and not want.info["analytic"]
    torch.testing.assert_close(got.value, want.value, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=ATOL)

def _data(task: str, n_classes: int, weighted: bool, n: int = 90, m: int = 3, d: int = 4,
          device: str = "cpu"):
    rng = np.random.default_rng(0)
    if task == "classification":
        Z = rng.dirichlet(np.ones(n_classes), size=(n, m))
        y = torch.as_tensor(rng.integers(0, n_classes, n))
    else:
        Z = rng.normal(size=(n, m, 1))
        y = torch.as_tensor(rng.normal(size=(n, 1)), dtype=DT)
    X = torch.as_tensor(rng.normal(size=(n, d)), dtype=DT)
    w = torch.as_tensor(rng.uniform(0.2, 2.0, n), dtype=DT) if weighted else None
    dev = torch.device(device)
    full = Split(torch.as_tensor(Z, dtype=DT).to(dev), y.to(dev), X.to(dev),
                 None if w is None else w.to(dev))
    ctx = AggregationContext(
        task=task, n_models=m, n_outputs=n_classes if task == "classification" else 1,
        n_features=d, model_names=[f"m{i}" for i in range(m)], dtype=DT, device=dev,
        generator=torch.Generator().manual_seed(0), n_train=int(0.8 * n),
    )
    return full, ctx


def _folds(full: Split, n_splits: int = 5):
    idx = np.arange(full.y.shape[0])
    return [
        (full.take(torch.as_tensor(tr)), full.take(torch.as_tensor(va)))
        for tr, va in KFold(n_splits, shuffle=True, random_state=0).split(idx)
    ]


def _plain(problem: BilevelProblem) -> BilevelProblem:
    """The same losses without the closed-form callables: autograd throughout."""
    return BilevelProblem(problem.inner_loss, problem.outer_loss, problem.theta0,
                          blocks=problem.blocks)


class _QuarticStacking(Stacking):
    """A penalty that is not a quadratic: its derivatives come from autograd."""

    def penalty(self, params, hyper):
        return super().penalty(params, hyper) + 0.1 * hyper["l2"].sum() * params["coef"].pow(4).sum()


CASES = [
    ("classification", 4, False, Stacking()),
    ("classification", 4, True, Stacking()),
    ("classification", 2, False, Stacking()),
    ("classification", 2, True, Stacking(passthrough=True)),
    ("classification", 3, True, Stacking(passthrough=True, shrink_towards="zero")),
    ("classification", 3, False, Stacking(per_model_l2=False, features="log_proba")),
    ("classification", 3, True, _QuarticStacking()),
    ("regression", 1, False, Stacking()),
    ("regression", 1, True, Stacking(passthrough=True)),
]
IDS = ["multi", "multi-weighted", "binary", "binary-weighted-passthrough",
       "passthrough-zero", "shared-l2-log", "quartic-penalty", "regression",
       "regression-weighted-passthrough"]


@pytest.mark.parametrize("task, n_classes, weighted, agg", CASES, ids=IDS)
def test_callables_equal_autograd(task, n_classes, weighted, agg):
    full, ctx = _data(task, n_classes, weighted)
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), space)
    assert joint.inner_value_grad is not None and joint.mixed_product is not None
    plain = _plain(joint)
    gen = torch.Generator().manual_seed(3)
    theta = 0.3 * torch.randn(joint.theta0.numel(), generator=gen, dtype=DT)
    v = torch.randn(theta.numel(), generator=gen, dtype=DT)
    # Away from the points the closed form was checked at when it was attached.
    u = space.initial() + torch.linspace(-1.0, 2.0, space.initial().numel(), dtype=DT)

    assert_closed_forms_equal_autograd(joint, plain, theta, v, u)

    # The hypergradient at the inner optimum, by each linear solve, both ways.
    theta_star, _, converged = solve_inner(joint, u, joint.theta0, tol=1e-10, max_iter=5000)
    assert converged
    # The direct solve from the closed-form blocks, not conjugate gradient
    # preconditioned by the inner solve's last Newton factors
    # (test_preconditioning.py checks that one).
    joint.newton_factor = None
    for solver in ("direct", "cg"):
        got = implicit_hypergradient(joint, theta_star, u, solver=solver, tol=1e-14,
                                     max_iter=5000)
        want = implicit_hypergradient(plain, theta_star, u, solver=solver, tol=1e-14,
                                      max_iter=5000)
        assert got.info["analytic"] and not want.info["analytic"]
        torch.testing.assert_close(got.value, want.value, rtol=0, atol=ATOL)
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=ATOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_callables_equal_autograd_on_cuda():
    full, ctx = _data("classification", 4, True, device="cuda")
    agg = Stacking(passthrough=True)
    space = HyperSpace(agg.hyperparameters(ctx), {}, ctx.device, DT)
    idx = np.arange(full.y.shape[0])
    folds = [(full.take(torch.as_tensor(tr, device=ctx.device)),
              full.take(torch.as_tensor(va, device=ctx.device)))
             for tr, va in KFold(5, shuffle=True, random_state=0).split(idx)]
    joint, _, _ = make_fold_problems(agg, ctx, folds, space)
    assert joint.inner_value_grad is not None
    plain = _plain(joint)
    theta = 0.1 * torch.arange(joint.theta0.numel(), dtype=DT, device=ctx.device).sin()
    u = space.initial() + 0.5
    torch.testing.assert_close(joint.inner_value_grad(theta, u)[1],
                               plain.inner_grad(theta, u), rtol=0, atol=ATOL)
    theta_star, _, _ = solve_inner(joint, u, joint.theta0, tol=1e-10, max_iter=5000)
    got = implicit_hypergradient(joint, theta_star, u, solver="cg", tol=1e-14, max_iter=5000)
    want = implicit_hypergradient(plain, theta_star, u, solver="cg", tol=1e-14, max_iter=5000)
    torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=ATOL)


def test_single_problem_and_refit_get_the_closed_form():
    """make_problem (the refit on all rows, validation on the training rows) too."""
    full, ctx = _data("classification", 3, True)
    agg = Stacking(passthrough=True)
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    for val in (None, full.take(torch.arange(30))):
        prob, _, _ = make_problem(agg, ctx, full, val, space)
        assert prob.inner_value_grad is not None
        plain = _plain(prob)
        theta = 0.1 * torch.arange(prob.theta0.numel(), dtype=DT).cos()
        u = space.initial() + 0.5
        torch.testing.assert_close(prob.inner_value_grad(theta, u)[1],
                                   plain.inner_grad(theta, u), rtol=0, atol=ATOL)
        for got, want in zip(prob.outer_value_grads(theta, u), outer_grads(plain, theta, u)):
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_not_attached_where_it_does_not_apply(monkeypatch):
    """No closed form (learned weights per class), or the fast path turned off: autograd."""
    full, ctx = _data("classification", 3, False)
    for agg in (LearnedWeights(per="per_output"), Stacking(), LearnedWeights()):
        if isinstance(agg, Stacking):
            monkeypatch.setattr(analytic, "ANALYTIC", False)
        elif agg.per == "global":
            monkeypatch.setattr(analytic, "WEIGHTS_ANALYTIC", False)
        space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
        joint, _, _ = make_fold_problems(agg, ctx, _folds(full), space)
        assert joint.inner_value_grad is None and joint.inner_hvp is None


def _pool_and_rows(n_classes):
    """Three frozen models trained on the first 150 of 400 generated rows."""
    X, y = make_classification(400, 8, n_informative=5, n_classes=n_classes,
                               n_clusters_per_class=1, random_state=0)
    pool = [
        ("lr", FrozenEstimator(LogisticRegression(max_iter=500).fit(X[:150], y[:150]))),
        ("nb", FrozenEstimator(GaussianNB().fit(X[:150], y[:150]))),
        ("tree", FrozenEstimator(DecisionTreeClassifier(max_depth=3, random_state=0)
                                 .fit(X[:150], y[:150]))),
    ]
    return pool, X, y


def _fit_pair(monkeypatch, n_classes, **params):
    pool, X, y = _pool_and_rows(n_classes)
    fits = []
    for flag in (False, True):
        monkeypatch.setattr(analytic, "ANALYTIC", flag)
        fits.append(AggregatedClassifier(pool, **{"aggregator": "stacking", **params},
                                         random_state=0).fit(X[150:], y[150:]))
    return fits, X[:150]


@pytest.mark.parametrize(
    "n_classes, params",
    [(3, {}), (5, {}), (5, {"aggregator": Stacking(passthrough=True)}), (2, {})],
    ids=["newton", "lbfgs-cg", "passthrough", "binary"],
)
def test_whole_fit_matches_autograd(monkeypatch, n_classes, params):
    """Same tuned hyperparameters, validation loss and predictions with and without
    the closed form (the inner solves stop at the same tolerances, so not bit for bit)."""
    (plain, fast), X_test = _fit_pair(monkeypatch, n_classes, **params)
    assert len(plain.tuning_history_) == len(fast.tuning_history_)
    assert fast.validation_loss_ == pytest.approx(plain.validation_loss_, rel=1e-4)
    for name, value in plain.hyperparams_.items():
        np.testing.assert_allclose(np.log(fast.hyperparams_[name]), np.log(value), atol=1e-2)
    np.testing.assert_allclose(fast.predict_proba(X_test), plain.predict_proba(X_test),
                               atol=1e-3)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_newton_blocks_in_low_precision(monkeypatch, n_classes):
    """Classifiers' Newton blocks come from a float32 copy of the design: within
    float32 rounding (and the small Levenberg shift) of the exact blocks, which
    the direct solves keep; a Newton solve with them reaches the same optimum."""
    full, ctx = _data("classification", n_classes, True)
    agg = Stacking(passthrough=True)
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), space)
    assert joint.newton_hessian is not None
    # A problem whose solution is the model (the refit) keeps exact Newton steps.
    single, _, _ = make_problem(agg, ctx, full, None, space)
    assert single.inner_hessian is not None and single.newton_hessian is None
    gen = torch.Generator().manual_seed(3)
    theta = 0.3 * torch.randn(joint.theta0.numel(), generator=gen, dtype=DT)
    h = space.initial()
    exact, low = joint.inner_hessian(theta, h), joint.newton_hessian(theta, h)
    assert low.dtype == exact.dtype == DT
    scale = exact.diagonal(dim1=1, dim2=2).abs().amax()
    assert float((low - exact).abs().max()) <= 1e-5 * float(scale)
    assert float((low - exact).abs().max()) > 0  # not the exact blocks after all
    theta_low, _, ok_low = solve_inner(joint, h, joint.theta0, tol=1e-10, solver="newton")
    joint.newton_hessian = None
    theta_exact, _, ok_exact = solve_inner(joint, h, joint.theta0, tol=1e-10, solver="newton")
    assert ok_low and ok_exact
    # The same optimum up to the logits' common shift (the intercepts'), which
    # nothing penalises: compared with each row's mean over the classes removed.
    def centred(t):
        t = t.reshape(5, -1, n_classes)
        return t - t.mean(-1, keepdim=True)

    torch.testing.assert_close(centred(theta_low), centred(theta_exact), rtol=0, atol=1e-8)
    # Off: regressors, float32 designs, and the switch.
    monkeypatch.setattr(analytic, "LOW_PRECISION_BLOCKS", False)
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), space)
    assert joint.newton_hessian is None
    monkeypatch.setattr(analytic, "LOW_PRECISION_BLOCKS", True)
    full, ctx = _data("regression", 1, True)
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    assert make_fold_problems(agg, ctx, _folds(full), space)[0].newton_hessian is None


class _UnbatchedStacking(Stacking):
    """The same penalty through ``.item()``, which ``torch.func.vmap`` refuses."""

    def penalty(self, params, hyper):
        pen = super().penalty(params, hyper)
        return pen * (1.0 + 0.0 * float(params["intercept"].sum().item() != 0))


@pytest.mark.parametrize("agg", [Stacking(), _UnbatchedStacking()], ids=["batched", "fallback"])
def test_mixed_product_by_polarization_equals_autograd(agg):
    """The mixed product of a quadratic penalty from its values at theta +- s v
    (batched over folds), or fold by fold where the penalty does not batch:
    autograd's second-order product, also with v far larger than theta."""
    full, ctx = _data("classification", 3, True)
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), space)
    plain = _plain(joint)
    gen = torch.Generator().manual_seed(5)
    theta = 1e-3 * torch.randn(joint.theta0.numel(), generator=gen, dtype=DT)
    u = space.initial() + 0.5
    for v in (torch.randn(theta.numel(), generator=gen, dtype=DT),
              1e4 * torch.randn(theta.numel(), generator=gen, dtype=DT)):
        with torch.enable_grad():
            th, hh = theta.clone().requires_grad_(True), u.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(plain.inner_loss(th, hh), th, create_graph=True)
            (want,) = torch.autograd.grad((g * v).sum(), hh)
        got = joint.mixed_product(theta, u, v)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    assert torch.equal(joint.mixed_product(theta, u, torch.zeros_like(theta)), torch.zeros_like(u))


def test_a_closed_form_checked_once_is_not_checked_again_for_the_same_configuration(monkeypatch):
    import aggregators._bilevel as bilevel

    X, y = make_classification(300, 6, n_informative=4, n_classes=3, random_state=0)
    pool = [("lr", FrozenEstimator(LogisticRegression(max_iter=500).fit(X[:150], y[:150]))),
            ("nb", FrozenEstimator(GaussianNB().fit(X[:150], y[:150])))]
    calls = []
    real = analytic._match_autograd
    monkeypatch.setattr(analytic, "_match_autograd",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(bilevel, "_CHECKED", set())

    def fit(**params):
        calls.clear()
        est = AggregatedClassifier(pool, aggregator=Stacking(**params), random_state=0,
                                   max_outer_iter=2).fit(X[150:], y[150:])
        return len(calls), est.predict_proba(X[:20])

    first, p1 = fit()
    again, p2 = fit()
    assert first > 0 and again == 0
    np.testing.assert_array_equal(p1, p2)
    # Another configuration, or a method patched on the class, is checked anew.
    assert fit(per_model_l2=False)[0] > 0
    penalty = Stacking.penalty
    monkeypatch.setattr(Stacking, "penalty", lambda self, *a: penalty(self, *a))
    assert fit()[0] > 0
