"""Correctness of the hypergradient engine (``aggregators.hypergrad``), float64.

References the engine is checked against:

* ridge regression, whose inner optimum and hypergradient have closed forms
  (``../shared/FORMULAS.md``: dQ/dlam = -grad_theta Q^T (X^T X + lam I)^{-1} theta*);
* dense linear algebra (``torch.linalg.solve``, the Neumann partial sum formed
  with explicit matrices);
* central finite differences of the outer loss at re-solved inner optima on
  logistic stacking / learned weights over real base-model probabilities;
* a dense grid search of the outer loss for :func:`tune`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aggregators import LearnedWeights, Stacking
from aggregators._base import AggregationContext
from aggregators._bilevel import HyperSpace, Split, make_problem
from aggregators.hypergrad import (
    METHODS,
    BilevelProblem,
    InnerDivergenceError,
    conjugate_gradient,
    hypergradient,
    implicit_hypergradient,
    lipschitz_estimate,
    neumann_series,
    reverse_hypergradient,
    solve_inner,
    tune,
)
from aggregators.hypergrad._problem import outer_grads
from _ridge import Ridge, rel_err  # tests/_ridge.py (tests/ is on pytest's pythonpath)

DT = torch.float64


# -- ridge regression with closed forms ------------------------------------------------
@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge()


H_SCALAR = [torch.tensor([v], dtype=DT) for v in (-1.0, 0.7, 3.0)]
H_VECTOR = torch.linspace(-1.0, 2.0, 10, dtype=DT)


def _h_cases():
    return [pytest.param(h, id=f"scalar{float(h):+.1f}") for h in H_SCALAR] + [
        pytest.param(H_VECTOR, id="per-feature")
    ]


def test_closed_form_reference_is_right(ridge):
    """The analytic reference equals autograd through the dense solve (and gradcheck passes)."""
    for h in [*H_SCALAR, H_VECTOR]:
        hh = h.clone().requires_grad_(True)
        (auto,) = torch.autograd.grad(ridge.value(hh), hh)
        assert rel_err(ridge.hypergrad(h), auto) < 1e-12
    assert torch.autograd.gradcheck(ridge.value, (H_VECTOR.clone().requires_grad_(True),))


# -- implicit differentiation -------------------------------------------------------------
@pytest.mark.parametrize("h", _h_cases())
def test_ift_cg_matches_closed_form(ridge, h):
    theta = ridge.theta_star(h)
    res = implicit_hypergradient(ridge.problem, theta, h, solver="cg")
    err = rel_err(res.grad, ridge.hypergrad(h))
    assert err <= 1e-6, err
    assert res.grad.shape == h.shape
    assert res.info["residual"] <= 1e-10
    assert float(res.value) == pytest.approx(float(ridge.value(h)), rel=1e-12)


@pytest.mark.parametrize("h", _h_cases())
def test_ift_cg_at_lbfgs_solution(ridge, h):
    """At the L-BFGS solution the whole error is the first-order effect of the inner error.

    For ridge the IFT hypergradient evaluated at any ``theta`` is
    ``F(theta) = -lam * theta * H^{-1} grad_theta Q(theta)`` (summed for a
    shared lambda), so its error at the L-BFGS point is ``J (theta - theta*)``
    up to a second-order term, with ``J = dF/dtheta`` at ``theta*``. We check
    exactly that, and a loose relative bound of 1e-5: with the default
    ``tol=1e-7`` the measured relative errors are 1e-9 to 1.4e-6, the largest
    at ``log lam = 0.7``, next to the validation optimum, where ``dQ/dh`` is
    small (so a small absolute error is a larger relative one).
    """
    theta, n_iter, converged = solve_inner(ridge.problem, h)
    assert converged and n_iter > 0
    star = ridge.theta_star(h)
    assert rel_err(theta, star) <= 1e-7
    res = hypergradient(ridge.problem, theta, h, "implicit-cg")
    ref = ridge.hypergrad(h)
    assert rel_err(res.grad, ref) <= 1e-5

    def F(t: torch.Tensor) -> torch.Tensor:
        g_theta = 2.0 * ridge.Xv.T @ (ridge.Xv @ t - ridge.yv) / len(ridge.yv)
        out = -torch.exp(h) * t * torch.linalg.solve(ridge.hessian(h), g_theta)
        return out.sum().reshape(1) if h.numel() == 1 else out

    predicted = torch.autograd.functional.jacobian(F, star) @ (theta - star)
    err = res.grad - ref
    assert float((err - predicted).norm()) <= 1e-3 * float(predicted.norm()) + 1e-13


def _dense_neumann(A: torch.Tensor, b: torch.Tensor, alpha: float, n_terms: int):
    """``alpha * sum_{j=0}^{n_terms} (I - alpha A)^j b`` with explicit matrices."""
    M = torch.eye(len(b), dtype=DT) - alpha * A
    acc, term = torch.zeros_like(b), b.clone()
    for _ in range(n_terms + 1):
        acc = acc + term
        term = M @ term
    return alpha * acc


def test_neumann_series_is_the_partial_sum():
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=DT))[0]
    A = Q @ torch.diag(torch.linspace(0.5, 5.0, 12, dtype=DT)) @ Q.T
    b = torch.randn(12, generator=g, dtype=DT)
    for k in (0, 1, 7, 40):
        got = neumann_series(lambda v: A @ v, b, alpha=0.2, n_terms=k)
        assert rel_err(got, _dense_neumann(A, b, 0.2, k)) < 1e-12
    # With alpha < 2 / lambda_max the series converges to A^{-1} b.
    got = neumann_series(lambda v: A @ v, b, alpha=0.2, n_terms=400)
    assert rel_err(got, torch.linalg.solve(A, b)) < 1e-12


@pytest.mark.parametrize("h", [H_SCALAR[1], H_VECTOR], ids=["scalar", "per-feature"])
def test_ift_neumann_converges_with_terms(ridge, h):
    theta = ridge.theta_star(h)
    ref = ridge.hypergrad(h)
    errs = {}
    for k in (10, 50, 200):
        res = implicit_hypergradient(ridge.problem, theta, h, solver="neumann", n_terms=k)
        errs[k] = rel_err(res.grad, ref)
        # alpha defaults to 1 / lambda_max by power iteration.
        lam_max = float(torch.linalg.eigvalsh(ridge.hessian(h))[-1])
        assert res.info["alpha"] == pytest.approx(1 / lam_max, rel=1e-3)
    assert errs[10] > errs[50] > errs[200], errs
    assert errs[10] > 1e-2, errs  # the truncation is visible with few terms ...
    assert errs[200] <= 1e-3, errs  # ... and gone with enough


def test_ift_neumann_equals_dense_partial_sum(ridge):
    """The engine's Neumann hypergradient is exactly the truncated-series formula."""
    h = H_VECTOR
    theta = ridge.theta_star(h)
    alpha, k = 0.008, 13
    res = implicit_hypergradient(
        ridge.problem, theta, h, solver="neumann", n_terms=k, alpha=alpha
    )
    g_theta = 2.0 * ridge.Xv.T @ (ridge.Xv @ theta - ridge.yv) / len(ridge.yv)
    v = _dense_neumann(ridge.hessian(h), g_theta, alpha, k)
    expected = -torch.exp(h) * theta * v  # d2L/dh_i dtheta = lam_i theta_i e_i
    assert rel_err(res.grad, expected) < 1e-12


