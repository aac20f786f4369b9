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


def _closed_form_problem(agg, weights=None):
    """Regression stacking's closed-form K-fold problem on small generated data."""
    from sklearn.datasets import make_regression
    from sklearn.model_selection import KFold

    from aggregators._base import AggregationContext
    from aggregators._bilevel import Split, make_linear_cv_problem

    X, y = make_regression(150, 4, noise=10.0, random_state=0)
    rng = np.random.default_rng(0)
    # Three "base models": the target with noise of different sizes.
    Z = y[:, None] + rng.normal(size=(150, 3)) * np.array([5.0, 20.0, 60.0])
    Z, yy = (Z - y.mean()) / y.std(), (y - y.mean()) / y.std()
    dt = torch.float64
    full = Split(
        torch.as_tensor(Z[:, :, None], dtype=dt), torch.as_tensor(yy[:, None], dtype=dt),
        torch.as_tensor(X, dtype=dt),
        None if weights is None else torch.as_tensor(weights, dtype=dt),
    )
    ctx = AggregationContext(
        task="regression", n_models=3, n_outputs=1, n_features=4, model_names=["a", "b", "c"],
        classes=None, device=torch.device("cpu"), dtype=dt,
        generator=torch.Generator().manual_seed(0), n_train=120,
    )
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), dt)
    splits = list(KFold(5, shuffle=True, random_state=0).split(X))
    problem, solutions, _, reason = make_linear_cv_problem(agg, ctx, full, splits, space)
    assert problem is not None, reason
    return problem, solutions, space, (ctx, full)


@pytest.mark.parametrize("passthrough", [False, True], ids=["stacking", "passthrough"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_closed_form_hypergradient_equals_autograd(passthrough, weighted):
    """The K-fold closed form's value and adjoint hypergradient (what the tuner
    uses) equal autograd through its factorisation, at several hyperparameters."""
    from aggregators import Stacking
    from aggregators.hypergrad._tuner import _direct_hypergradient
    from aggregators.hypergrad import BilevelProblem

    weights = np.random.default_rng(1).uniform(0.2, 2.0, 150) if weighted else None
    problem, _, space, _ = _closed_form_problem(Stacking(passthrough=passthrough), weights)
    assert problem.outer_value_grads is not None
    autograd = BilevelProblem(problem.inner_loss, problem.outer_loss, problem.theta0)
    u0 = space.initial()
    for shift in (-3.0, 0.0, 2.5):
        u = u0 + shift + torch.linspace(-1.0, 1.0, u0.numel(), dtype=u0.dtype)
        got = _direct_hypergradient(problem, problem.theta0, u)
        want = _direct_hypergradient(autograd, problem.theta0, u)
        assert float(got.value) == pytest.approx(float(want.value), rel=1e-12)
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-14)
        assert not got.grad.requires_grad and not got.value.requires_grad
    # On the CPU with an L2 weight per coefficient: numpy on the host served.
    assert problem.outer_value_grads.on_host is True


# The dense penalty's Hessian goes through torch.func, which warns of its own internals.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_closed_form_dense_penalty_keeps_the_torch_step():
    """A penalty coupling two coefficients (a dense R) is not served on the host:
    the torch step serves, with the same value and hypergradient as autograd."""
    from aggregators import Stacking
    from aggregators.hypergrad import BilevelProblem
    from aggregators.hypergrad._tuner import _direct_hypergradient

    class Coupled(Stacking):
        def penalty(self, params, hyper):
            coef = params["coef"]
            return super().penalty(params, hyper) + 0.5 * hyper["l2"][0] * (
                coef[0] - coef[1]
            ).pow(2).sum()

    problem, solutions, space, _ = _closed_form_problem(Coupled())
    assert solutions.penalty_kind == "dense"
    autograd = BilevelProblem(problem.inner_loss, problem.outer_loss, problem.theta0)
    u = space.initial() + torch.linspace(-1.0, 1.0, space.initial().numel(), dtype=torch.float64)
    got = _direct_hypergradient(problem, problem.theta0, u)
    want = _direct_hypergradient(autograd, problem.theta0, u)
    assert problem.outer_value_grads.on_host is False
    assert float(got.value) == pytest.approx(float(want.value), rel=1e-12)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-14)


def test_refit_from_a_wrong_warm_start_solves_with_closed_form_derivatives():
    """A warm start announced as the closed-form fit but not one (its gradient
    above the tolerance) is solved from, with the closed-form derivatives
    attached, and lands on the closed-form fit."""
    from aggregators import Stacking
    from aggregators._bilevel import linear_full_fit
    from aggregators._fit import _refit

    agg = Stacking()
    _, solutions, space, (ctx, full) = _closed_form_problem(agg)
    u = space.initial()
    fit = linear_full_fit(agg, ctx, full, space, u, like=solutions)
    specs = agg.hyperparameters(ctx)
    kept, problem = _refit(agg, ctx, full, space, specs, u, fit, 200, warm_is_fit=True)
    assert problem.inner_value_grad is None  # kept: no closed-form derivatives attached
    solved, problem = _refit(
        agg, ctx, full, space, specs, u, torch.zeros_like(fit), 200, warm_is_fit=True
    )
    assert problem.inner_value_grad is not None  # solved: attached for the solve
    for name, value in kept.params_.items():
        np.testing.assert_allclose(solved.params_[name], value, rtol=1e-6, atol=1e-8)


