"""Reverse mode through unrolled inner gradient steps.

Full (Maclaurin et al. 2015), truncated to the last K steps (Shaban et al.
2019), and DrMAD's reverse pass along a straight line from the first to the
last iterate (Fu et al. 2016).
"""

from __future__ import annotations

import torch

from ._inner import lipschitz_estimate
from ._problem import BilevelProblem, HypergradResult, outer_grads, vjp

__all__ = ["drmad_hypergradient", "reverse_hypergradient"]


def step_size(problem: BilevelProblem, theta: torch.Tensor, h: torch.Tensor, lr) -> float:
    """``lr``, or ``1 / lambda_max`` of the inner Hessian at ``theta`` when ``None``."""
    if lr is None:
        return float(1.0 / lipschitz_estimate(problem, theta, h))
    if not lr > 0:
        raise ValueError(f"lr must be positive; got {lr!r}.")
    return float(lr)


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

    Notes
    -----
    Exact for the hypergradient of the T-step procedure; it equals the
    hypergradient of ``theta*(h)`` only as ``T -> inf`` on a strongly convex
    inner problem (the error decays like ``(1 - lr mu)^T``). Memory grows
    with the number of differentiated steps: the graph of every step is kept.
    Truncated to K steps from an inner optimum it equals the Neumann series
    with K terms (Lorraine et al. 2020, Thm. 1).

    References
    ----------
    Maclaurin, D., Duvenaud, D., & Adams, R. (2015). Gradient-based
    hyperparameter optimization through reversible learning. ICML.

    Shaban, A., Cheng, C.-A., Hatch, N., & Boots, B. (2019). Truncated
    back-propagation for bilevel optimization. AISTATS.
    """
    lr = step_size(problem, theta0, h, lr)
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


def drmad_hypergradient(
    problem: BilevelProblem,
    theta0: torch.Tensor,
    h: torch.Tensor,
    *,
    n_steps: int = 100,
    lr: float | None = None,
    trajectory: str = "linear",
) -> HypergradResult:
    """DrMAD: reverse mode along a straight line instead of the stored trajectory.

    The forward pass runs ``n_steps`` gradient steps from ``theta0`` keeping
    only ``theta_0`` and ``theta_T``; the reverse pass of reverse mode then
    takes the Hessian and mixed derivative of step ``t`` at
    ``theta_0 + (t / T) (theta_T - theta_0)``. Memory is that of two
    parameter vectors, whatever ``T``.

    Parameters
    ----------
    problem : BilevelProblem
    theta0 : Tensor
        Where the trajectory starts.
    h : Tensor
    n_steps : int, default=100
        Inner steps T.
    lr : float, default=None
        Step size; ``1 / lambda_max`` at ``theta0`` when omitted.
    trajectory : {"linear", "stored"}, default="linear"
        ``"linear"`` is DrMAD; ``"stored"`` keeps every iterate and so gives
        exactly :func:`reverse_hypergradient` (a check of the reverse pass).

    Returns
    -------
    HypergradResult
        ``theta`` is ``theta_T``.

    Notes
    -----
    Biased: it assumes the trajectory is a straight line. Gradient descent on
    a quadratic moves along each Hessian eigenvector geometrically, not
    linearly, so the Hessian-vector products are taken at wrong points
    whenever the Hessian varies along the path, and the mixed derivatives too
    whenever they depend on ``theta`` (as those of an L2 penalty do). The
    error vanishes when the path is a straight line, for instance when
    ``theta0`` is already the inner optimum, and shrinks with
    ``||theta_0 - theta_T||``. It is fragile when the inner loss is not
    convex between ``theta_0`` and ``theta_T``: the reverse pass multiplies
    by ``I - lr H`` at points the descent never visited, and where ``H`` has
    negative eigenvalues that factor exceeds 1 for many steps. Softmax-
    parametrised weights are such a case: from ``theta0 = 0`` the loss of
    ``LearnedWeights`` has negative curvature along most of the straight
    line, so the errors compound over the steps and the hypergradient can be
    off by orders of magnitude, while reverse mode along the real path,
    which leaves that region in a few steps, stays accurate.

    References
    ----------
    Fu, J., Luo, H., Feng, J., Low, K. H., & Chua, T.-S. (2016). DrMAD:
    distilling reverse-mode automatic differentiation for optimizing
    hyperparameters of deep neural networks. IJCAI.
    """
    if trajectory not in ("linear", "stored"):
        raise ValueError(f"trajectory must be 'linear' or 'stored'; got {trajectory!r}.")
    lr = step_size(problem, theta0, h, lr)
    h = h.detach()
    start = theta0.detach()
    theta = start
    stored = []
    for _ in range(n_steps):
        if trajectory == "stored":
            stored.append(theta)
        theta = theta - lr * problem.inner_grad(theta, h)
    end = theta
    q, adj, grad = outer_grads(problem, end, h)
    # adj = dQ/dtheta_{t+1}; step t contributes -lr B_t^T adj to dQ/dh and
    # maps adj to (I - lr H_t) adj: one vector-Jacobian product of dL/dtheta.
    for t in reversed(range(n_steps)):
        point = stored[t] if trajectory == "stored" else start + (t / n_steps) * (end - start)
        with torch.enable_grad():
            th = point.detach().requires_grad_(True)
            hh = h.detach().requires_grad_(True)
            g = problem.inner_grad(th, hh, create_graph=True)
            h_adj, b_adj = vjp(g, (th, hh), adj, allow_unused=True)
        if b_adj is not None:
            grad = grad - lr * b_adj
        if h_adj is not None:
            adj = adj - lr * h_adj
    return HypergradResult(
        value=q,
        grad=grad.detach(),
        theta=end,
        info={"n_steps": n_steps, "lr": lr, "trajectory": trajectory},
    )