def test_ift_includes_direct_term():
    """``Q`` depending on ``h`` directly: dQ/dh = d_h Q + implicit part."""
    # L = 0.5 (theta - h)^2 -> theta* = h ; Q = theta^2 + 3 h -> dQ/dh = 2h + 3.
    prob = BilevelProblem(
        lambda t, h: 0.5 * (t - h).pow(2).sum(),
        lambda t, h: t.pow(2).sum() + 3.0 * h.sum(),
        torch.zeros(1, dtype=DT),
    )
    h = torch.tensor([0.4], dtype=DT)
    for method, needs_optimum in METHODS.items():
        # Unrolled methods start from theta0 (one step of lr = 1 reaches theta*).
        res = hypergradient(prob, h.clone() if needs_optimum else prob.theta0, h, method,
                            **({"n_steps": 50} if "reverse" in method else {}))
        assert float(res.grad) == pytest.approx(2 * 0.4 + 3.0, rel=1e-9), method


# -- reverse mode ----------------------------------------------------------------------------
@pytest.mark.parametrize("h", [H_SCALAR[1], H_VECTOR], ids=["scalar", "per-feature"])
def test_full_reverse_approaches_ift(ridge, h):
    ref = ridge.hypergrad(h)
    errs = {}
    for n in (10, 100, 1000):
        res = reverse_hypergradient(ridge.problem, ridge.problem.theta0, h, n_steps=n)
        errs[n] = rel_err(res.grad, ref)
        assert res.info["differentiated_steps"] == n
    assert errs[10] > errs[100] > errs[1000], errs
    assert errs[10] > 1e-2, errs
    assert errs[1000] <= 1e-8, errs
    # The trajectory's end point is theta*(h) after many steps.
    assert rel_err(res.theta, ridge.theta_star(h)) <= 1e-10


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("h", [H_SCALAR[1], H_VECTOR], ids=["scalar", "per-feature"])
def test_truncated_reverse_equals_neumann(ridge, h, k):
    """K unrolled steps from theta* == the Neumann series sum_{j<K}, i.e. ``n_terms=K-1``.

    From theta*, ``d theta_K / dh = -lr sum_{j<K} (I - lr H)^j d2L/dtheta dh``:
    exactly the Neumann approximation with ``alpha = lr`` and K powers
    ``j = 0..K-1``, which is ``neumann_series(n_terms=K-1)`` (``n_terms``
    counts the iterations after the ``j = 0`` term; Lorraine et al. 2020,
    Thm. 1). Exact for a quadratic inner loss.
    """
    theta = ridge.theta_star(h)
    lr = 0.8 / float(torch.linalg.eigvalsh(ridge.hessian(h))[-1])
    rev = hypergradient(ridge.problem, theta, h, "truncated-reverse", n_steps=k, lr=lr)
    neu = hypergradient(ridge.problem, theta, h, "implicit-neumann", n_terms=k - 1, alpha=lr)
    assert rel_err(rev.grad, neu.grad) <= 1e-10
    # ... and not the series with one more term (the off-by-one is visible).
    neu_plus = hypergradient(ridge.problem, theta, h, "implicit-neumann", n_terms=k, alpha=lr)
    assert rel_err(rev.grad, neu_plus.grad) > 1e-6