def test_pool_checks_each_frozen_model_once(monkeypatch):
    """fit_pool checks a frozen scikit-learn model is fitted once, not again in
    its prediction; an unfitted one is still an error naming it."""
    import base_models._sklearn as sk
    from sklearn.linear_model import Ridge

    from base_models import fit_pool
    from base_models._base import UnfittedBaseModelError

    X = np.random.default_rng(0).normal(size=(40, 3))
    y = X @ np.array([1.0, -2.0, 0.5])
    pool = [("a", FrozenEstimator(Ridge().fit(X, y))),
            ("b", FrozenEstimator(LinearRegression().fit(X, y)))]
    calls = []
    check = sk.is_fitted_estimator
    monkeypatch.setattr(sk, "is_fitted_estimator", lambda e: calls.append(e) or check(e))
    out = fit_pool(pool, X, y, task="regression", n_outputs=1)
    assert len(calls) == 2
    np.testing.assert_allclose(out.outputs[:, :, 0], np.column_stack(
        [m.predict(X) for _, m in pool]))
    with pytest.raises(UnfittedBaseModelError, match="'c'"):
        fit_pool([*pool, ("c", FrozenEstimator(Ridge()))], X, y, task="regression",
                 n_outputs=1)


def test_refit_reuses_the_folds_closed_form_check(monkeypatch):
    """Classification stacking: the folds' closed-form derivatives are checked
    against autograd; the refit on all rows gets them without a second check,
    and fits what it fitted with the check."""
    from sklearn.datasets import make_classification
    from sklearn.naive_bayes import GaussianNB

    import aggregators._bilevel as bilevel
    from aggregators import AggregatedClassifier

    X, y = make_classification(200, 5, n_informative=3, n_classes=3, random_state=0)
    pool = [("lr", FrozenEstimator(LogisticRegression(max_iter=300).fit(X, y))),
            ("nb", FrozenEstimator(GaussianNB().fit(X, y)))]
    checks = []
    attach = bilevel.attach_linear_derivatives

    def recording(*args, check=True, **kwargs):
        out = attach(*args, check=check, **kwargs)
        checks.append((check, out))
        return out

    monkeypatch.setattr(bilevel, "attach_linear_derivatives", recording)
    # As in a fresh process: no configuration checked before.
    monkeypatch.setattr(bilevel, "_CHECKED", set())
    make = lambda: AggregatedClassifier(  # noqa: E731
        pool, aggregator="stacking", max_outer_iter=2, random_state=0).fit(X, y)
    fast = make()
    assert checks == [(True, ""), (False, "")]  # the folds', then the refit's
    monkeypatch.setattr(
        bilevel, "attach_linear_derivatives",
        lambda *a, check=True, **k: attach(*a, check=True, **k),
    )
    checked = make()
    for name, value in checked.aggregator_.params_.items():
        np.testing.assert_array_equal(fast.aggregator_.params_[name], value)


def test_check_points_are_distinct():
    """Closed forms are checked at the start and the box's ends, each point once."""
    from aggregators._bilevel import _check_points

    spec = Hyperparameter("l2", np.ones(2), 1e-4, 1e4, size=2)
    tuned = HyperSpace([spec], {}, torch.device("cpu"), torch.float64)
    assert len(_check_points(tuned)) == 3
    fixed = HyperSpace([spec], {"l2": np.ones(2)}, torch.device("cpu"), torch.float64)
    assert len(_check_points(fixed)) == 1


def test_vjp_equals_grad_outputs_without_importing_sympy():
    """The engine's vector-Jacobian products (conjugate-gradient Hessian
    products, mixed products) skip ``grad_outputs``' shape check, whose first
    call in a process imports SymPy: a fresh process's first hypergradient
    paid that import."""
    import subprocess
    import sys

    from aggregators.hypergrad._problem import vjp

    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    g = torch.autograd.grad((x**3).sum() + (x[:3] * x[3:]).sum(), x, create_graph=True)[0]
    v = torch.randn(6, dtype=torch.float64)
    (ours,) = vjp(g, x, v, retain_graph=True)
    (ref,) = torch.autograd.grad(g, x, grad_outputs=v)
    assert torch.equal(ours, ref)

    code = (
        "import sys, torch\n"
        "from aggregators.hypergrad._problem import vjp\n"
        "before = 'sympy' in sys.modules\n"
        "x = torch.randn(4, dtype=torch.float64, requires_grad=True)\n"
        "g = torch.autograd.grad((x ** 3).sum(), x, create_graph=True)[0]\n"
        "vjp(g, x, torch.ones(4, dtype=torch.float64))\n"
        "print(before, 'sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    if out[0] == "True":
        pytest.skip("this torch imports SymPy on import")
    assert out == ["False", "False"]
