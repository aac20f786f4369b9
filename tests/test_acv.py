"""Approximate cross-validation (``aggregators.hypergrad._acv``), float64.

References it is checked against (Beirami et al. 2017, Rad & Maleki 2020,
Giordano et al. 2019, Burn 2020):

* ridge regression: one Newton step solves a quadratic, so K-fold NS equals
  exact K-fold CV (refit per fold in closed form) in value and in its
  derivative in ``log lambda``; PRESS equals brute-force leave-one-out;
* logistic / softmax regression: NS and IJ against exact K-fold CV (each fold
  solved by Newton to 1e-12): NS within 2e-3, IJ within 1e-2 relative;
* central finite differences of the approximate CV loss at re-solved inner
  optima against the engine's implicit hypergradient;
* the linear-predictor path (structured fold Hessians) against the generic
  autograd path;
* the closed-form Sherman-Morrison / Woodbury leave-one-out against n
  brute-force Newton steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aggregators.hypergrad import (
    BilevelProblem,
    acv_fold_params,
    acv_loss,
    acv_problem,
    fold_membership,
    hypergradient,
    implicit_hypergradient,
    linear_acv_fold_params,
    linear_acv_loss,
    linear_acv_problem,
    linear_loo_predictions,
    ridge_loo_residuals,
    solve_inner,
    stack_problems,
)

DT = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 problems: torch's thread pool only adds contention (the
    estimators run them the same way, ``small_problem_threads``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm()).detach())


# -- ridge regression: NS is exact ----------------------------------------------------
class RidgeData:
    """``l_i = 0.5 (x_i^T theta - y_i)^2``, ``R = 0.5 lambda ||theta||^2``, ``h = log lambda``."""

    def __init__(self, n=60, p=5, n_folds=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, p, generator=g, dtype=DT)
        self.y = self.X @ torch.randn(p, generator=g, dtype=DT) + torch.randn(
            n, generator=g, dtype=DT
        )
        self.w = torch.rand(n, generator=g, dtype=DT) + 0.5
        self.ids = torch.randperm(n, generator=g) % n_folds
        self.n, self.p, self.n_folds = n, p, n_folds

    def rows(self, theta, h):
        return 0.5 * (self.X @ theta - self.y).pow(2)

    def penalty(self, theta, h):
        return 0.5 * h.exp().sum() * theta @ theta

    def fit(self, h, keep, w, scale):
        """Closed-form minimiser of ``scale * sum_keep w l_i + R``."""
        Xk, yk, wk = self.X[keep], self.y[keep], w[keep]
        A = scale * Xk.T @ (wk[:, None] * Xk) + h.exp().sum() * torch.eye(self.p, dtype=DT)
        return torch.linalg.solve(A, scale * Xk.T @ (wk * yk))

    def exact_cv(self, h, w, normalize, reduction):
        total, out, held = w.sum(), 0.0, 0.0
        for k in range(self.n_folds):
            va = self.ids == k
            tr = ~va
            scale = 1.0 / (w[tr].sum() if normalize == "fold" else total)
            theta_k = self.fit(h, tr, w, scale)
            s = (w[va] * self.rows(theta_k, h)[va]).sum()
            out = out + (s if reduction == "mean" else s / w[va].sum())
            held = held + w[va].sum()
        return out / held if reduction == "mean" else out

    def full_fit(self, h, w):
        return self.fit(h, torch.ones(self.n, dtype=torch.bool), w, 1.0 / w.sum())


@pytest.fixture(scope="module")
def ridge() -> RidgeData:
    return RidgeData()


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("normalize", ["fold", "full"])
@pytest.mark.parametrize("reduction", ["mean", "folds"])
def test_ridge_ns_equals_exact_kfold(ridge, weighted, normalize, reduction):
    """Value and d/d(log lambda) to 1e-10 (largest relative residuals measured over
    the 24 cases: 4e-16 and 5e-15)."""
    w = ridge.w if weighted else torch.ones(ridge.n, dtype=DT)
    for h0 in (-3.0, 0.0, 1.5):
        h = torch.tensor([h0], dtype=DT, requires_grad=True)
        acv = acv_loss(
            ridge.rows, ridge.full_fit(h, w), h, ridge.ids, penalty=ridge.penalty,
            weights=w if weighted else None, normalize=normalize, reduction=reduction,
        )
        exact = ridge.exact_cv(h, w, normalize, reduction)
        (g_acv,) = torch.autograd.grad(acv, h)
        (g_exact,) = torch.autograd.grad(exact, h)
        assert abs(float(acv.detach() - exact.detach())) <= 1e-10 * float(exact.detach())
        assert rel(g_acv, g_exact) <= 1e-10


def test_ridge_engine_hypergradient_equals_exact_derivative(ridge):
    """The engine's implicit hypergradient of the NS loss is exact CV's derivative."""
    problem = acv_problem(ridge.rows, torch.zeros(ridge.p, dtype=DT), ridge.ids,
                          penalty=ridge.penalty)
    w = torch.ones(ridge.n, dtype=DT)
    h = torch.tensor([-1.0], dtype=DT)
    theta, _, ok = solve_inner(problem, h, tol=1e-12)
    assert ok
    res = hypergradient(problem, theta, h, "implicit-cg", tol=1e-13)
    hh = h.clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad(ridge.exact_cv(hh, w, "fold", "mean"), hh)
    assert rel(res.grad, g_exact) <= 1e-9
    assert abs(float(res.value - ridge.exact_cv(h, w, "fold", "mean"))) <= 1e-12


def test_never_held_out_rows_train_every_fold(ridge):
    """A negative fold id (or a row in no index tensor) trains in every fold and is
    never validated; both fold formats agree with exact CV."""
    ids = ridge.ids.clone()
    ids[:7] = -1
    w = torch.ones(ridge.n, dtype=DT)
    h = torch.tensor([0.3], dtype=DT)
    theta = ridge.full_fit(h, w)
    by_ids = acv_loss(ridge.rows, theta, h, ids, penalty=ridge.penalty)
    by_index = acv_loss(ridge.rows, theta, h, [torch.nonzero(ids == k)[:, 0] for k in range(4)],
                        penalty=ridge.penalty)
    exact, held = 0.0, 0
    for k in range(4):
        va = ids == k
        theta_k = ridge.fit(h, ~va, w, 1.0 / float((~va).sum()))
        exact = exact + ridge.rows(theta_k, h)[va].sum()
        held += int(va.sum())
    assert abs(float(by_ids - exact / held)) <= 1e-12
    assert abs(float(by_index - by_ids)) <= 1e-14


def test_fallback_without_vmap_gives_the_same(ridge, monkeypatch):
    """Where a loss has no batched (vmap) derivative, the fold Hessians come from
    one backward pass per entry, with the same value and gradient."""
    import aggregators.hypergrad._acv as acv_module

    h = torch.tensor([0.2], dtype=DT, requires_grad=True)
    theta = ridge.full_fit(h, torch.ones(ridge.n, dtype=DT))
    fast = acv_loss(ridge.rows, theta, h, ridge.ids, penalty=ridge.penalty)
    (g_fast,) = torch.autograd.grad(fast, h, retain_graph=True)

    def no_vmap(*args, **kwargs):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(acv_module, "jacrev", no_vmap)
    slow = acv_loss(ridge.rows, theta, h, ridge.ids, penalty=ridge.penalty)
    (g_slow,) = torch.autograd.grad(slow, h)
    assert abs(float((slow - fast).detach())) <= 1e-14
    assert rel(g_slow, g_fast) <= 1e-12


def test_integer_weights_equal_copies(ridge):
    """A row of weight 2 is two copies of it in the same fold (NS and IJ)."""
    w = torch.ones(ridge.n, dtype=DT)
    w[::3] = 2.0
    rep = torch.repeat_interleave(torch.arange(ridge.n), w.long())
    X, y, ids = ridge.X[rep], ridge.y[rep], ridge.ids[rep]

    def rows_rep(theta, h):
        return 0.5 * (X @ theta - y).pow(2)

    h = torch.tensor([-0.5], dtype=DT)
    # Not at its optimum on purpose: the identity holds at any theta.
    theta = ridge.full_fit(h, w) + 0.1
    for method in ("ns", "ij"):
        a = acv_loss(ridge.rows, theta, h, ridge.ids, penalty=ridge.penalty, weights=w,
                     method=method)
        b = acv_loss(rows_rep, theta, h, ids, penalty=ridge.penalty, method=method)
        assert abs(float(a - b)) <= 1e-12


def test_ridge_press_equals_brute_force_loo():
    """PRESS ``r_i / (1 - h_i)`` with sample weights and an unpenalised intercept,
    and its derivative in the penalty (residual measured: 2e-16)."""
    g = torch.Generator().manual_seed(1)
    n, p = 25, 4
    X = torch.cat([torch.randn(n, p, generator=g, dtype=DT), torch.ones(n, 1, dtype=DT)], 1)
    y = torch.randn(n, 2, generator=g, dtype=DT)
    w = torch.rand(n, generator=g, dtype=DT) + 0.5
    log_alpha = torch.tensor(0.4, dtype=DT, requires_grad=True)
    alpha = torch.cat([log_alpha.exp().expand(p), torch.zeros(1, dtype=DT)])
    press = ridge_loo_residuals(X, y, alpha, weights=w)
    brute = []
    for i in range(n):
        keep = torch.arange(n) != i
        A = X[keep].T @ (w[keep, None] * X[keep]) + torch.diag(alpha)
        theta = torch.linalg.solve(A, X[keep].T @ (w[keep, None] * y[keep]))
        brute.append(y[i] - X[i] @ theta)
    brute = torch.stack(brute)
    assert rel(press, brute) <= 1e-10
    g_press = torch.autograd.grad((w[:, None] * press**2).sum(), log_alpha, retain_graph=True)[0]
    g_brute = torch.autograd.grad((w[:, None] * brute**2).sum(), log_alpha)[0]
    assert abs(float(g_press - g_brute)) <= 1e-10 * abs(float(g_brute))


def test_linear_loo_squared_loss_is_press():
    """Sherman-Morrison with ``l = 0.5 (z - y)^2`` is the exact refit (``alpha`` of the
    sum form is ``lambda * n`` for the mean form's ``0.5 lambda ||theta||^2``)."""
    g = torch.Generator().manual_seed(2)
    n, p = 30, 4
    X = torch.randn(n, p, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    lam = 0.2
    theta = torch.linalg.solve(X.T @ X / n + lam * torch.eye(p, dtype=DT), X.T @ y / n)
    z_loo = linear_loo_predictions(
        X, theta, torch.zeros(()), lambda z, h: 0.5 * (z - y) ** 2,
        penalty=lambda t, h: 0.5 * lam * t @ t,
    )
    assert rel(y - z_loo, ridge_loo_residuals(X, y, lam * n)) <= 1e-10


# -- logistic / softmax: NS and IJ against exact K-fold ----------------------------------
class Softmax:
    """Multinomial logistic regression with intercept on synthetic rows.

    ``theta`` is the flat ``(d + 1) x C`` weight matrix (last row: intercepts);
    ``R = 0.5 (exp(h_0) ||weights||^2 + exp(h_1) ||intercepts||^2)`` (one
    entry of ``h``: both share it).
    """

    def __init__(self, n=400, d=6, n_classes=3, n_folds=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, d, generator=g, dtype=DT)
        logits = X @ torch.randn(d, n_classes, generator=g, dtype=DT)
        self.y = torch.multinomial(logits.softmax(1), 1, generator=g)[:, 0]
        self.X1 = torch.cat([X, torch.ones(n, 1, dtype=DT)], 1)
        self.ids = torch.randperm(n, generator=g) % n_folds
        self.shape = (d + 1, n_classes)
        mask = torch.zeros(self.shape, dtype=DT)
        mask[:d] = 1.0
        self.mask = mask.reshape(-1)
        self.n_folds = n_folds

    def rows(self, theta, h):
        return F.cross_entropy(self.X1 @ theta.view(self.shape), self.y, reduction="none")

    def penalty(self, theta, h):
        lam = h.exp()
        lam_b = lam[-1]
        return 0.5 * ((lam[0] * self.mask + lam_b * (1 - self.mask)) @ (theta * theta))

    def theta0(self):
        return torch.zeros(self.mask.numel(), dtype=DT)

    def fold_problems(self):
        """Exact cross-fitting as the engine does it: one problem per fold, stacked."""
        problems = []
        for k in range(self.n_folds):
            tr, va = self.ids != k, self.ids == k

            def inner(t, h, tr=tr):
                return self.rows(t, h)[tr].mean() + self.penalty(t, h)

            def outer(t, h, va=va):
                return self.rows(t, h)[va].sum() / len(self.ids)

            problems.append(BilevelProblem(inner, outer, self.theta0()))
        return stack_problems(problems)[0]


@pytest.fixture(scope="module")
def softmax() -> Softmax:
    return Softmax()


# Relative errors against exact 5-fold CV measured on these 400 rows (seed 0;
# seeds 1 and 2 in brackets, the largest of the two):
#   value:         h = -4: NS 4.9e-4 [8.1e-4], IJ 4.9e-4 [2.5e-3]
#                  h = -1: NS 6.4e-5 [5.8e-5], IJ 4.8e-4 [5.6e-4]
#   hypergradient: h = -4: NS 2.7e-3 [4.8e-3], IJ 4.8e-4 [3.0e-2]
#                  h = -1: NS 6.1e-4 [8.0e-4], IJ 1.5e-3 [1.3e-3]
# (the expected orders at this size: 1e-3 for NS, 1e-2 for IJ). NS is biased up,
# IJ down; both errors shrink as lambda grows (the fold steps get shorter).
@pytest.mark.parametrize("h0", [-4.0, -1.0])
def test_softmax_ns_and_ij_close_to_exact_kfold(softmax, h0):
    h = torch.tensor([h0], dtype=DT)
    ns_problem = acv_problem(softmax.rows, softmax.theta0(), softmax.ids,
                             penalty=softmax.penalty)
    theta, _, ok = solve_inner(ns_problem, h, tol=1e-12)
    assert ok
    ns = acv_loss(softmax.rows, theta, h, softmax.ids, penalty=softmax.penalty)
    ij = acv_loss(softmax.rows, theta, h, softmax.ids, penalty=softmax.penalty, method="ij")
    exact_problem = softmax.fold_problems()
    thetas, _, ok = solve_inner(exact_problem, h, theta.repeat(softmax.n_folds), tol=1e-12)
    assert ok
    exact = exact_problem.outer_loss(thetas, h)
    assert 0 < float(ns / exact - 1) <= 2e-3
    assert -1e-2 <= float(ij / exact - 1) < 0

    g_exact = hypergradient(exact_problem, thetas, h, "implicit-cg", tol=1e-12).grad
    g_ns = hypergradient(ns_problem, theta, h, "implicit-cg", tol=1e-12).grad
    ij_problem = acv_problem(softmax.rows, softmax.theta0(), softmax.ids,
                             penalty=softmax.penalty, method="ij")
    g_ij = hypergradient(ij_problem, theta, h, "implicit-cg", tol=1e-12).grad
    assert rel(g_ns, g_exact) <= 1e-2
    assert rel(g_ij, g_exact) <= 5e-2


@pytest.mark.parametrize("method", ["ns", "ij"])
def test_finite_differences_match_engine_hypergradient(softmax, method):
    """Central differences of ACV(theta*(h), h) against ``implicit-cg`` on two
    hyperparameters (weights' and intercepts' L2). Measured: 2.3e-10 relative
    (NS and IJ); the direct (Cholesky) linear solve agrees with CG to 1e-17."""
    problem = acv_problem(softmax.rows, softmax.theta0(), softmax.ids,
                          penalty=softmax.penalty, method=method)
    h = torch.tensor([-2.0, -1.0], dtype=DT)
    theta, _, _ = solve_inner(problem, h, tol=1e-13)
    res = hypergradient(problem, theta, h, "implicit-cg", tol=1e-13)
    eps = 1e-4
    fd = torch.zeros(2, dtype=DT)
    for j in range(2):
        e = torch.zeros(2, dtype=DT)
        e[j] = eps
        up, _, _ = solve_inner(problem, h + e, theta, tol=1e-13)
        down, _, _ = solve_inner(problem, h - e, theta, tol=1e-13)
        fd[j] = (problem.outer_loss(up, h + e) - problem.outer_loss(down, h - e)) / (2 * eps)
    assert rel(res.grad, fd) <= 1e-6
    direct = implicit_hypergradient(problem, theta, h, solver="direct")
    assert rel(direct.grad, res.grad) <= 1e-10


def test_unpenalised_intercepts_leave_the_hypergradient_finite(softmax):
    """Softmax intercepts without a penalty: the loss is flat along their common
    shift and every fold Hessian is singular there. The fold steps' backward
    must neither fail on it nor amplify rounding along it (without the flat
    directions added back, this solve is singular; stacking's fold steps gave
    hypergradients of 1e15); central differences agree."""

    def weights_only(theta, h):
        return 0.5 * h.exp()[0] * (softmax.mask @ (theta * theta))

    problem = acv_problem(softmax.rows, softmax.theta0(), softmax.ids, penalty=weights_only)
    h = torch.tensor([-2.0], dtype=DT)
    theta, _, _ = solve_inner(problem, h, tol=1e-13)
    res = hypergradient(problem, theta, h, "implicit-cg", tol=1e-13)
    eps = 1e-4
    up, _, _ = solve_inner(problem, h + eps, theta, tol=1e-13)
    down, _, _ = solve_inner(problem, h - eps, theta, tol=1e-13)
    fd = (problem.outer_loss(up, h + eps) - problem.outer_loss(down, h - eps)) / (2 * eps)
    assert torch.isfinite(res.grad).all()
    assert rel(res.grad, fd.reshape(1)) <= 1e-5


def test_acv_gradcheck_through_the_hessian():
    """Autograd of the NS loss in (theta, h) — third derivatives of the loss —
    against numerical differences, away from the optimum too."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(12, 2, generator=g, dtype=DT)
    y = (torch.rand(12, generator=g, dtype=DT) > 0.5).to(DT)

    def rows(t, h):
        return F.binary_cross_entropy_with_logits(X @ t, y, reduction="none")

    def pen(t, h):
        return 0.5 * h.exp().sum() * t @ t

    ids = torch.arange(12) % 3
    theta = torch.randn(2, generator=g, dtype=DT).requires_grad_(True)
    h = torch.tensor([-0.5], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, hh: acv_loss(rows, t, hh, ids, penalty=pen), (theta, h)
    )


@pytest.mark.parametrize("method", ["ns", "ij"])
def test_linear_path_equals_generic(softmax, method):
    """The structured fold Hessians of a linear predictor give the generic
    (autograd) path's fold solutions, loss and engine hypergradient, with sample
    weights and rows no fold holds out."""
    g = torch.Generator().manual_seed(6)
    w = torch.rand(len(softmax.y), generator=g, dtype=DT) + 0.5
    ids = softmax.ids.clone()
    ids[:13] = -1
    h = torch.tensor([-2.0, -1.0], dtype=DT)

    def loss(z, hh):
        return F.cross_entropy(z, softmax.y, reduction="none")

    def pen(t, hh):
        return softmax.penalty(t.reshape(-1), hh)

    opts = dict(penalty=softmax.penalty, weights=w, method=method)
    generic = acv_problem(softmax.rows, softmax.theta0(), ids, **opts)
    linear = linear_acv_problem(softmax.X1, loss, softmax.theta0().view(softmax.shape), ids,
                                **{**opts, "penalty": pen})
    theta, _, _ = solve_inner(generic, h, tol=1e-12)
    assert abs(float(linear.inner_loss(theta, h) - generic.inner_loss(theta, h))) <= 1e-14
    t_lin = linear_acv_fold_params(softmax.X1, theta.view(softmax.shape), h, loss, ids,
                                   penalty=pen, weights=w, method=method)
    t_gen = acv_fold_params(softmax.rows, theta, h, ids, **opts)
    assert rel(t_lin.reshape(t_gen.shape), t_gen) <= 1e-12
    for reduction in ("mean", "folds"):
        a = linear_acv_loss(softmax.X1, theta.view(softmax.shape), h, loss, ids, penalty=pen,
                            weights=w, method=method, reduction=reduction)
        b = acv_loss(softmax.rows, theta, h, ids, reduction=reduction, **opts)
        assert abs(float(a / b - 1)) <= 1e-12
    g_lin = hypergradient(linear, theta, h, "implicit-cg", tol=1e-13).grad
    g_gen = hypergradient(generic, theta, h, "implicit-cg", tol=1e-13).grad
    assert rel(g_lin, g_gen) <= 1e-10


def test_linear_path_ridge_is_exact(ridge):
    """Scalar output: the linear path's NS on squared loss is exact K-fold CV."""
    w = torch.ones(ridge.n, dtype=DT)
    h = torch.tensor([0.5], dtype=DT, requires_grad=True)
    acv = linear_acv_loss(ridge.X, ridge.full_fit(h, w), h,
                          lambda z, hh: 0.5 * (z - ridge.y) ** 2, ridge.ids,
                          penalty=ridge.penalty)
    exact = ridge.exact_cv(h, w, "fold", "mean")
    assert abs(float((acv - exact).detach())) <= 1e-12 * float(exact.detach())
    g_acv, = torch.autograd.grad(acv, h)
    g_exact, = torch.autograd.grad(exact, h)
    assert rel(g_acv, g_exact) <= 1e-10


# -- closed-form leave-one-out vs brute-force Newton steps -------------------------------
def _brute_force_loo(rows, X, theta, h, penalty, out_shape):
    """``z_tilde_i = x_i^T theta_tilde_{-i}`` from n one-row folds (NS, normalize='full')."""
    n = X.shape[0]
    thetas = acv_fold_params(rows, theta.reshape(-1), h, torch.arange(n), penalty=penalty,
                             normalize="full")
    return torch.stack([X[i] @ thetas[i].view(out_shape) for i in range(n)])


def _differentiable_optimum(problem, h):
    """``theta*(h)`` with its derivative in ``h``: one Newton step from the solved
    optimum (a zero step in value; its derivative is ``-H^{-1} d2L/dtheta dh``)."""
    theta, _, ok = solve_inner(problem, h.detach(), tol=1e-13)
    assert ok
    th = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(problem.inner_loss(th, h), th, create_graph=True)
    hess = torch.func.jacrev(torch.func.jacrev(lambda t: problem.inner_loss(t, h.detach())))(theta)
    return theta - torch.linalg.solve(hess, grad)


def test_sherman_morrison_loo_equals_newton_step_logistic():
    """Scalar Sherman-Morrison ``z + l' h / (1 - l'' h)`` with sample weights, and
    its total derivative in the hyperparameter (measured: 2e-16 and 2e-16)."""
    g = torch.Generator().manual_seed(4)
    n, p = 40, 3
    X = torch.cat([torch.randn(n, p, generator=g, dtype=DT), torch.ones(n, 1, dtype=DT)], 1)
    y = (X[:, 0] + torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
    w = torch.rand(n, generator=g, dtype=DT) + 0.5
    h = torch.tensor([-1.0], dtype=DT, requires_grad=True)

    def loss(z, hh):
        return F.binary_cross_entropy_with_logits(z, y, reduction="none")

    def rows(t, hh):
        return loss(X @ t, hh)

    def pen(t, hh):
        return 0.5 * hh.exp().sum() * t @ t

    problem = acv_problem(rows, torch.zeros(p + 1, dtype=DT), torch.arange(n), penalty=pen,
                          weights=w)
    theta = _differentiable_optimum(problem, h)
    z_sm = linear_loo_predictions(X, theta, h, loss, penalty=pen, weights=w)
    thetas = acv_fold_params(rows, theta, h, torch.arange(n), penalty=pen, weights=w,
                             normalize="full")
    z_bf = (X * thetas).sum(1)
    assert rel(z_sm, z_bf) <= 1e-10
    # Held at a fixed theta the two differ (the brute force sees d(grad R)/dh,
    # which the closed form drops because the full gradient vanishes); along
    # theta*(h) they agree.
    (g_sm,) = torch.autograd.grad(z_sm.sum(), h, retain_graph=True)
    (g_bf,) = torch.autograd.grad(z_bf.sum(), h)
    assert rel(g_sm, g_bf) <= 1e-9


def test_woodbury_loo_equals_newton_step_softmax():
    """Softmax meta-learner: ``z + A (I - B A)^{-1} l'`` with C x C blocks
    (measured: 4e-16)."""
    g = torch.Generator().manual_seed(5)
    n, d, C = 36, 3, 3
    X = torch.cat([torch.randn(n, d, generator=g, dtype=DT), torch.ones(n, 1, dtype=DT)], 1)
    y = torch.randint(0, C, (n,), generator=g)
    h = torch.tensor([-1.5], dtype=DT)
    shape = (d + 1, C)

    def loss(z, hh):
        return F.cross_entropy(z, y, reduction="none")

    def rows(t, hh):
        return loss(X @ t.view(shape), hh)

    def pen(t, hh):
        return 0.5 * hh.exp().sum() * (t * t).sum()

    problem = acv_problem(rows, torch.zeros(shape, dtype=DT).reshape(-1), torch.arange(n),
                          penalty=pen)
    theta, _, _ = solve_inner(problem, h, tol=1e-13)
    z_wb = linear_loo_predictions(X, theta.view(shape), h, loss, penalty=pen)
    z_bf = _brute_force_loo(rows, X, theta, h, pen, shape)
    assert z_wb.shape == (n, C)
    assert rel(z_wb, z_bf) <= 1e-10


# -- errors -------------------------------------------------------------------------------
def _tiny():
    X = torch.randn(6, 2, dtype=DT)
    return (lambda t, h: (X @ t) ** 2), torch.zeros(2, dtype=DT), torch.zeros(1, dtype=DT)


@pytest.mark.parametrize(
    "folds, options, match",
    [
        (torch.tensor([0, 1, 0, 1, 0]), {}, "one id per row"),
        (torch.tensor([-1] * 6), {}, "every id is negative"),
        ([torch.tensor([0, 1]), torch.tensor([1, 2])], {}, "overlap"),
        ([torch.tensor([0, 9])], {}, "outside"),
        (torch.tensor([0, 2, 0, 2, 0, 2]), {}, r"fold\(s\) \[1\] hold no row"),
        (torch.zeros(6, dtype=torch.long), {}, "empty"),
        (torch.arange(6) % 2, {"method": "exact"}, "method must be one of"),
        (torch.arange(6) % 2, {"normalize": "sum"}, "normalize must be one of"),
        (torch.arange(6) % 2, {"reduction": "sum"}, "reduction must be one of"),
    ],
)
def test_errors(folds, options, match):
    rows, theta, h = _tiny()
    with pytest.raises(ValueError, match=match):
        acv_loss(rows, theta, h, folds, **options)


def test_fold_membership_formats_agree():
    ids = torch.tensor([2, 0, 1, -1, 0, 2])
    by_ids = fold_membership(ids, 6)
    by_index = fold_membership([torch.tensor([1, 4]), torch.tensor([2]), torch.tensor([0, 5])], 6)
    assert torch.equal(by_ids, by_index)
    assert by_ids.sum(0).tolist() == [1, 1, 1, 0, 1, 1]


def test_other_errors_in_the_fold_hessians_are_not_swallowed(ridge, monkeypatch):
    """Out of memory (or any error but a missing vmap rule) surfaces as it is."""
    import aggregators.hypergrad._acv as acv_module

    h = torch.tensor([0.2], dtype=DT, requires_grad=True)
    theta = ridge.full_fit(h, torch.ones(ridge.n, dtype=DT))

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(acv_module, "jacrev", oom)
    with pytest.raises(torch.OutOfMemoryError):
        acv_loss(ridge.rows, theta, h, ridge.ids, penalty=ridge.penalty)


# -- exact K-fold ridge in closed form (linear_kfold_problem) -------------------------
def _kfold_masks(ridge: RidgeData, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    val = torch.stack([(ridge.ids == k).to(DT) for k in range(ridge.n_folds)])
    return (1 - val) * w, val * w


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_closed_form_kfold_equals_exact_kfold(ridge, weighted):
    """Value and derivative in log lambda equal the refit per fold (FORMULAS.md,
    ridge identities) to 1e-10; the loss here has no 0.5, so the penalty doubles."""
    from aggregators.hypergrad._acv_linear import linear_kfold_problem

    w = ridge.w if weighted else torch.ones(ridge.n, dtype=DT)
    train, val = _kfold_masks(ridge, w)
    problem, solutions = linear_kfold_problem(
        ridge.X, ridge.y, train, val, lambda t, h: 2 * ridge.penalty(t, h),
        diagonal_penalty=True,
    )
    for log_lam in (-3.0, 0.0, 1.5):
        h = torch.tensor([log_lam], dtype=DT, requires_grad=True)
        want = 2 * ridge.exact_cv(h, w, "fold", "folds")
        (d_want,) = torch.autograd.grad(want, h)
        got = problem.outer_loss(problem.theta0, h)
        assert rel(got, want) < 1e-10
        res = hypergradient(problem, problem.theta0, h.detach(), "implicit-cg")
        assert rel(res.grad, d_want) < 1e-10
        for k in range(ridge.n_folds):
            tr = ridge.ids != k
            theta_k = ridge.fit(h.detach(), tr, w, 1.0 / w[tr].sum())
            assert rel(solutions(h.detach())[k], theta_k) < 1e-10


@pytest.mark.parametrize("diagonal", [True, False], ids=["diagonal", "dense"])
def test_closed_form_leave_one_out_is_press(ridge, diagonal):
    """With every row its own fold the validation residuals are PRESS's (Allen),
    and the dense-penalty path gives what the diagonal one does."""
    from aggregators.hypergrad._acv_linear import linear_kfold_problem

    n = ridge.n
    val = torch.eye(n, dtype=DT)
    _, solutions = linear_kfold_problem(
        ridge.X, ridge.y, 1 - val, val, lambda t, h: 0.5 * h.exp().sum() * t @ t,
        diagonal_penalty=diagonal,
    )
    h = torch.tensor([-1.0], dtype=DT)
    loo = ridge.y - (ridge.X * solutions(h)).sum(1)
    # Mean loss over n - 1 rows with 0.5 lam ||theta||^2 is the summed loss with
    # alpha = 0.5 (n - 1) lam.
    press = ridge_loo_residuals(ridge.X, ridge.y, 0.5 * (n - 1) * h.exp())
    assert rel(loo, press) < 1e-10


def test_quadratic_penalty_kind():
    from aggregators.hypergrad._acv_linear import quadratic_penalty_kind

    h = [torch.tensor([0.3], dtype=DT)]
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=DT)
    assert quadratic_penalty_kind(lambda t, h: h.exp().sum() * t @ t + t.sum(), 2, h,
                                  dtype=DT) == "diagonal"
    assert quadratic_penalty_kind(lambda t, h: h.exp().sum() * t @ A @ t, 2, h,
                                  dtype=DT) == "dense"
    assert quadratic_penalty_kind(lambda t, h: t.pow(4).sum(), 2, h, dtype=DT) is None
    assert quadratic_penalty_kind(None, 2, h, dtype=DT) == "diagonal"
    constant = torch.tensor(1.0, dtype=DT)  # no graph to theta at all
    assert quadratic_penalty_kind(lambda t, h: constant, 2, h, dtype=DT) == "diagonal"


def test_closed_form_kfold_rejects_empty_splits(ridge):
    from aggregators.hypergrad._acv_linear import linear_kfold_problem

    train, val = _kfold_masks(ridge, torch.ones(ridge.n, dtype=DT))
    val[0] = 0.0
    with pytest.raises(ValueError, match="positive total weight"):
        linear_kfold_problem(ridge.X, ridge.y, train, val)


def _stacking_penalty_parts(passthrough: bool):
    """Stacking's penalty on 4 models (+ 2 passthrough features) as the closed form sees it."""
    from aggregators import Stacking
    from aggregators._base import AggregationContext
    from aggregators._bilevel import HyperSpace, ParamPacker, _tuned_values

    agg = Stacking(passthrough=passthrough)
    ctx = AggregationContext(
        task="regression", n_models=4, n_outputs=1, n_features=2, model_names=list("abcd"),
        classes=None, device=torch.device("cpu"), dtype=DT,
        generator=torch.Generator().manual_seed(0), n_train=50,
    )
    agg.bind(ctx)
    Z = torch.randn(50, 4, 1, dtype=DT, generator=torch.Generator().manual_seed(1))
    X = torch.randn(50, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    init = agg.init_params(ctx, Z, torch.zeros(50, 1, dtype=DT), X)
    packer = ParamPacker(init)
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    values, as_hyper, n_values = _tuned_values(space)
    p = sum(packer.sizes)

    def penalty(t, u):
        return agg.penalty(packer.unflatten(t), space.values(u))

    def penalty_v(t, v):
        return agg.penalty(packer.unflatten(t), as_hyper(v))

    return penalty, penalty_v, values, n_values, p, space


@pytest.mark.parametrize("passthrough", [False, True], ids=["stacking", "passthrough"])
def test_linear_penalty_terms_are_the_autograd_terms(passthrough):
    """Stacking's L2 weights enter its penalty linearly: the terms read off once
    are the same numbers (value and derivative in h) as autograd's at every h."""
    from aggregators.hypergrad._acv_linear import linear_penalty_terms, quadratic_penalty_terms

    penalty, penalty_v, values, n_values, p, space = _stacking_penalty_parts(passthrough)
    lower, upper = space.bounds()
    affine = linear_penalty_terms(
        penalty_v, values, p, n_values, [space.initial(), lower, upper], diagonal=True, dtype=DT
    )
    assert affine is not None
    gen = torch.Generator().manual_seed(3)
    for shift in (-2.0, 0.0, 3.0):
        u = space.initial() + shift + 0.5 * torch.randn(n_values, dtype=DT, generator=gen)
        uu = u.clone().requires_grad_(True)
        R, r = affine(uu)
        R_ref, r_ref = quadratic_penalty_terms(penalty, p, uu, diagonal=True, dtype=DT)
        assert torch.equal(R.detach(), R_ref.detach()) and torch.equal(r.detach(), r_ref.detach())
        weights = torch.linspace(0.5, 2.0, p, dtype=DT)
        (g,) = torch.autograd.grad((weights * torch.diagonal(R)).sum(), uu)
        (g_ref,) = torch.autograd.grad((weights * torch.diagonal(R_ref)).sum(), uu)
        torch.testing.assert_close(g, g_ref, rtol=1e-15, atol=0)


def test_linear_penalty_terms_refuse_a_nonlinear_penalty():
    """A penalty not affine in its values (l2 squared, a series combination) or
    undefined at 0 gets ``None``: the closed form then uses autograd's terms."""
    from aggregators.hypergrad._acv_linear import linear_penalty_terms

    hs = [torch.tensor([0.3, -1.0], dtype=DT), torch.tensor([2.0, 1.0], dtype=DT)]
    values = torch.exp
    squared = lambda t, v: 0.5 * (v.pow(2) * t.pow(2)).sum()  # noqa: E731
    series = lambda t, v: 0.5 * (v[0] * v[1] / (v[0] + v[1])) * t @ t  # noqa: E731
    linear = lambda t, v: 0.5 * (v * t.pow(2)).sum() + v[0] * t.sum()  # noqa: E731
    # Quartic in theta, but with the gradients of 0.5 v t^2 at theta = 0 and 1:
    # the table reads it as the quadratic, the check at random theta does not.
    quartic = lambda t, v: (v * (0.25 * t.pow(4) + 0.25 * t.pow(2))).sum()  # noqa: E731
    assert linear_penalty_terms(squared, values, 2, 2, hs, diagonal=True, dtype=DT) is None
    assert linear_penalty_terms(series, values, 2, 2, hs, diagonal=True, dtype=DT) is None
    assert linear_penalty_terms(quartic, values, 2, 2, hs, diagonal=True, dtype=DT) is None
    affine = linear_penalty_terms(linear, values, 2, 2, hs, diagonal=True, dtype=DT)
    assert affine is not None
    R, r = affine(hs[1])
    v = hs[1].exp()
    torch.testing.assert_close(torch.diagonal(R), v)
    torch.testing.assert_close(r, torch.stack([v[0], v[0]]))
    # No tuned values (hyperparams="fixed"): constant terms, differentiable in
    # the empty h all the same (the engine takes a gradient in it).
    empty = torch.zeros(0, dtype=DT)
    fixed = lambda t, v: 0.5 * 3.0 * t @ t + t.sum()  # noqa: E731
    const = linear_penalty_terms(fixed, values, 2, 0, [empty], diagonal=True, dtype=DT)
    R, r = const(empty.clone().requires_grad_(True))
    torch.testing.assert_close(R, 3.0 * torch.eye(2, dtype=DT))
    torch.testing.assert_close(r, torch.ones(2, dtype=DT))
    assert R.requires_grad


@pytest.mark.parametrize("method", ["implicit-cg", "hoag", "implicit-neumann"])
def test_no_inner_parameters_take_the_direct_hypergradient(ridge, method):
    """Without inner parameters (splits fitted in closed form) tune() takes the
    outer loss's derivative in one backward pass: the same value and
    hypergradient as the implicit methods' empty linear solves give."""
    from aggregators.hypergrad._acv_linear import linear_kfold_problem
    from aggregators.hypergrad._tuner import _direct_hypergradient

    train, val = _kfold_masks(ridge, torch.ones(ridge.n, dtype=DT))
    problem, _ = linear_kfold_problem(
        ridge.X, ridge.y, train, val, lambda t, h: 0.5 * h.exp().sum() * t @ t,
        diagonal_penalty=True,
    )
    for log_lam in (-3.0, 0.5):
        h = torch.tensor([log_lam], dtype=DT)
        opts = {"iteration": 2} if method == "hoag" else {}
        want = hypergradient(problem, problem.theta0, h, method, **opts)
        got = _direct_hypergradient(problem, problem.theta0, h)
        assert torch.equal(got.value, want.value)
        assert torch.equal(got.grad, want.grad)


def test_linear_penalty_terms_without_vmap_are_the_same():
    """A penalty that does not run under vmap (a float taken from a tensor) gets
    its terms from one backward pass instead: the same numbers."""
    from aggregators.hypergrad._acv_linear import linear_penalty_terms

    hs = [torch.tensor([0.3, -1.0], dtype=DT), torch.tensor([2.0, 1.0], dtype=DT)]
    batched = lambda t, v: 0.5 * (v * t.pow(2)).sum() + v[0] * t.sum()  # noqa: E731

    def unbatchable(t, v):
        scale = float(v.sum()) * 0 + 1.0  # .item() on a batched tensor fails under vmap
        return scale * batched(t, v)

    a = linear_penalty_terms(batched, torch.exp, 2, 2, hs, diagonal=True, dtype=DT)
    b = linear_penalty_terms(unbatchable, torch.exp, 2, 2, hs, diagonal=True, dtype=DT)
    for h in hs:
        for x, y in zip(a(h), b(h)):
            assert torch.equal(x, y)