def test_truncated_reverse_after_untracked_steps(ridge):
    """Truncation from theta0: run N-K steps without a graph, differentiate the last K."""
    h = H_VECTOR
    lr = float(1.0 / lipschitz_estimate(ridge.problem, ridge.problem.theta0, h))
    res = reverse_hypergradient(
        ridge.problem, ridge.problem.theta0, h, n_steps=600, truncate=20, lr=lr
    )
    assert res.info["differentiated_steps"] == 20
    theta = ridge.theta_star(h)
    neu = implicit_hypergradient(
        ridge.problem, theta, h, solver="neumann", n_terms=19, alpha=lr
    )
    # The first 580 steps bring theta to theta* (to ~1e-14 at this conditioning).
    assert rel_err(res.grad, neu.grad) <= 1e-8
    # Truncation matters: the full-graph gradient is the (different) IFT value.
    full = reverse_hypergradient(ridge.problem, ridge.problem.theta0, h, n_steps=600, lr=lr)
    assert rel_err(full.grad, ridge.hypergrad(h)) <= 1e-8
    assert rel_err(res.grad, full.grad) > 1e-3


def test_unknown_method_raises(ridge):
    h = H_SCALAR[0]
    with pytest.raises(ValueError, match="unknown hypergradient method"):
        hypergradient(ridge.problem, ridge.problem.theta0, h, "bogus")
    with pytest.raises(ValueError, match="solver"):
        implicit_hypergradient(ridge.problem, ridge.theta_star(h), h, solver="lu")


# -- linear solvers ---------------------------------------------------------------------------
def test_conjugate_gradient_matches_dense_solve():
    g = torch.Generator().manual_seed(2)
    n = 30
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]
    A = Q @ torch.diag(torch.logspace(-1, 1, n, dtype=DT)) @ Q.T  # condition 100
    A = 0.5 * (A + A.T)
    b = torch.randn(n, generator=g, dtype=DT)
    x, n_it, res = conjugate_gradient(lambda v: A @ v, b, max_iter=200, tol=1e-12)
    assert rel_err(x, torch.linalg.solve(A, b)) <= 1e-10
    assert 0 < n_it <= 2 * n
    assert res <= 1e-12
    assert res == pytest.approx(float((A @ x - b).norm() / b.norm()), rel=1e-3, abs=1e-14)
    # A bounded number of iterations is respected and reported.
    x5, n5, res5 = conjugate_gradient(lambda v: A @ v, b, max_iter=5, tol=1e-12)
    assert n5 == 5 and res5 > 1e-6
    # Zero right-hand side: zero solution, no iteration.
    x0, n0, _ = conjugate_gradient(lambda v: A @ v, torch.zeros(n, dtype=DT))
    assert n0 == 0 and torch.all(x0 == 0)


def _spd(n, eigenvalues, gen):
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))[0]
    A = Q @ torch.diag(eigenvalues) @ Q.T
    return 0.5 * (A + A.T)


def test_block_conjugate_gradient_solves_each_block_as_if_alone():
    """Block-diagonal A: three blocks of 12 with 4 distinct eigenvalues each, 12
    distinct in all. Per-block step lengths solve it in 4 products, as one
    block alone takes; one recursion over the whole system needs about 12."""
    gen = torch.Generator().manual_seed(3)
    levels = [torch.tensor(v, dtype=DT) for v in ([1, 2, 3, 4], [10, 20, 30, 40], [0.1, 0.5, 5, 50])]
    As = [_spd(12, lv.repeat_interleave(3), gen) for lv in levels]
    A = torch.block_diag(*As)
    b = torch.randn(36, generator=gen, dtype=DT)
    exact = torch.linalg.solve(A, b)
    x, n_it, res = conjugate_gradient(lambda v: A @ v, b, max_iter=100, tol=1e-10, blocks=(12, 12, 12))
    assert rel_err(x, exact) <= 1e-9 and res <= 1e-10
    assert n_it <= 5
    _, n_alone, _ = conjugate_gradient(lambda v: As[0] @ v, b[:12], max_iter=100, tol=1e-10)
    _, n_joint, _ = conjugate_gradient(lambda v: A @ v, b, max_iter=100, tol=1e-10)
    assert n_alone <= 5 and n_joint >= 10
    # Blocks of different sizes, a warm start, and the one-block path unchanged.
    B = torch.block_diag(As[1][:5, :5], As[2])
    rhs = b[:17]
    xb, _, _ = conjugate_gradient(lambda v: B @ v, rhs, tol=1e-12, blocks=(5, 12), x0=0.9 * torch.linalg.solve(B, rhs))
    assert rel_err(xb, torch.linalg.solve(B, rhs)) <= 1e-9
    one = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, blocks=(36,))
    plain = conjugate_gradient(lambda v: A @ v, b, tol=1e-12)
    assert torch.equal(one[0], plain[0]) and one[1] == plain[1]
    with pytest.raises(ValueError, match="add up to"):
        conjugate_gradient(lambda v: A @ v, b, blocks=(12, 12))


