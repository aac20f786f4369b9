"""One-step (greedy) hypergradients: T1-T2 (Luketina 2016) and DARTS (Liu 2019)."""

from __future__ import annotations

import torch

from ._implicit import implicit_hypergradient
from ._problem import BilevelProblem, HypergradResult, fd_mixed_product, outer_grads
from ._unrolled import reverse_hypergradient, step_size

__all__ = ["darts_hypergradient", "greedy_hypergradient"]


def greedy_hypergradient(
    problem: BilevelProblem,
    theta: torch.Tensor,
    h: torch.Tensor,
    *,
    lr: float | None = None,
) -> HypergradResult:
    """T1-T2: the hypergradient through one inner gradient step from ``theta``.

    ``theta' = theta - lr * dL/dtheta(theta, h)`` and
    ``dQ/dh ~ d_h Q(theta', h) - lr * (d2_{h theta} L(theta, h)) d_theta Q(theta', h)``:
    reverse mode through a single step (Luketina et al. 2016).

    Parameters
    ----------
    problem : BilevelProblem
    theta : Tensor
        The current inner parameters (inside :func:`tune`, the warm-started
        inner optimum).
    h : Tensor
    lr : float, default=None
        The inner step size; ``1 / lambda_max`` of the inner Hessian at
        ``theta`` when omitted.

    Returns
    -------
    HypergradResult
        ``theta`` is ``theta'``.

    Notes
    -----
    Biased. At an inner optimum (``theta' = theta``) it is the implicit
    hypergradient with ``H^{-1}`` replaced by ``lr * I`` (Lorraine et al.
    2020, Table 1): exact only when ``H = I / lr``; along a Hessian
    eigenvector of eigenvalue ``mu`` the inverse is underestimated by the
    factor ``lr * mu`` (in ``(0, 1]`` with the default ``lr``), so the error
    grows with the inner problem's condition number. It is also the
    one-term Neumann series and one-step truncated reverse mode. Its
    direction usually still decreases the outer loss, which is why it works
    as a cheap online heuristic.

    References
    ----------
    Luketina, J., Berglund, M., Greff, K., & Raiko, T. (2016). Scalable
    gradient-based tuning of continuous regularization hyperparameters. ICML.
    """
    res = reverse_hypergradient(problem, theta, h, n_steps=1, lr=lr)
    res.info["method"] = "t1-t2"
    return res


def darts_hypergradient(
    problem: BilevelProblem,
    theta: torch.Tensor,
    h: torch.Tensor,
    *,
    solver: str = "one-step",
    lr: float | None = None,
    eps: float = 0.01,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> HypergradResult:
    """The DARTS finite-difference approximation of the mixed second derivative.

    The product ``(d2_{h theta} L) v`` is replaced by
    ``[d_h L(theta + e v) - d_h L(theta - e v)] / (2 e)``, ``e = eps / ||v||``
    (:func:`fd_mixed_product`): two gradients instead of a second-order
    backward pass, ``O(dim theta + dim h)`` (Liu et al. 2019, eq. 8).

    Parameters
    ----------
    problem : BilevelProblem
    theta : Tensor
        Current inner parameters (inside :func:`tune`, the warm-started inner
        optimum).
    h : Tensor
    solver : {"one-step", "cg"}, default="one-step"
        ``"one-step"``: DARTS' second-order approximation, one unrolled step
        ``theta' = theta - lr dL/dtheta`` with
        ``v = d_theta Q(theta')``: T1-T2 with a finite-difference mixed
        product. ``"cg"``: the implicit hypergradient, ``v = H^{-1} d_theta Q``
        by conjugate gradient (Hessian-vector products still by autograd),
        with the finite-difference mixed product.
    lr : float, default=None
        DARTS' ``xi`` (the inner step size), ``"one-step"`` only;
        ``1 / lambda_max`` of the inner Hessian at ``theta`` when omitted.
    eps : float, default=0.01
        Length of the parameter perturbation (DARTS' choice).
    max_iter, tol : int, float
        Conjugate-gradient bounds (``"cg"`` only).

    Returns
    -------
    HypergradResult

    Notes
    -----
    ``"one-step"`` approximates the hypergradient of one inner step, so it
    has T1-T2's bias (``H^{-1} ~ lr I``) plus the ``O(eps^2)`` difference
    error. ``"cg"`` approximates the implicit hypergradient: it is exact up
    to the conjugate-gradient tolerance and ``O(eps^2)`` (exactly, up to
    rounding, when ``dL/dh`` is quadratic in ``theta``, as for L2 penalties
    on a quadratic loss), and assumes, as every implicit method, an inner
    optimum with an invertible Hessian.

    References
    ----------
    Liu, H., Simonyan, K., & Yang, Y. (2019). DARTS: differentiable
    architecture search. ICLR.
    """
    if solver == "cg":
        res = implicit_hypergradient(
            problem, theta, h, solver="cg", max_iter=max_iter, tol=tol, mixed="fd", fd_eps=eps
        )
        res.info["method"] = "darts-fd"
        return res
    if solver != "one-step":
        raise ValueError(f"solver must be 'one-step' or 'cg'; got {solver!r}.")
    lr = step_size(problem, theta, h, lr)
    theta = theta.detach()
    stepped = theta - lr * problem.inner_grad(theta, h.detach())
    q, g_theta, g_h = outer_grads(problem, stepped, h)
    prod = fd_mixed_product(problem, theta, h, g_theta, eps)
    return HypergradResult(
        value=q,
        grad=(g_h - lr * prod).detach(),
        theta=stepped,
        info={"method": "darts-fd", "solver": "one-step", "lr": lr, "eps": eps},
    )
