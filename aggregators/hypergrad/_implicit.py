"""Implicit differentiation: dQ/dh = d_h Q - (d2_{h theta} L)^T H^{-1} d_theta Q.

The inverse-Hessian-vector product is found by conjugate gradient (exact up
to ``tol``), by a truncated Neumann series (Lorraine et al. 2020), both from
Hessian-vector products only, or directly from the exact Hessian blocks when
the problem declares small independent blocks (``"direct"``).
"""

from __future__ import annotations

from typing import Callable

import torch

from ._inner import lipschitz_estimate
from ._newton import (
    block_sizes, block_solve, decide_exact_hessian, factor_solve, hessian_blocks,
)
from ._problem import BilevelProblem, HypergradResult, fd_mixed_product, outer_grads, vjp

__all__ = ["conjugate_gradient", "implicit_hypergradient", "neumann_series"]

MatVec = Callable[[torch.Tensor], torch.Tensor]


def conjugate_gradient(
    matvec: MatVec,
    b: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
    x0: torch.Tensor | None = None,
    blocks: tuple[int, ...] | None = None,
    precond: MatVec | None = None,
) -> tuple[torch.Tensor, int, float]:
    """Solve ``A x = b`` for symmetric positive (semi)definite ``A``.

    Parameters
    ----------
    matvec : callable
        ``v -> A v``.
    b : Tensor
        Right-hand side.
    max_iter : int, default=100
    tol : float, default=1e-10
        Stop when ``||r|| <= tol * ||b||``.
    x0 : Tensor, default=None
        Starting point (zero when omitted), e.g. the solution of a nearby
        system; it costs one more product.
    blocks : tuple of int, default=None
        Sizes of consecutive blocks of a block-diagonal ``A`` (one per
        cross-fitting fold). Each block then gets its own step lengths, as if
        it were solved alone, while one ``matvec`` serves all: a block with
        ``k`` distinct eigenvalues is solved in ``k`` products, where one
        recursion over the whole system needs as many products as the blocks
        have distinct eigenvalues together. A block meeting non-positive
        curvature stops where it is; the others go on.
    precond : callable, default=None
        ``r -> M r`` for a symmetric positive definite ``M ~ A^{-1}``, block
        diagonal like ``A`` (preconditioned conjugate gradient). The stopping
        test stays on the plain residual ``||r||``.

    Returns
    -------
    x : Tensor
    n_iter : int
    rel_residual : float
    """
    if blocks is not None and sum(blocks) != b.numel():
        raise ValueError(
            f"blocks must add up to the system's size {b.numel()}; got {tuple(blocks)}."
        )
    if blocks is not None and len(blocks) > 1:
        n_blocks = len(blocks)
        which = torch.repeat_interleave(
            torch.arange(n_blocks, device=b.device), torch.as_tensor(blocks, device=b.device)
        )

        def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # one per block
            return torch.zeros(n_blocks, dtype=u.dtype, device=u.device).index_add_(0, which, u * v)

        def spread(c: torch.Tensor) -> torch.Tensor:  # per block -> per entry
            return c[which]
    else:
        def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return (u @ v).reshape(1)

        def spread(c: torch.Tensor) -> torch.Tensor:
            return c

    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.detach().clone()
        r = b - matvec(x)
    z = r if precond is None else precond(r)
    p = z.clone()
    rz = dot(r, z)  # the recursion's inner product (r^T M r)
    rr = rz if precond is None else dot(r, r)  # the stopping test's (r^T r)
    b_norm = b.norm().clamp_min(torch.finfo(b.dtype).tiny)
    thresh = (tol * b_norm) ** 2
    live = rz > 0
    one = torch.ones_like(rz)
    it = 0
    for it in range(1, max_iter + 1):
        if rr.sum() <= thresh:
            it -= 1
            break
        ap = matvec(p)
        pap = dot(p, ap)
        # Non-positive curvature along p: that block stops where it is.
        live = live & (pap > 0)
        if not bool(live.any()):
            break
        alpha = torch.where(live, rz / torch.where(live, pap, one), 0.0)
        x = x + spread(alpha) * p
        r = r - spread(alpha) * ap
        z = r if precond is None else precond(r)
        rz_new = dot(r, z)
        rr = rz_new if precond is None else dot(r, r)
        beta = torch.where(live, rz_new / torch.where(live, rz, one), 0.0)
        p = spread(live.to(p.dtype)) * (z + spread(beta) * p)
        rz = rz_new
    return x, it, float((rr.sum().sqrt() / b_norm).detach())