def test_block_conjugate_gradient_stops_a_block_at_negative_curvature():
    """An indefinite block stops where it is; a positive definite one is still solved."""
    gen = torch.Generator().manual_seed(4)
    good = _spd(6, torch.linspace(1, 3, 6, dtype=DT), gen)
    bad = -torch.eye(4, dtype=DT)
    A = torch.block_diag(good, bad)
    b = torch.randn(10, generator=gen, dtype=DT)
    x, _, _ = conjugate_gradient(lambda v: A @ v, b, max_iter=50, tol=1e-12, blocks=(6, 4))
    assert rel_err(x[:6], torch.linalg.solve(good, b[:6])) <= 1e-9
    assert torch.equal(x[6:], torch.zeros(4, dtype=DT))


def test_conjugate_gradient_gradcheck_through_solution():
    """CG is built from differentiable ops: its solution's gradient is A^{-1}."""
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))[0]
    A = Q @ torch.diag(torch.linspace(1.0, 4.0, 6, dtype=DT)) @ Q.T
    b = torch.randn(6, generator=g, dtype=DT, requires_grad=True)

    def solve(rhs):
        return conjugate_gradient(lambda v: A @ v, rhs, max_iter=6, tol=0.0)[0]

    assert torch.autograd.gradcheck(solve, (b,))


def test_lipschitz_estimate_is_lambda_max(ridge):
    h = H_SCALAR[1]
    est = float(lipschitz_estimate(ridge.problem, ridge.theta_star(h), h))
    assert est == pytest.approx(float(torch.linalg.eigvalsh(ridge.hessian(h))[-1]), rel=1e-3)


# -- inner solver ------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["lbfgs", "newton", "auto"])
def test_solve_inner_reaches_closed_form(ridge, solver):
    """Both solvers reach theta* (L-BFGS's gradient floor here is ~1e-7: below
    that the loss, ~50, cannot register the decrease the line search asks for)."""
    h = H_VECTOR
    theta, n_iter, converged = solve_inner(
        ridge.problem, h, tol=1e-6, max_iter=1000, solver=solver
    )
    assert converged and 0 < n_iter < 1000
    assert rel_err(theta, ridge.theta_star(h)) <= 1e-8
    if solver != "lbfgs":  # a quadratic: one Newton step
        assert n_iter == 1
    # Warm-started at the optimum it has nothing to do.
    theta, n_iter, converged = solve_inner(
        ridge.problem, h, ridge.theta_star(h), solver=solver
    )
    assert converged and n_iter == 0


def test_solve_inner_bounded_lbfgs_reports_no_convergence(ridge):
    _, n_iter, converged = solve_inner(
        ridge.problem, H_VECTOR, max_iter=2, tol=1e-9, solver="lbfgs"
    )
    assert not converged and n_iter == 2


def test_solve_inner_rejects_unknown_solver(ridge):
    with pytest.raises(ValueError, match="solver must be"):
        solve_inner(ridge.problem, H_VECTOR, solver="sgd")


@pytest.mark.parametrize("kind", ["nan-constant", "nan-gradient"])
def test_solve_inner_non_finite_loss_raises(ridge, kind):
    """A NaN inner loss is a divergence, even when its gradient is finite.

    ``nan-constant`` adds a NaN that does not depend on theta: the gradient
    stays finite, so only a check of the loss catches it (torch's strong-Wolfe
    line search used to fail with an IndexError here).
    """
    prob = _nan_above(ridge, 0.0, kind)
    with pytest.raises(InnerDivergenceError, match="diverged"):
        solve_inner(prob, torch.tensor([0.5], dtype=DT))
    theta, _, _ = solve_inner(prob, torch.tensor([-0.5], dtype=DT))  # fine below
    assert torch.isfinite(theta).all()


