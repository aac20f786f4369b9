"""Preconditioned inner solves and hypergradients (issue 20): the block-Jacobi
preconditioner of linear-design problems and the reuse of a Newton step's
factors change how fast the solvers converge, never where to."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import aggregators._analytic as analytic
import aggregators.hypergrad._implicit as implicit
from aggregators import AggregatedClassifier, Stacking
from aggregators._bilevel import HyperSpace, make_fold_problems
from aggregators.hypergrad import implicit_hypergradient, solve_inner
from aggregators.hypergrad._implicit import conjugate_gradient
from aggregators.hypergrad._lbfgs import lbfgs
from aggregators.hypergrad._newton import newton_solve
from test_analytic import _data, _folds, _pool_and_rows

DT = torch.float64


def _spd(n: int, cond: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return Q @ torch.diag(torch.logspace(0, np.log10(cond), n, dtype=DT)) @ Q.T


def test_preconditioned_cg_solves_the_same_system_per_block():
    A1, A2 = _spd(12, 1e6, 0), _spd(8, 1e4, 1)
    A = torch.block_diag(A1, A2)
    b = torch.randn(20, generator=torch.Generator().manual_seed(2), dtype=DT)
    want = torch.linalg.solve(A, b)
    # A rough preconditioner: the inverse of a perturbed diagonal-scaled copy.
    M = torch.linalg.inv(A + 0.05 * torch.diag(A.diagonal()))
    x, n_pre, res = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=500,
                                       blocks=(12, 8), precond=lambda r: M @ r)
    assert res <= 1e-12
    torch.testing.assert_close(x, want, rtol=1e-8, atol=1e-8)
    _, n_plain, _ = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=500,
                                       blocks=(12, 8))
    assert n_pre < n_plain


def test_preconditioned_lbfgs_reaches_the_same_minimum():
    A = _spd(30, 1e4, 3)
    b = torch.randn(30, generator=torch.Generator().manual_seed(4), dtype=DT)

    def fun_grad(x):
        return 0.5 * x @ A @ x - b @ x, A @ x - b

    want = torch.linalg.solve(A, b)
    M = torch.linalg.inv(A + 0.1 * torch.diag(A.diagonal()))
    x0 = torch.zeros(30, dtype=DT)
    x, n_pre, ok = lbfgs(fun_grad, x0, tol=1e-6, max_iter=2000, precond=lambda v: M @ v)
    assert ok
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    # Unpreconditioned, the same solve takes several times as many iterations.
    _, n_plain, _ = lbfgs(fun_grad, x0, tol=1e-6, max_iter=2000)
    assert 3 * n_pre < n_plain


def _stacking_joint(n_classes=4, m=3):
    full, ctx = _data("classification", n_classes, True, n=120, m=m)
    agg = Stacking()
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), space)
    h = space.initial() + torch.linspace(-3.0, 1.0, space.initial().numel(), dtype=DT)
    return joint, h


def test_stacking_block_jacobi_preconditioner():
    joint, h = _stacking_joint()
    assert joint.inner_preconditioner is not None
    theta, _, ok = solve_inner(joint, h, joint.theta0, tol=1e-8, max_iter=5000,
                               solver="lbfgs")
    assert ok
    apply = joint.inner_preconditioner(theta, h)
    # Symmetric positive definite, as conjugate gradient needs.
    n = theta.numel()
    M = torch.stack([apply(e) for e in torch.eye(n, dtype=DT)], 1)
    torch.testing.assert_close(M, M.T, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(0.5 * (M + M.T)).min() > 0
    # The same solution and hypergradient as the unpreconditioned solvers.
    saved = joint.inner_preconditioner
    got = implicit_hypergradient(joint, theta, h, solver="cg", tol=1e-12, max_iter=2000)
    assert got.info["preconditioned"]
    joint.inner_preconditioner = None
    try:
        theta_plain, _, _ = solve_inner(joint, h, joint.theta0, tol=1e-8, max_iter=5000,
                                        solver="lbfgs")
        want = implicit_hypergradient(joint, theta, h, solver="cg", tol=1e-12, max_iter=2000)
    finally:
        joint.inner_preconditioner = saved
    assert not want.info["preconditioned"]
    # A softmax's intercepts may all move together: the losses, not the
    # parameters, are what both solves must agree on.
    torch.testing.assert_close(joint.inner_value_grad(theta, h)[0],
                               joint.inner_value_grad(theta_plain, h)[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(joint.outer_loss(theta, h), joint.outer_loss(theta_plain, h),
                               rtol=1e-7, atol=0)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-12)


def test_newton_factor_serves_the_hypergradient():
    joint, h = _stacking_joint(n_classes=4)
    theta, _, ok = newton_solve(joint, h, joint.theta0, tol=1e-10)
    assert ok and joint.newton_factor is not None
    got = implicit_hypergradient(joint, theta, h, solver="direct", tol=1e-12)
    assert got.info.get("newton_factor")
    joint.newton_factor = None  # the blocks formed at the solution instead
    want = implicit_hypergradient(joint, theta, h, solver="direct", tol=1e-12)
    assert not want.info.get("newton_factor")
    # To the direct solve's own error: it damps the Hessian by 1e-10 of its
    # scale where the softmax's intercepts leave it singular.
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-7, atol=1e-12)
    # Factors of another h are not used.
    newton_solve(joint, h + 0.5, joint.theta0, tol=1e-10)
    other = implicit_hypergradient(joint, theta, h, solver="direct", tol=1e-12)
    assert not other.info.get("newton_factor")


@pytest.mark.parametrize("n_classes", [3, 5], ids=["newton", "lbfgs-cg"])
def test_tuned_fit_unchanged_by_the_speed_ups(monkeypatch, n_classes):
    """Stacking's tuned fit with the preconditioner and the Newton factors reaches
    the validation loss and predictions of the plain solvers (the inexact
    solves stop at the same tolerances, so not bit for bit)."""
    pool, X, y = _pool_and_rows(n_classes)
    fits = []
    for on in (False, True):
        monkeypatch.setattr(analytic, "PRECONDITION", on)
        monkeypatch.setattr(implicit, "NEWTON_FACTOR_MAX_ITER", 8 if on else 0)
        fits.append(AggregatedClassifier(pool, aggregator="stacking", random_state=0)
                    .fit(X[150:], y[150:]))
    plain, fast = fits
    assert fast.validation_loss_ == pytest.approx(plain.validation_loss_, rel=1e-4)
    np.testing.assert_allclose(fast.predict_proba(X[:150]), plain.predict_proba(X[:150]),
                               atol=1e-3)