def neumann_series(
    matvec: MatVec, b: torch.Tensor, *, alpha: float, n_terms: int = 50
) -> torch.Tensor:
    """Approximate ``A^{-1} b`` by ``alpha * sum_{j=0}^{K} (I - alpha A)^j b``.

    ``K = n_terms`` matrix-vector products, so ``K + 1`` powers are summed.
    At an inner optimum this equals reverse mode through ``K + 1`` gradient
    steps of size ``alpha`` (Lorraine et al. 2020, Thm. 1): truncated reverse
    with ``n_steps=K`` matches ``n_terms=K - 1``. It converges when
    ``0 < alpha < 2 / lambda_max(A)``.
    """
    v = b.clone()
    p = b.clone()
    for _ in range(n_terms):
        v = v - alpha * matvec(v)
        p = p + v
    return alpha * p


#: Conjugate-gradient iterations allowed to the solve preconditioned by the
#: inner solve's last Newton factors before the Hessian blocks are formed anew.
#: Factors from one Newton step away are close to those at the solution, so
#: the preconditioned solve needs few iterations; one that needs more is
#: better served by fresh blocks.
NEWTON_FACTOR_MAX_ITER = 8


def _refine_with_newton_factor(problem, theta, h, b, tol, v0):
    """``H^{-1} b`` at ``theta`` by conjugate gradient, preconditioned by the
    Cholesky factors the inner solve's last Newton step used (one step from
    ``theta``, at the same ``h``): a few closed-form Hessian-vector products
    instead of forming and factorising the blocks again. ``None`` where no
    such factors exist or they do not bring the residual to ``tol``."""
    factor = problem.newton_factor
    if factor is None:
        return None
    fh, chol = factor
    if fh.shape != h.shape or not torch.equal(fh, h.detach()):
        return None
    sizes = block_sizes(problem, theta)
    if chol.shape[0] != len(sizes):
        return None
    matvec = problem.inner_hvp(theta.detach(), h.detach())
    v, n_it, res = conjugate_gradient(
        matvec, b, max_iter=NEWTON_FACTOR_MAX_ITER, tol=tol,
        x0=v0 if v0 is not None and v0.shape == b.shape else None,
        blocks=sizes, precond=lambda r: factor_solve(chol, r, sizes),
    )
    if not res <= tol:
        return None
    return v, n_it, res


