"""Inner solvers: Newton or L-BFGS to (near) optimality."""

from __future__ import annotations

import torch

from ._lbfgs import lbfgs
from ._newton import decide_exact_hessian, newton_solve
from ._problem import BilevelProblem, InnerDivergenceError, vjp

__all__ = ["solve_inner", "lipschitz_estimate"]

#: Newton steps before L-BFGS takes over.
NEWTON_MAX_ITER = 20


def solve_inner(
    problem: BilevelProblem,
    h: torch.Tensor,
    theta0: torch.Tensor | None = None,
    *,
    max_iter: int = 500,
    tol: float = 1e-7,
    tolerance_change: float = 1e-20,
    solver: str = "auto",
) -> tuple[torch.Tensor, int, bool]:
    """Minimise ``L(., h)`` from ``theta0`` with Newton or L-BFGS.

    Parameters
    ----------
    problem : BilevelProblem
    h : Tensor
        Hyperparameters, held fixed.
    theta0 : Tensor, default=None
        Warm start; ``problem.theta0`` when omitted.
    max_iter : int, default=500
        Bound on L-BFGS iterations.
    tol : float, default=1e-7
        Stop when the gradient's max-norm falls below ``tol``.
    tolerance_change : float, default=1e-20
        L-BFGS also stops when the loss or the step changes by less than
        this. The default stops only once float64 no longer registers
        progress, so ``tol`` is what decides: on flat (softmax-weight)
        problems the loss changes by less than 1e-14 per step well before
        the gradient meets ``tol``, and a larger threshold would stop there.
    solver : {"auto", "newton", "lbfgs"}, default="auto"
        ``"newton"``: damped Newton with exact Hessian blocks
        (:func:`newton_solve`), finished by L-BFGS if its line search stalls
        or it has not converged in ``NEWTON_MAX_ITER`` steps;
        ``"lbfgs"``: L-BFGS with a strong-Wolfe line search (:func:`lbfgs`);
        ``"auto"``: Newton when the engine forms the problem's exact Hessian
        blocks (:func:`decide_exact_hessian`: at most ``NEWTON_MAX_BLOCK``
        parameters per block, batched second derivatives available), else
        L-BFGS.

    Returns
    -------
    theta : Tensor
        The solution (detached).
    n_iter : int
        Iterations used.
    converged : bool
        Whether the gradient tolerance was met.

    Raises
    ------
    InnerDivergenceError
        When the loss or the parameters become non-finite.
    """
    if solver not in ("auto", "newton", "lbfgs"):
        raise ValueError(f"solver must be 'auto', 'newton' or 'lbfgs'; got {solver!r}.")
    h = h.detach()
    start = problem.theta0 if theta0 is None else theta0
    if start.numel() == 0:
        return start.detach().clone(), 0, True
    newton_iter = 0
    if solver == "newton" or (solver == "auto" and decide_exact_hessian(problem, start, h)):
        # Newton converges in a handful of steps or not at all (an optimum at
        # infinity, as softmax weights have once their L2 vanishes, where
        # damped steps crawl): a few steps, then L-BFGS finishes.
        theta, newton_iter, converged = newton_solve(
            problem, h, start, max_iter=min(max_iter, NEWTON_MAX_ITER), tol=tol
        )
        if converged:
            return theta, newton_iter, True
        start = theta  # a stalled line search: L-BFGS finishes from here

    last: list = [None, None]  # the last point evaluated and its gradient

    def fun_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if problem.inner_value_grad is not None:  # closed form: no graph to build
            value, g = problem.inner_value_grad(x.detach(), h)
            last[:] = x, g
            return value, g
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            loss = problem.inner_loss(xx, h)
            # A NaN loss can come with a finite gradient (a NaN term constant
            # in theta): lbfgs checks the loss itself and stops there.
            (g,) = torch.autograd.grad(loss, xx)
        return loss.detach(), g

    precond = None
    if problem.inner_value_grad is not None and problem.inner_preconditioner is not None:
        precond = problem.inner_preconditioner(start.detach(), h)
    theta, n_iter, _ = lbfgs(
        fun_grad, start, max_iter=max_iter, tol=tol, tolerance_change=tolerance_change,
        precond=precond,
    )
    n_iter += newton_iter
    theta = theta.detach()
    # L-BFGS returns the last point it evaluated: its gradient is known.
    g = last[1] if last[0] is not None and torch.equal(last[0], theta) else None
    if g is None:
        g = problem.inner_grad(theta, h)
    if not (torch.isfinite(theta).all() and torch.isfinite(g).all()):
        raise InnerDivergenceError(
            "the inner solve diverged: non-finite parameters or gradient."
        )
    converged = bool(g.abs().max() <= tol * 10)
    return theta, n_iter, converged


def lipschitz_estimate(
    problem: BilevelProblem, theta: torch.Tensor, h: torch.Tensor, n_iter: int = 20
) -> torch.Tensor:
    """Largest Hessian eigenvalue of ``L(., h)`` at ``theta`` by power iteration."""
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        g = problem.inner_grad(th, h.detach(), create_graph=True)
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(th.shape, generator=gen, dtype=th.dtype).to(th.device)
        v = v / v.norm()
        lam = torch.zeros((), dtype=th.dtype, device=th.device)
        for _ in range(n_iter):
            (hv,) = vjp(g, th, v, retain_graph=True)
            lam = hv.norm()
            if lam <= 0:
                break
            v = hv / lam
    return lam.detach().clamp_min(torch.finfo(th.dtype).eps)
