"""Every hypergradient method of :data:`aggregators.hypergrad.METHODS`, float64.

The reference is ridge regression, whose inner optimum and hypergradient have
closed forms (``../shared/FORMULAS.md``): ``theta*(lam) = (X^T X + lam I)^{-1} X^T y``
and ``dQ/dlam = -grad_theta Q^T (X^T X + lam I)^{-1} theta*`` (per feature with
one lambda per feature; ``h = log lam``). Its Hessian ``A = X^T X + diag(lam)``
does not depend on ``theta`` and its mixed derivative ``d2L / dtheta dh_i =
lam_i theta_i e_i`` is linear in ``theta``, so the approximate methods' answers
have closed forms too, and their errors are checked against those: the
errors are the ones theory predicts, of the right size, shrinking the way
theory says (more steps, more terms, a better-conditioned Hessian, a
straighter trajectory, a tighter tolerance).

The exact methods (implicit CG, HOAG at convergence, reverse and forward mode
over many steps, the DARTS difference inside CG) match the closed form
tightly. Forward and reverse mode agree to 1e-10 on the same trajectory, on
ridge and on logistic stacking. Finally every method runs as the ``tuner`` of
an ``AggregatedClassifier``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from aggregators import AggregatedClassifier, LearnedWeights, Stacking
from aggregators._base import AggregationContext
from aggregators._bilevel import HyperSpace, Split, make_problem
from aggregators.hypergrad import (
    METHODS,
    BilevelProblem,
    darts_hypergradient,
    drmad_hypergradient,
    fd_mixed_product,
    forward_hypergradient,
    greedy_hypergradient,
    hoag_hypergradient,
    hoag_tolerance,
    hypergradient,
    implicit_hypergradient,
    reverse_hypergradient,
    solve_inner,
    tune,
)
from aggregators.hypergrad import _tuner
from aggregators.hypergrad._problem import outer_grads
from _ridge import Ridge, rel_err  # tests/_ridge.py (tests/ is on pytest's pythonpath)

DT = torch.float64


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge()


H_SCALAR = torch.tensor([0.7], dtype=DT)
H_VECTOR = torch.linspace(-1.0, 2.0, 10, dtype=DT)
H_CASES = [pytest.param(H_SCALAR, id="scalar"), pytest.param(H_VECTOR, id="per-feature")]


# -- the exact methods -----------------------------------------------------------------
@pytest.mark.parametrize("h", H_CASES)
@pytest.mark.parametrize(
    "method, options, start, tol",
    [
        ("implicit-cg", {}, "optimum", 1e-10),
        ("hoag", {"iteration": 10_000}, "optimum", 1e-10),  # eps_k below the floor
        ("darts-fd", {"solver": "cg"}, "optimum", 1e-9),  # dL/dh quadratic in theta
        ("reverse", {"n_steps": 600}, "zero", 1e-10),
        ("forward", {"n_steps": 600}, "zero", 1e-10),
    ],
)
def test_exact_methods_match_closed_form(ridge, h, method, options, start, tol):
    theta = ridge.theta_star(h) if start == "optimum" else ridge.problem.theta0
    assert METHODS[method] == (start == "optimum")
    res = hypergradient(ridge.problem, theta, h, method, **options)
    assert res.grad.shape == h.shape
    assert rel_err(res.grad, ridge.hypergrad(h)) <= tol
    assert float(res.value) == pytest.approx(float(ridge.outer(ridge.theta_star(h), h)), rel=1e-9)


# -- forward mode ------------------------------------------------------------------------
@pytest.mark.parametrize("h", H_CASES)
def test_forward_equals_reverse_on_the_same_trajectory(ridge, h):
    """Short trajectories, far from converged: the hypergradient of T steps."""
    for n_steps, lr in [(2, 0.01), (7, 0.005), (30, None)]:
        rev = reverse_hypergradient(ridge.problem, ridge.problem.theta0, h, n_steps=n_steps, lr=lr)
        fwd = forward_hypergradient(ridge.problem, ridge.problem.theta0, h, n_steps=n_steps, lr=lr)
        assert rel_err(fwd.grad, rev.grad) <= 1e-10
        assert rel_err(fwd.theta, rev.theta) <= 1e-12
        assert fwd.info["lr"] == rev.info["lr"]
        # ... which is not yet the hypergradient of theta*.
        assert rel_err(fwd.grad, ridge.hypergrad(h)) > 1e-3


@pytest.fixture(scope="module")
def pool_problem(cancer_pool):
    """Logistic stacking / learned weights over the pretrained pool's probabilities."""
    d = cancer_pool
    Z = np.stack([m.predict_proba(d.X_agg) for m in d.pool.values()], axis=1)
    idx = np.random.RandomState(0).permutation(len(d.y_agg))
    tr, va = idx[: len(idx) // 2], idx[len(idx) // 2 :]
    Zt, yt = torch.as_tensor(Z, dtype=DT), torch.as_tensor(d.y_agg)
    ctx = AggregationContext(
        task="classification", n_models=Z.shape[1], n_outputs=2, n_features=d.X_agg.shape[1],
        model_names=list(d.pool), classes=np.arange(2),
    )

    def build(agg):
        space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
        prob, _, _ = make_problem(agg, ctx, Split(Zt[tr], yt[tr]), Split(Zt[va], yt[va]), space)
        return prob, space.initial()

    return build


@pytest.mark.parametrize(
    "agg", [Stacking(l2=[1e-2, 1e-1, 1e-3, 3e-2, 1e-2]), LearnedWeights(temperature=0.7)],
    ids=["stacking", "weights"],
)
def test_forward_equals_reverse_on_aggregators(pool_problem, agg):
    """A non-quadratic inner loss (Hessian varying along the path), and for
    the weights a hyperparameter (temperature) inside the data term."""
    prob, h = pool_problem(agg)
    rev = reverse_hypergradient(prob, prob.theta0, h, n_steps=25)
    fwd = forward_hypergradient(prob, prob.theta0, h, n_steps=25)
    assert rel_err(fwd.grad, rev.grad) <= 1e-10
    assert float(rev.grad.norm()) > 1e-3


# -- truncated reverse and Neumann: the error of truncation ---------------------------------
@pytest.mark.parametrize(
    "h",
    # A scalar away from the validation optimum (near it dQ/dh ~ 0 and
    # relative errors mean little).
    [pytest.param(torch.tensor([-1.0], dtype=DT), id="scalar"), pytest.param(H_VECTOR, id="per-feature")],
)
def test_truncated_reverse_error_is_the_neumann_remainder(ridge, h):
    """From theta*, K steps give ``H^{-1}`` up to the remainder ``H^{-1} (I - lr H)^K``.

    So the error is ``B^T H^{-1} (I - lr H)^K grad Q``: checked exactly, and
    it shrinks with K (geometrically, at the rate ``1 - lr mu_min`` of the
    slowest direction, once that dominates). Neumann with ``n_terms`` sums
    K = n_terms + 1 powers: the same remainder.
    """
    theta = ridge.theta_star(h)
    A = ridge.hessian(h)
    lr = 1.0 / ridge.lam_max(h)
    M = torch.eye(ridge.p, dtype=DT) - lr * A
    g_q = ridge.grad_theta_q(theta)
    exact = ridge.hypergrad(h)
    errs = []
    for k in (1, 5, 20, 100, 200):
        predicted = ridge.mixed_t(
            theta, h, torch.linalg.solve(A, torch.linalg.matrix_power(M, k) @ g_q)
        )
        for got in (
            hypergradient(ridge.problem, theta, h, "truncated-reverse", n_steps=k, lr=lr).grad,
            hypergradient(ridge.problem, theta, h, "implicit-neumann", n_terms=k - 1, alpha=lr).grad,
        ):
            assert float((got - exact - predicted).norm()) <= 1e-9 * float(exact.norm())
        errs.append(rel_err(got, exact))
    assert errs[0] > 0.5  # one step is far off at condition number ~17 ...
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3  # ... and the error decays with K


# -- T1-T2 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", H_CASES)
def test_t1_t2_is_inverse_hessian_times_lr(ridge, h):
    """At theta*, T1-T2 is the implicit formula with ``H^{-1} -> lr I``: checked
    exactly, and it is one-step truncated reverse (and DARTS' one-step with an
    exact difference here, dL/dh being quadratic in theta)."""
    theta = ridge.theta_star(h)
    lr = 0.5 / ridge.lam_max(h)
    res = hypergradient(ridge.problem, theta, h, "t1-t2", lr=lr)
    expected = -lr * ridge.mixed_t(theta, h, ridge.grad_theta_q(theta))
    assert rel_err(res.grad, expected) <= 1e-12
    one_step = hypergradient(ridge.problem, theta, h, "truncated-reverse", n_steps=1, lr=lr)
    assert rel_err(res.grad, one_step.grad) <= 1e-12
    darts = hypergradient(ridge.problem, theta, h, "darts-fd", lr=lr)
    assert rel_err(darts.grad, res.grad) <= 1e-9
    # It is biased: far from the hypergradient at this conditioning (~17).
    assert rel_err(res.grad, ridge.hypergrad(h)) > 0.3


def test_t1_t2_bias_shrinks_with_the_condition_number():
    """The bias is ``H^{-1} - lr I``: zero for ``H = I / lr``, growing with the
    spread of the Hessian's eigenvalues (default ``lr = 1 / lambda_max``)."""
    h = torch.tensor([0.0], dtype=DT)  # one shared lambda: the Hessian is X^T X + I
    errs = []
    for s_min in (5.0, 8.0, 9.0, 9.5, 10.0):  # condition numbers 3.9, 1.6, 1.2, 1.1, 1
        r = Ridge(s_min=s_min, s_max=10.0)
        res = greedy_hypergradient(r.problem, r.theta_star(h), h)
        errs.append(rel_err(res.grad, r.hypergrad(h)))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 0.3
    # Equal singular values: H = (100 + lam) I, and lr = 1 / lambda_max (exact
    # by power iteration on a multiple of I) make T1-T2 exact.
    assert errs[-1] <= 1e-10


# -- DrMAD ------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", H_CASES)
def test_drmad_is_reverse_along_the_straight_line(ridge, h):
    """DrMAD equals the closed-form reverse pass with the mixed derivatives
    taken on the straight line (ridge's Hessian is constant, so only those move)."""
    n_steps, lr = 60, 1.0 / ridge.lam_max(h)
    theta0 = ridge.problem.theta0
    thetas = ridge.trajectory(theta0, h, lr, n_steps)
    end = thetas[-1]
    line = [theta0 + (t / n_steps) * (end - theta0) for t in range(n_steps)]
    res = drmad_hypergradient(ridge.problem, theta0, h, n_steps=n_steps, lr=lr)
    assert rel_err(res.grad, ridge.unrolled(line, h, lr, end)) <= 1e-10
    # The same reverse pass over the stored iterates is reverse mode.
    stored = drmad_hypergradient(ridge.problem, theta0, h, n_steps=n_steps, lr=lr, trajectory="stored")
    rev = reverse_hypergradient(ridge.problem, theta0, h, n_steps=n_steps, lr=lr)
    assert rel_err(stored.grad, rev.grad) <= 1e-12
    assert rel_err(rev.grad, ridge.unrolled(thetas[:-1], h, lr, end)) <= 1e-10
    # The straight-line assumption costs accuracy from a cold start.
    assert rel_err(res.grad, rev.grad) > 1e-4


@pytest.mark.parametrize("h", H_CASES)
def test_drmad_error_shrinks_as_the_path_straightens(ridge, h):
    """From ``theta* + s d`` the path's curvature, hence DrMAD's error against
    reverse mode on the same steps, is proportional to ``s``; zero at ``s = 0``."""
    n_steps = 200
    star = ridge.theta_star(h)
    d = torch.linspace(-1.0, 1.0, ridge.p, dtype=DT)
    errs = []
    for s in (1.0, 0.1, 0.01, 0.0):
        theta0 = star + s * d
        lr = 1.0 / ridge.lam_max(h)
        dr = drmad_hypergradient(ridge.problem, theta0, h, n_steps=n_steps, lr=lr)
        rev = reverse_hypergradient(ridge.problem, theta0, h, n_steps=n_steps, lr=lr)
        errs.append(rel_err(dr.grad, rev.grad))
    assert errs[0] > 1e-3
    assert errs[1] == pytest.approx(0.1 * errs[0], rel=0.2)
    assert errs[2] == pytest.approx(0.01 * errs[0], rel=0.2)
    assert errs[3] <= 1e-12


def test_drmad_ballpark_from_a_cold_start(ridge):
    """From theta0 = 0 over 1000 steps the error against the closed form is
    the straight-line error (the trajectory has converged): a few per cent
    at most here, far above reverse mode's."""
    h = H_VECTOR
    dr = drmad_hypergradient(ridge.problem, ridge.problem.theta0, h, n_steps=1000)
    err = rel_err(dr.grad, ridge.hypergrad(h))
    assert 1e-4 < err < 5e-2, err


# -- DARTS' finite difference -------------------------------------------------------------------
def test_fd_mixed_product_second_order_accuracy(pool_problem):
    """LearnedWeights: the temperature is inside the data term, so ``dL/dh`` is
    not quadratic in theta and the central difference has an ``O(eps^2)`` error."""
    prob, h = pool_problem(LearnedWeights(temperature=0.7, l2=1e-2, entropy=1e-3))
    theta, _, _ = solve_inner(prob, h, max_iter=2000, tol=1e-10)
    _, v, _ = outer_grads(prob, theta, h)
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        hh = h.detach().requires_grad_(True)
        g = prob.inner_grad(th, hh, create_graph=True)
        (exact,) = torch.autograd.grad(g, hh, grad_outputs=v)
    errs = [rel_err(fd_mixed_product(prob, theta, h, v, eps), exact) for eps in (0.4, 0.1, 0.025)]
    assert errs[0] > 1e-6  # the difference error is visible ...
    assert errs[1] == pytest.approx(errs[0] / 16, rel=0.3)  # ... and second order
    assert errs[2] == pytest.approx(errs[1] / 16, rel=0.3)
    assert errs[2] < 1e-3  # ~2e-5 at DARTS' eps = 0.01
    assert torch.all(fd_mixed_product(prob, theta, h, torch.zeros_like(v)) == 0)


def test_darts_inside_cg_matches_implicit_cg(pool_problem):
    prob, h = pool_problem(LearnedWeights(temperature=0.7, l2=1e-2, entropy=1e-3))
    theta, _, _ = solve_inner(prob, h, max_iter=2000, tol=1e-10)
    ref = implicit_hypergradient(prob, theta, h, solver="cg", max_iter=500, tol=1e-12)
    errs = [
        rel_err(darts_hypergradient(prob, theta, h, solver="cg", eps=eps, tol=1e-12).grad, ref.grad)
        for eps in (0.1, 0.01)
    ]
    assert errs[1] < errs[0] and errs[1] <= 1e-5, errs


# -- HOAG -------------------------------------------------------------------------------------
def test_hoag_tolerance_sequence():
    eps = [hoag_tolerance(k) for k in range(200)]
    assert eps[0] == 1e-4 and all(a > b for a, b in zip(eps, eps[1:]))
    assert sum(eps) < 1e-4 * np.pi**2 / 6 + 1e-15  # summable (polynomial, decay 2)
    geo = [hoag_tolerance(k, eps0=0.1, decay=0.5, schedule="geometric") for k in range(4)]
    assert geo == pytest.approx([0.1, 0.05, 0.025, 0.0125])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": 1.0}, "decay > 1"),
        ({"decay": 1.5, "schedule": "geometric"}, "0 < decay < 1"),
        ({"schedule": "harmonic"}, "schedule"),
        ({"eps0": 0.0}, "eps0"),
        ({"iteration": -1}, "iteration"),
    ],
)
def test_hoag_tolerance_rejects_bad_options(kwargs, match):
    kwargs = {"iteration": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        hoag_tolerance(kwargs.pop("iteration"), **kwargs)


def test_hoag_error_is_bounded_by_its_tolerance_and_vanishes():
    """A loose linear solve: ``||H v - b|| <= eps ||b||`` gives an error of at most
    ``||B|| ||H^{-1}|| eps ||b||``, and the error goes to zero as ``k`` grows."""
    r = Ridge(s_min=0.5, s_max=10.0, p=30, n=60)  # CG needs many iterations here
    h = torch.linspace(-1.0, 1.0, 30, dtype=DT)
    theta = r.theta_star(h)
    A = r.hessian(h)
    b = r.grad_theta_q(theta)
    B = torch.diag(r.lam(h) * theta)  # d2L / dtheta dh
    exact = r.hypergrad(h)
    errs = []
    for k in (0, 3, 30, 1000):
        res = hoag_hypergradient(r.problem, theta, h, iteration=k, eps0=0.1, solver="cg")
        eps = 0.1 * (k + 1) ** -2.0
        assert res.info["tol"] == max(eps, 1e-10) and res.info["residual"] <= res.info["tol"]
        bound = float(torch.linalg.matrix_norm(B, 2) / torch.linalg.eigvalsh(A)[0]) * res.info["tol"]
        err = float((res.grad - exact).norm() / b.norm())
        assert err <= bound
        errs.append(rel_err(res.grad, exact))
    assert errs[0] > 1e-4, errs  # inexact early ...
    # ... and small at k = 1000 (tol 1e-7): the last digits depend on the
    # BLAS's summation order, which changes with the number of threads.
    assert errs[-1] <= 1e-7, errs
    assert errs[0] > errs[2] > errs[3], errs


def test_tune_hoag_decreases_inner_tolerance(ridge, monkeypatch):
    """Inside ``tune`` HOAG's inner solves follow ``max(eps_k, inner_tol)``, the
    linear solves ``eps_k``; it still finds the optimum implicit-cg finds."""
    seen = []
    real = _tuner.solve_inner

    def spy(*args, **kwargs):
        seen.append(kwargs["tol"])
        return real(*args, **kwargs)

    monkeypatch.setattr(_tuner, "solve_inner", spy)
    common = dict(
        lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT),
        max_outer_iter=50, tol=1e-12,
    )
    res = tune([ridge.problem], torch.tensor([-3.0], dtype=DT), method="hoag", **common)
    n = len(res.history)
    assert seen == [max(hoag_tolerance(k), 1e-7) for k in range(n)]
    assert n >= 5 and seen[0] == 1e-4 and seen[-1] < seen[0] / 20
    seen.clear()
    ref = tune([ridge.problem], torch.tensor([-3.0], dtype=DT), method="implicit-cg", **common)
    assert set(seen) == {1e-7}  # the other methods keep one tolerance
    assert float(res.h) == pytest.approx(float(ref.h), abs=1e-3)