def implicit_hypergradient(
    problem: BilevelProblem,
    theta: torch.Tensor,
    h: torch.Tensor,
    *,
    solver: str = "cg",
    max_iter: int = 100,
    tol: float = 1e-10,
    damping: float = 0.0,
    n_terms: int = 50,
    alpha: float | None = None,
    mixed: str = "autograd",
    fd_eps: float = 0.01,
    v0: torch.Tensor | None = None,
) -> HypergradResult:
    """Hypergradient by the implicit function theorem at an inner optimum.

    ``dQ/dh = d_h Q - (d2_{h theta} L) H^{-1} d_theta Q`` at ``theta``. It
    assumes ``theta`` is a stationary point of ``L(., h)`` with an invertible
    Hessian ``H`` there (exact when both hold; its error is first order in
    the inner gradient otherwise), and ``L`` twice differentiable.

    Where the problem gives its products in closed form
    (:attr:`BilevelProblem.inner_hvp`, or :attr:`~BilevelProblem.inner_hessian`
    for the direct solve, with :attr:`~BilevelProblem.mixed_product`), they
    replace autograd's; ``info["analytic"]`` says which were used.

    Parameters
    ----------
    problem : BilevelProblem
    theta : Tensor
        A (near-)stationary point of ``L(., h)``.
    h : Tensor
        Hyperparameters.
    solver : {"cg", "neumann", "direct", "auto"}, default="cg"
        How ``H v = d_theta Q`` is solved: conjugate gradient (with step
        lengths per block of ``problem.blocks``), Neumann
        series, or Cholesky factors of the exact Hessian blocks
        (``problem.blocks``; as many Hessian-vector products as the largest
        block has entries, in one vectorised pass). ``"auto"``: direct when
        the engine forms the problem's Hessian blocks
        (:func:`~aggregators.hypergrad._newton.decide_exact_hessian`), else
        conjugate gradient.
    max_iter, tol : int, float
        Conjugate-gradient bounds.
    damping : float, default=0.0
        Added to the Hessian's diagonal (Levenberg style) for near-singular
        inner problems.
    n_terms : int, default=50
        Hessian-vector products of the Neumann series (it sums the powers
        ``0..n_terms``; see :func:`neumann_series`).
    alpha : float, default=None
        Neumann step; ``1 / lambda_max(H)`` by power iteration when omitted.
    mixed : {"autograd", "fd"}, default="autograd"
        How the mixed product ``(d2_{h theta} L) v`` is formed: by a second
        backward pass, or by the DARTS central difference of ``d_h L``
        (:func:`fd_mixed_product`, first-order gradients only, error
        ``O(fd_eps^2)``).
    fd_eps : float, default=0.01
        Length of the finite-difference perturbation of ``theta``.
    v0 : Tensor, default=None
        Start of conjugate gradient: :func:`tune` passes the solution of the
        previous outer evaluation, whose system differs little (the same
        warm start HOAG uses). The solution is returned as ``info["v"]``.

    Returns
    -------
    HypergradResult

    References
    ----------
    Pedregosa, F. (2016). Hyperparameter optimization with approximate
    gradient. ICML.

    Lorraine, J., Vicol, P., & Duvenaud, D. (2020). Optimizing millions of
    hyperparameters by implicit differentiation. AISTATS.
    """
    if mixed not in ("autograd", "fd"):
        raise ValueError(f"mixed must be 'autograd' or 'fd'; got {mixed!r}.")
    q, g_theta, g_h = outer_grads(problem, theta, h)
    if solver == "auto":
        solver = "direct" if decide_exact_hessian(problem, theta, h) else "cg"
    # Closed-form products where the problem has them and the hypergradient
    # can be finished without a graph (its mixed product given too).
    analytic = problem.mixed_product is not None and (
        problem.inner_hessian is not None if solver == "direct"
        else problem.inner_hvp is not None
    )
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        hh = h.detach().requires_grad_(True)
        blocks = None
        g_inner = None
        refined = None
        if analytic and solver == "direct" and problem.inner_hvp is not None and not damping:
            refined = _refine_with_newton_factor(problem, theta, h, g_theta, tol, v0)
        if refined is not None:
            v, n_it, res = refined
        elif analytic:
            if solver == "direct":
                sizes = block_sizes(problem, theta)
                blocks = problem.inner_hessian(theta.detach(), h.detach())
            else:
                matvec = problem.inner_hvp(theta.detach(), h.detach())
        elif solver == "direct":
            sizes = block_sizes(problem, theta)
            g_inner = torch.autograd.grad(
                problem.second_order_loss(th, hh), th, create_graph=True
            )[0]
            blocks = hessian_blocks(g_inner, th, sizes)
        else:
            g_inner = torch.autograd.grad(problem.inner_loss(th, hh), th, create_graph=True)[0]

            def matvec(v: torch.Tensor) -> torch.Tensor:
                (out,) = vjp(g_inner, th, v, retain_graph=True)
                return out

        def hvp(v: torch.Tensor) -> torch.Tensor:
            out = matvec(v)
            return out + damping * v if damping else out
        info: dict = {"solver": solver, "analytic": analytic}
        if refined is not None:
            info.update(linear_iter=n_it, residual=res, v=v.detach(), newton_factor=True)
        elif blocks is not None:
            if damping:
                eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
                blocks = blocks + damping * eye
            # An indefinite Hessian (not at a minimum) gets the smallest
            # Levenberg damping that makes it positive definite.
            v, lam = block_solve(blocks.detach(), g_theta, sizes)
            info.update(linear_iter=0, damping=lam, v=v.detach())
        elif solver == "cg":
            if v0 is not None and v0.shape != g_theta.shape:
                v0 = None
            precond = None
            if analytic and problem.inner_preconditioner is not None and not damping:
                precond = problem.inner_preconditioner(theta.detach(), h.detach())
            v, n_it, res = conjugate_gradient(
                hvp, g_theta, max_iter=max_iter, tol=tol, x0=v0,
                blocks=block_sizes(problem, theta), precond=precond,
            )
            info.update(linear_iter=n_it, residual=res, v=v.detach(),
                        preconditioned=precond is not None)
        elif solver == "neumann":
            if alpha is None:
                alpha = float(1.0 / (lipschitz_estimate(problem, theta, h) + damping))
            v = neumann_series(hvp, g_theta, alpha=alpha, n_terms=n_terms)
            info.update(linear_iter=n_terms, alpha=alpha)
        else:
            raise ValueError(
                f"solver must be 'cg', 'neumann', 'direct' or 'auto'; got {solver!r}."
            )
        if mixed == "fd":
            prod = fd_mixed_product(problem, theta.detach(), h, v.detach(), fd_eps)
        elif analytic:
            prod = problem.mixed_product(theta.detach(), h.detach(), v.detach())
        else:
            (prod,) = vjp(g_inner, hh, v.detach(), allow_unused=True)
    if prod is None:
        prod = torch.zeros_like(h)
    info["mixed"] = mixed
    return HypergradResult(value=q, grad=(g_h - prod).detach(), theta=theta, info=info)