# -- logistic stacking / learned weights on real base-model probabilities --------------------
@pytest.fixture(scope="module")
def pool_outputs():
    """Class probabilities of four fitted models on breast_cancer rows they did not see."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    X, y = load_breast_cancer(return_X_y=True)
    Xp, Xa, yp, ya = train_test_split(X, y, test_size=0.6, random_state=0, stratify=y)
    models = [
        make_pipeline(StandardScaler(), LogisticRegression(C=0.01)),
        GaussianNB(),
        DecisionTreeClassifier(max_depth=2, random_state=0),
        KNeighborsClassifier(15),
    ]
    Z = np.stack([m.fit(Xp, yp).predict_proba(Xa) for m in models], axis=1)
    idx = np.random.RandomState(0).permutation(len(ya))
    tr, va = idx[: len(ya) // 2], idx[len(ya) // 2 :]
    Zt, yt = torch.as_tensor(Z, dtype=DT), torch.as_tensor(ya)
    ctx = AggregationContext(
        task="classification", n_models=4, n_outputs=2, n_features=X.shape[1],
        model_names=["lr", "nb", "tree", "knn"], classes=np.arange(2),
    )
    return ctx, Split(Zt[tr], yt[tr]), Split(Zt[va], yt[va])


def _aggregator_problem(agg, pool_outputs):
    ctx, train, val = pool_outputs
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    prob, _, _ = make_problem(agg, ctx, train, val, space)
    return prob, space.initial()


def _newton_polish(prob: BilevelProblem, theta: torch.Tensor, h: torch.Tensor, steps: int = 2):
    """Newton steps with the dense Hessian (least squares: softmax intercepts
    have an exact null direction). L-BFGS stalls at gradients ~1e-9 to 1e-11,
    which shifts ``Q`` by ~1e-8 and would swamp a finite difference of step
    1e-4; two Newton steps bring the gradient to rounding level."""
    for _ in range(steps):
        H = torch.autograd.functional.hessian(lambda t: prob.inner_loss(t, h), theta)
        g = prob.inner_grad(theta, h)
        theta = theta - _lstsq(H, g)
    return theta


def _lstsq(H: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares by SVD (``gelsd``). With MKL's LAPACK the
    default driver (``gelsy``) misjudged this singular Hessian's rank: on an
    H200 machine (torch 2.11, MKL) it gave a hypergradient reference of
    (0.0049, 0.0004, ...) where ``gelsd``, ``gelss``, ``gels`` and CG agreed
    on (0.0009, 0.0003, ...)."""
    return torch.linalg.lstsq(H, g[:, None], rcond=1e-12, driver="gelsd").solution[:, 0]


def _finite_difference(prob, h, theta, eps=1e-4):
    fd = torch.zeros_like(h)
    for i in range(h.numel()):
        e = torch.zeros_like(h)
        e[i] = eps
        vals = []
        for hh in (h + e, h - e):
            t, _, _ = solve_inner(prob, hh, theta, max_iter=5000, tol=1e-10)
            t = _newton_polish(prob, t, hh)
            vals.append(prob.outer_loss(t, hh))
        fd[i] = (vals[0] - vals[1]) / (2 * eps)
    return fd


def test_stacking_ift_cg_matches_finite_differences(pool_outputs):
    """Per-model log-L2 vector of Stacking (and the pool's log-L2, last): IFT-CG
    vs central differences."""
    prob, h = _aggregator_problem(Stacking(l2=[1e-2, 1e-1, 1e-3, 3e-2]), pool_outputs)
    assert h.shape == (5,)
    theta, _, _ = solve_inner(prob, h, max_iter=5000, tol=1e-10)
    theta = _newton_polish(prob, theta, h)
    res = implicit_hypergradient(prob, theta, h, solver="cg", max_iter=500, tol=1e-12)
    fd = _finite_difference(prob, h, theta)
    err = rel_err(res.grad, fd)
    assert err <= 1e-4, (err, res.grad, fd)
    # Not a vacuous match: every entry moves the validation loss.
    assert (fd.abs() > 1e-6).all()


@pytest.mark.parametrize("pool", ["linear", "log"])
def test_learned_weights_ift_cg_matches_finite_differences(pool_outputs, pool):
    """LearnedWeights: temperature enters Q directly, so the direct term matters."""
    agg = LearnedWeights(pool=pool, temperature=0.7, l2=1e-2, entropy=1e-3)
    prob, h = _aggregator_problem(agg, pool_outputs)
    assert h.shape == (3,)  # log temperature, log l2, log entropy
    theta, _, converged = solve_inner(prob, h, max_iter=5000, tol=1e-10)
    assert converged
    res = implicit_hypergradient(prob, theta, h, solver="cg", max_iter=500, tol=1e-12)
    fd = _finite_difference(prob, h, theta)
    err = rel_err(res.grad, fd)
    assert err <= 1e-4, (err, res.grad, fd)
    # The direct term is large here: without it the hypergradient is wrong.
    _, _, direct = outer_grads(prob, theta, h)
    assert abs(float(direct[0])) > 0.1 * float(fd.norm())
    assert rel_err(res.grad - direct, fd) > 0.5


def test_stacking_methods_agree(pool_outputs):
    """Stacking with dense linear algebra as the reference: IFT-CG equals
    ``d_h Q - B^T H^+ d_theta Q`` with the dense Hessian ``H`` and mixed
    derivative ``B``, and truncated reverse from theta* still equals the
    Neumann series with K-1 terms (theta* is a fixed point of the steps, so
    the step Jacobian is ``I - lr H(theta*)`` at every step)."""
    prob, h = _aggregator_problem(Stacking(l2=[1e-1, 1e-1, 3e-2, 3e-2]), pool_outputs)
    theta, _, _ = solve_inner(prob, h, max_iter=5000, tol=1e-10)
    theta = _newton_polish(prob, theta, h)
    cg = hypergradient(prob, theta, h, "implicit-cg", max_iter=500, tol=1e-12)
    assert cg.info["residual"] <= 1e-12
    H = torch.autograd.functional.hessian(lambda t: prob.inner_loss(t, h), theta)
    B = torch.autograd.functional.jacobian(lambda hh: prob.inner_grad(theta, hh, True), h)
    _, g_theta, g_h = outer_grads(prob, theta, h)
    # H has one exact null direction (a common shift of the class intercepts);
    # d_theta Q is orthogonal to it, so the least-squares solution is the one.
    v = _lstsq(H, g_theta)
    assert rel_err(cg.grad, g_h - B.T @ v) <= 1e-8
    lr = float(1.0 / lipschitz_estimate(prob, theta, h))
    rev = hypergradient(prob, theta, h, "truncated-reverse", n_steps=15, lr=lr).grad
    neu = hypergradient(prob, theta, h, "implicit-neumann", n_terms=14, alpha=lr).grad
    assert rel_err(rev, neu) <= 1e-8