# -- bad options ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, options, match",
    [
        ("darts-fd", {"solver": "lu"}, "solver must be 'one-step' or 'cg'"),
        ("drmad", {"trajectory": "curved"}, "trajectory must be"),
        ("forward", {"lr": -1.0}, "lr must be positive"),
        ("implicit-cg", {"mixed": "numeric"}, "mixed must be"),
        ("hoag", {"decay": 0.5}, "decay > 1"),
    ],
)
def test_bad_method_options_raise(ridge, method, options, match):
    with pytest.raises(ValueError, match=match):
        hypergradient(ridge.problem, ridge.theta_star(H_SCALAR), H_SCALAR, method, **options)


# -- every method as an estimator's tuner -----------------------------------------------------
@pytest.mark.parametrize("tuner", list(METHODS))
def test_every_method_is_a_tuner(cancer_pool, frozen_pool, tuner):
    """Stacking's per-model L2 vector, tuned by each method for a few steps."""
    d = cancer_pool
    options = {"n_steps": 30} if not METHODS[tuner] else None
    est = AggregatedClassifier(
        frozen_pool, aggregator="stacking", tuner=tuner, tuner_options=options,
        max_outer_iter=3, cv=2, random_state=0,
    ).fit(d.X_agg, d.y_agg)
    hist = est.tuning_history_
    assert len(hist) >= 2 and np.isfinite(hist["hypergrad_norm"]).all()
    assert (hist["hypergrad_norm"] > 0).all()
    assert est.validation_loss_ == pytest.approx(hist["validation_loss"].min())
    assert est.validation_loss_ <= hist["validation_loss"].iloc[0]
    proba = est.predict_proba(d.X_test)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-10)
    assert log_loss(d.y_test, proba) < 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", list(METHODS))
def test_methods_on_cuda_match_cpu(ridge, method):
    """Same numbers on the GPU (float64), tensors kept there."""
    dev = torch.device("cuda")
    prob_gpu = BilevelProblem(
        lambda t, h: 0.5 * (ridge.X.to(dev) @ t - ridge.y.to(dev)).pow(2).sum()
        + 0.5 * (torch.exp(h) * t.pow(2)).sum(),
        lambda t, h: (ridge.Xv.to(dev) @ t - ridge.yv.to(dev)).pow(2).mean(),
        ridge.problem.theta0.to(dev),
    )
    h = H_VECTOR
    theta = ridge.theta_star(h) if METHODS[method] else ridge.problem.theta0
    opts = {"lr": 0.005} if method in ("reverse", "forward", "drmad", "t1-t2", "darts-fd") else {}
    cpu = hypergradient(ridge.problem, theta, h, method, **opts)
    gpu = hypergradient(prob_gpu, theta.to(dev), h.to(dev), method, **opts)
    assert gpu.grad.device.type == "cuda"
    assert rel_err(gpu.grad.cpu(), cpu.grad) <= 1e-8
