"""Forward mode through unrolled inner gradient steps (Franceschi et al. 2017)."""

from __future__ import annotations

import torch

from ._problem import BilevelProblem, HypergradResult, outer_grads
from ._unrolled import step_size

__all__ = ["forward_hypergradient"]


def forward_hypergradient(
    problem: BilevelProblem,
    theta0: torch.Tensor,
    h: torch.Tensor,
    *,
    n_steps: int = 100,
    lr: float | None = None,
) -> HypergradResult:
    """Propagate ``Z_t = d theta_t / dh`` forward alongside ``n_steps`` gradient steps.

    With ``theta_{t+1} = theta_t - lr * dL/dtheta(theta_t, h)`` from ``theta0``
    (which does not depend on ``h``, so ``Z_0 = 0``)::

        Z_{t+1} = Z_t - lr * (H_t Z_t + B_t),   dQ/dh = d_h Q + Z_T^T d_theta Q,

    with ``H_t`` the inner Hessian and ``B_t = d2L / dtheta dh`` at
    ``(theta_t, h)``. Column ``j`` of ``H_t Z_t + B_t`` is the gradient in
    ``theta`` of the scalar ``<dL/dtheta, Z_t[:, j]> + dL/dh_j`` (symmetry of
    second derivatives), so each step costs one first-order graph and
    ``dim h`` backward passes through it.

    Parameters
    ----------
    problem : BilevelProblem
    theta0 : Tensor
        Where the trajectory starts.
    h : Tensor
    n_steps : int, default=100
        Inner steps T.
    lr : float, default=None
        Step size; ``1 / lambda_max`` of the inner Hessian at ``theta0`` when
        omitted (the same default as :func:`reverse_hypergradient`, so both
        differentiate the same trajectory).

    Returns
    -------
    HypergradResult
        ``theta`` is ``theta_T``.

    Notes
    -----
    The same number as :func:`reverse_hypergradient` on the same trajectory
    (the hypergradient of the T-step procedure), computed in the other
    order. Memory is ``dim theta x dim h`` whatever ``T`` (no trajectory is
    stored) and the cost grows with ``dim h``: the method for few
    hyperparameters and long trajectories. As reverse mode, it approaches the
    implicit hypergradient only as ``T -> inf`` on a strongly convex inner
    problem.

    References
    ----------
    Franceschi, L., Donini, M., Frasconi, P., & Pontil, M. (2017). Forward
    and reverse gradient-based hyperparameter optimization. ICML.

    Examples
    --------
    >>> import torch
    >>> from aggregators.hypergrad import BilevelProblem, forward_hypergradient
    >>> prob = BilevelProblem(  # theta*(h) = h, Q = theta^2: dQ/dh = 2 h
    ...     lambda t, h: 0.5 * (t - h).pow(2).sum(),
    ...     lambda t, h: t.pow(2).sum(),
    ...     torch.zeros(1, dtype=torch.float64))
    >>> res = forward_hypergradient(prob, prob.theta0, torch.tensor([0.5], dtype=torch.float64),
    ...                             n_steps=5, lr=1.0)
    >>> round(float(res.grad), 6)
    1.0
    """
    lr = step_size(problem, theta0, h, lr)
    h = h.detach()
    theta = theta0.detach()
    n_h = h.numel()
    Z = torch.zeros(theta.numel(), n_h, dtype=theta.dtype, device=theta.device)
    for _ in range(n_steps):
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            hh = h.detach().requires_grad_(True)
            g_th, g_h = torch.autograd.grad(
                problem.inner_loss(th, hh), (th, hh), create_graph=True, allow_unused=True
            )
            if g_h is None:
                g_h = torch.zeros_like(h)
            cols = []
            for j in range(n_h):
                s = g_th @ Z[:, j] + g_h[j]
                col = None
                if s.requires_grad:
                    (col,) = torch.autograd.grad(s, th, retain_graph=True, allow_unused=True)
                cols.append(torch.zeros_like(theta) if col is None else col)
        JZ = torch.stack(cols, dim=1) if cols else torch.zeros_like(Z)
        theta = theta - lr * g_th.detach()
        Z = Z - lr * JZ
    q, g_theta, g_hq = outer_grads(problem, theta, h)
    return HypergradResult(
        value=q,
        grad=(g_hq + Z.T @ g_theta).detach(),
        theta=theta,
        info={"n_steps": n_steps, "lr": lr},
    )