# -- the outer loop ----------------------------------------------------------------------------
HISTORY_KEYS = {"outer_loss", "h", "hypergrad_norm", "inner_iter", "seconds"}


@pytest.fixture(scope="module")
def ridge_grid_optimum(ridge):
    """Dense grid search of Q(theta*(lam)) over log lam in [-4, 6] (step 0.005)."""
    grid = torch.linspace(-4.0, 6.0, 2001, dtype=DT)
    vals = torch.stack([ridge.value(g.reshape(1)) for g in grid])
    i = int(vals.argmin())
    assert 0 < i < len(grid) - 1  # an interior optimum
    return float(grid[i]), float(vals[i])


@pytest.mark.parametrize(
    "optimizer, method, options",
    [
        # L-BFGS inner solves, whose warm start the test checks (Newton takes
        # one step on this quadratic, warm or cold).
        ("lbfgs", "implicit-cg", {"inner_solver": "lbfgs"}),
        ("lbfgs", "implicit-cg", {}),
        ("adam", "implicit-cg", {"outer_lr": 0.1, "max_outer_iter": 200, "tol": 1e-12}),
        # 50 terms (the default) leave a 5 % bias at this conditioning (kappa ~ 17),
        # which moves the optimum by ~0.01; 300 terms do not.
        ("lbfgs", "implicit-neumann", {"method_options": {"n_terms": 300}}),
        ("lbfgs", "reverse", {"method_options": {"n_steps": 300}}),
    ],
)
def test_tune_finds_grid_optimum(ridge, ridge_grid_optimum, optimizer, method, options):
    h_grid, q_grid = ridge_grid_optimum
    seen = []
    kwargs = {"max_outer_iter": 50, "tol": 1e-12, **options}
    res = tune(
        [ridge.problem], torch.tensor([-3.0], dtype=DT),
        lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT),
        method=method, optimizer=optimizer, callback=seen.append, **kwargs,
    )
    assert not res.diverged
    assert abs(float(res.h) - h_grid) <= 0.02, (float(res.h), h_grid)
    assert res.value <= q_grid + 1e-6
    assert res.value == pytest.approx(float(ridge.value(res.h)), rel=1e-6)
    # Warm-started inner solution returned with the hyperparameters.
    assert rel_err(res.thetas[0], ridge.theta_star(res.h)) <= 1e-5
    # History: one entry per evaluation, the documented keys, handed to the callback.
    assert len(res.history) >= 3 and seen == res.history
    for entry in res.history:
        assert set(entry) == HISTORY_KEYS
        assert isinstance(entry["h"], np.ndarray) and entry["h"].shape == (1,)
        assert math.isfinite(entry["outer_loss"]) and entry["hypergrad_norm"] >= 0
        assert entry["seconds"] >= 0 and entry["inner_iter"] >= 0
    assert min(e["outer_loss"] for e in res.history) == res.value
    if METHODS[method]:
        assert sum(e["inner_iter"] for e in res.history) > 0
    if options.get("inner_solver") == "lbfgs":
        # Inner solves are warm-started: late, small outer steps cost less
        # than the cold first solve.
        assert res.history[-1]["inner_iter"] < res.history[0]["inner_iter"]
    if optimizer == "adam":
        # A bias-corrected first Adam step has length outer_lr.
        step = res.history[1]["h"] - res.history[0]["h"]
        assert abs(float(step[0])) == pytest.approx(options["outer_lr"], rel=1e-4)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_tune_respects_bounds(ridge, ridge_grid_optimum, optimizer):
    """With the optimum (log lam ~ 0.7) above the upper bound, tune stops on the bound."""
    h_grid, _ = ridge_grid_optimum
    upper = torch.tensor([0.0], dtype=DT)
    assert h_grid > 0.1
    res = tune(
        [ridge.problem], torch.tensor([-3.0], dtype=DT),
        lower=torch.tensor([-4.0], dtype=DT), upper=upper,
        optimizer=optimizer, outer_lr=0.5, max_outer_iter=60, tol=1e-12,
    )
    assert all(float(e["h"][0]) <= 0.0 for e in res.history)
    assert float(res.h) == pytest.approx(0.0, abs=1e-3)


def test_tune_per_feature_vector(ridge):
    """A 10-dimensional h: the tuned point is stationary (projected gradient ~0)."""
    lo, hi = torch.full((10,), -4.0, dtype=DT), torch.full((10,), 6.0, dtype=DT)
    h0 = torch.zeros(10, dtype=DT)
    res = tune([ridge.problem], h0, lower=lo, upper=hi, max_outer_iter=100, tol=1e-12)
    assert res.value < float(ridge.value(h0))
    g = ridge.hypergrad(res.h)
    # Free coordinates have zero gradient; coordinates at a bound push outwards.
    free = (res.h > lo + 1e-6) & (res.h < hi - 1e-6)
    assert g[free].abs().max() <= 1e-4 * max(1.0, float(g.abs().max()))
    assert (g[res.h >= hi - 1e-6] <= 0).all() and (g[res.h <= lo + 1e-6] >= 0).all()


