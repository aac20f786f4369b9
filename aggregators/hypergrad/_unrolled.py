"""Reverse mode through unrolled inner gradient steps (Maclaurin 2015; Shaban 2019)."""

from __future__ import annotations

import torch

from ._inner import lipschitz_estimate
from ._problem import BilevelProblem, HypergradResult

__all__ = ["reverse_hypergradient"]


def reverse_hypergradient(
    problem: BilevelProblem,
    theta0: torch.Tensor,
    h: torch.Tensor,
    *,
    n_steps: int = 100,
    truncate: int | None = None,
    lr: float | None = None,
) -> HypergradResult:
    """Backpropagate the outer loss through ``n_steps`` of gradient descent.

    ``theta_{t+1} = theta_t - lr * dL/dtheta(theta_t, h)`` from ``theta0``;
    the hypergradient is that of ``Q(theta_T(h), h)``.

    Parameters
    ----------
    problem : BilevelProblem
    theta0 : Tensor
        Where the unrolled trajectory starts.
    h : Tensor
    n_steps : int, default=100
        Inner steps T.
    truncate : int, default=None
        Backpropagate only through the last ``truncate`` steps (Shaban et al.
        2019); the earlier steps are run without a graph. ``None``: all.
    lr : float, default=None
        Step size; ``1 / lambda_max`` of the inner Hessian at ``theta0`` when
        omitted, which makes the steps stable for convex inner problems.

    Returns
    -------
    HypergradResult
        ``theta`` is ``theta_T``.
    """
    if lr is None:
        lr = float(1.0 / lipschitz_estimate(problem, theta0, h))
    k = n_steps if truncate is None else min(int(truncate), n_steps)
    hh = h.detach().requires_grad_(True)
    theta = theta0.detach()
    # The steps that are not differentiated through (truncation).
    for _ in range(n_steps - k):
        theta = theta - lr * problem.inner_grad(theta, hh.detach())
    with torch.enable_grad():
        theta = theta.detach().requires_grad_(True)
        start = theta
        for _ in range(k):
            g = problem.inner_grad(theta, hh, create_graph=True)
            theta = theta - lr * g
        q = problem.outer_loss(theta, hh)
        grad = torch.autograd.grad(q, hh, allow_unused=True)[0]
    del start
    if grad is None:
        grad = torch.zeros_like(h)
    return HypergradResult(
        value=q.detach(),
        grad=grad.detach(),
        theta=theta.detach(),
        info={"n_steps": n_steps, "differentiated_steps": k, "lr": lr},
    )