def test_tune_cross_fitted_sum(ridge):
    """Several problems share h: value and hypergradient are sums over them."""
    other = Ridge(seed=5)
    res = tune(
        [ridge.problem, other.problem], torch.tensor([0.0], dtype=DT),
        lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT),
        max_outer_iter=0,
    )
    h = torch.tensor([0.0], dtype=DT)
    # Up to the inner solve's tolerance (1e-7 on the gradient).
    assert res.value == pytest.approx(float(ridge.value(h) + other.value(h)), rel=1e-8)
    g = float(ridge.hypergrad(h) + other.hypergrad(h))
    assert res.history[0]["hypergrad_norm"] == pytest.approx(abs(g), rel=1e-5)
    assert len(res.thetas) == 2


def _nan_above(ridge: Ridge, threshold: float, kind: str = "nan-gradient") -> BilevelProblem:
    """Ridge whose inner loss is NaN for ``h > threshold``."""

    def inner(theta, h):
        if kind == "nan-constant":
            bad = torch.where(h[0] > threshold, torch.tensor(math.nan, dtype=DT), 0.0)
            return ridge.inner(theta, h) + bad
        # sqrt of a negative number times a theta term: NaN loss and gradient.
        return ridge.inner(theta, h) + torch.sqrt(threshold - h[0]) * 1e-3 * theta.pow(2).sum()

    return BilevelProblem(inner, ridge.outer, torch.zeros(ridge.p, dtype=DT))


@pytest.mark.parametrize("kind", ["nan-constant", "nan-gradient"])
@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_tune_divergence_keeps_last_good_point(ridge, ridge_grid_optimum, kind, optimizer):
    h_grid, _ = ridge_grid_optimum
    threshold = 0.0
    assert h_grid > threshold  # the outer loop is pulled into the NaN region
    prob = _nan_above(ridge, threshold, kind)
    res = tune(
        [prob], torch.tensor([-3.0], dtype=DT),
        lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT),
        optimizer=optimizer, outer_lr=0.5, max_outer_iter=100, tol=1e-12,
    )
    assert res.diverged
    assert res.message
    assert torch.isfinite(res.h).all() and float(res.h) <= threshold
    assert math.isfinite(res.value)
    assert all(float(e["h"][0]) <= threshold for e in res.history)
    assert float(res.h) > -3.0  # it did make progress before diverging


def test_tune_divergence_at_start_raises(ridge):
    prob = _nan_above(ridge, 0.0)
    with pytest.raises(InnerDivergenceError, match="initial"):
        tune(
            [prob], torch.tensor([1.0], dtype=DT),
            lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT),
        )


def test_tune_rejects_bad_arguments(ridge):
    h0 = torch.tensor([0.0], dtype=DT)
    lo, hi = torch.tensor([-4.0], dtype=DT), torch.tensor([6.0], dtype=DT)
    with pytest.raises(ValueError, match="unknown hypergradient method"):
        tune([ridge.problem], h0, lower=lo, upper=hi, method="bogus")
    with pytest.raises(ValueError, match="optimizer"):
        tune([ridge.problem], h0, lower=lo, upper=hi, optimizer="sgd")


def test_conjugate_gradient_warm_start():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20, 20, generator=g, dtype=DT)
    A = M @ M.T + 20 * torch.eye(20, dtype=DT)
    b = torch.randn(20, generator=g, dtype=DT)
    exact = torch.linalg.solve(A, b)
    cold, n_cold, _ = conjugate_gradient(lambda v: A @ v, b, tol=1e-12)
    near = exact + 1e-6 * torch.randn(20, generator=g, dtype=DT)
    warm, n_warm, _ = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, x0=near)
    torch.testing.assert_close(warm, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cold, exact, rtol=1e-10, atol=1e-12)
    assert n_warm < n_cold
    _, n_exact, _ = conjugate_gradient(lambda v: A @ v, b, tol=1e-6, x0=exact)
    assert n_exact == 0


@pytest.mark.parametrize("method", ["implicit-cg", "hoag"])
def test_tune_warm_started_cg_matches_cold(ridge, method):
    """Warm-starting CG from the previous evaluation changes the cost, not the answer."""
    kw = dict(lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT),
              method=method, max_outer_iter=20)
    warm = tune([ridge.problem], torch.tensor([2.0], dtype=DT), **kw)
    # Any explicit v0 switches the warm start off.
    cold = tune([ridge.problem], torch.tensor([2.0], dtype=DT), method_options={"v0": None}, **kw)
    torch.testing.assert_close(warm.h, cold.h, rtol=1e-6, atol=1e-8)
    assert warm.value == pytest.approx(cold.value, rel=1e-9)


def test_tune_scale_is_a_change_of_units(ridge):
    """L-BFGS-B on ``h / scale`` visits exactly the points it visits on a
    problem written in those units: the first step is a fraction of the
    box the scale describes, not of one unit of ``h``."""
    s = 7.5
    kw = dict(max_outer_iter=30, tol=1e-12)
    scaled = tune(
        [ridge.problem], torch.tensor([-3.0], dtype=DT),
        lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT),
        scale=torch.tensor([s], dtype=DT), **kw,
    )
    in_units = BilevelProblem(
        lambda theta, x: ridge.problem.inner_loss(theta, s * x),
        lambda theta, x: ridge.problem.outer_loss(theta, s * x),
        ridge.problem.theta0,
    )
    plain = tune(
        [in_units], torch.tensor([-3.0 / s], dtype=DT),
        lower=torch.tensor([-4.0 / s], dtype=DT), upper=torch.tensor([6.0 / s], dtype=DT), **kw,
    )
    assert len(scaled.history) == len(plain.history) > 2
    for a, b in zip(scaled.history, plain.history):
        assert a["h"][0] == pytest.approx(s * b["h"][0], rel=1e-7, abs=1e-9)
        assert a["outer_loss"] == pytest.approx(b["outer_loss"], rel=1e-9)
    # Without the scale the first step is different (one unit of h).
    unscaled = tune(
        [ridge.problem], torch.tensor([-3.0], dtype=DT),
        lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT), **kw,
    )
    assert unscaled.history[1]["h"][0] != pytest.approx(scaled.history[1]["h"][0], abs=1e-3)
    # Same optimum either way.
    assert float(scaled.h) == pytest.approx(float(unscaled.h), abs=1e-4)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_tune_rejects_bad_scale(ridge, bad):
    with pytest.raises(ValueError, match="scale"):
        tune(
            [ridge.problem], torch.tensor([0.0], dtype=DT),
            lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT),
            scale=torch.tensor([bad], dtype=DT),
        )


def test_hyperspace_scales_are_user_boxes():
    """A range the user gives sets the outer optimiser's unit (its width in
    log or linear units); a declared bound does not."""
    ctx = AggregationContext(task="classification", n_models=3, n_outputs=2, n_features=4,
                             model_names=["a", "b", "c"])
    specs = LearnedWeights().hyperparameters(ctx)
    names = [s.name for s in specs]
    # (a range lies within the declared limits: entropy's start at 1e-6)
    space = HyperSpace(specs, {"l2": (1e-4, 1e2, "log"), "entropy": (1e-6, 0.5, "linear")},
                       torch.device("cpu"), DT)
    scales = dict(zip([s.name for s in space.tuned], space.scales().tolist()))
    assert scales["l2"] == pytest.approx(math.log(1e6))
    assert scales["entropy"] == pytest.approx(0.5 - 1e-6)
    assert all(scales[n] == 1.0 for n in names if n not in ("l2", "entropy"))


@pytest.mark.parametrize("factor", [1.0, 1e-4, 1e3])
@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_tune_stopping_ignores_the_loss_scale(ridge, ridge_grid_optimum, factor, optimizer):
    """``tol`` is a relative decrease: an outer loss 1e4 times smaller (a
    near-perfect regressor's standardised error) is tuned as far. SciPy's own
    ``ftol`` divides by ``max(|f|, 1)`` and stopped it after one step."""
    h_grid, _ = ridge_grid_optimum
    scaled = BilevelProblem(
        ridge.problem.inner_loss,
        lambda theta, h: factor * ridge.problem.outer_loss(theta, h),
        ridge.problem.theta0,
    )
    res = tune(
        [scaled], torch.tensor([-3.0], dtype=DT),
        lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT),
        optimizer=optimizer, outer_lr=0.1, max_outer_iter=200 if optimizer == "adam" else 50,
        tol=1e-9,
    )
    assert abs(float(res.h) - h_grid) <= 0.05, (float(res.h), h_grid)


class _WrongSlope(torch.autograd.Function):
    """``1 + h^2`` with a slope of -1 everywhere: no descent step can succeed."""

    @staticmethod
    def forward(ctx, h):
        return 1.0 + (h * h).sum()

    @staticmethod
    def backward(ctx, g):
        return -g * torch.ones(1, dtype=DT)


def test_tune_stops_when_evaluations_stall(ridge):
    """Outer values that disagree with their hypergradient (what inexact inner
    solves produce) leave L-BFGS-B backtracking: the tuner stops after
    ``STALL_EVALS`` evaluations without improvement and keeps the best point.
    Having not left its start, it then probes one bracketing step on each
    side (both worse here) and stops."""
    from aggregators.hypergrad._tuner import STALL_EVALS

    lying = BilevelProblem(
        ridge.problem.inner_loss,
        lambda theta, h: _WrongSlope.apply(h) + 0.0 * theta.sum(),
        ridge.problem.theta0,
    )
    res = tune(
        [lying], torch.tensor([0.0], dtype=DT),
        lower=torch.tensor([-4.0], dtype=DT), upper=torch.tensor([6.0], dtype=DT),
        max_outer_iter=30,
    )
    assert len(res.history) == 1 + STALL_EVALS + 2
    assert float(res.h) == 0.0 and res.value == pytest.approx(1.0)
    assert "did not improve" in res.message and not res.diverged
