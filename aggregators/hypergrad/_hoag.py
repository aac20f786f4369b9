"""HOAG: implicit hypergradients with tolerances that decrease across outer steps."""

from __future__ import annotations

import math

import torch

from ._implicit import implicit_hypergradient
from ._problem import BilevelProblem, HypergradResult

__all__ = ["hoag_hypergradient", "hoag_tolerance"]

#: The options of :func:`hoag_tolerance` (``tune`` reads them from
#: ``method_options`` to set the inner tolerance of each outer step).
SCHEDULE_OPTIONS = ("eps0", "decay", "schedule")


def hoag_tolerance(
    iteration: int, *, eps0: float = 1e-4, decay: float = 2.0, schedule: str = "polynomial"
) -> float:
    """Tolerance ``eps_k`` of outer step ``k`` (counted from 0).

    Parameters
    ----------
    iteration : int
        ``k >= 0``.
    eps0 : float, default=1e-4
        ``eps_0``.
    decay : float, default=2.0
        ``"polynomial"``: ``eps_k = eps0 * (k + 1) ** -decay``, summable for
        ``decay > 1``; ``"geometric"``: ``eps_k = eps0 * decay ** k``,
        summable for ``0 < decay < 1``.
    schedule : {"polynomial", "geometric"}, default="polynomial"

    Returns
    -------
    float

    Examples
    --------
    >>> [hoag_tolerance(k, eps0=0.1) for k in range(3)]
    [0.1, 0.025, 0.011111111111111112]
    >>> hoag_tolerance(3, eps0=1.0, decay=0.5, schedule="geometric")
    0.125
    """
    if not (isinstance(iteration, int) and iteration >= 0):
        raise ValueError(f"iteration must be a non-negative int; got {iteration!r}.")
    if not (math.isfinite(eps0) and eps0 > 0):
        raise ValueError(f"eps0 must be positive; got {eps0!r}.")
    if schedule == "polynomial":
        if not decay > 1:
            raise ValueError(
                f"a polynomial HOAG schedule needs decay > 1 (summable tolerances); got {decay!r}."
            )
        return eps0 * (iteration + 1) ** -decay
    if schedule == "geometric":
        if not 0 < decay < 1:
            raise ValueError(
                f"a geometric HOAG schedule needs 0 < decay < 1 (summable tolerances); "
                f"got {decay!r}."
            )
        return eps0 * decay**iteration
    raise ValueError(f"schedule must be 'polynomial' or 'geometric'; got {schedule!r}.")


def hoag_hypergradient(
    problem: BilevelProblem,
    theta: torch.Tensor,
    h: torch.Tensor,
    *,
    iteration: int = 0,
    eps0: float = 1e-4,
    decay: float = 2.0,
    schedule: str = "polynomial",
    min_tol: float = 1e-10,
    max_iter: int = 100,
    v0: torch.Tensor | None = None,
    solver: str = "auto",
) -> HypergradResult:
    """The implicit hypergradient with HOAG's inexact linear solve at outer step ``k``.

    The conjugate-gradient solve of ``H v = d_theta Q`` stops at the relative
    residual ``max(eps_k, min_tol)`` with ``eps_k`` from
    :func:`hoag_tolerance`. HOAG solves the inner problem inexactly too:
    :func:`tune` with ``method="hoag"`` stops each inner solve at the
    gradient max-norm ``max(eps_k, inner_tol)`` and passes ``iteration``;
    called directly, ``theta`` is used as given.

    Parameters
    ----------
    problem : BilevelProblem
    theta : Tensor
        An approximate inner optimum.
    h : Tensor
    iteration : int, default=0
        Outer step ``k``.
    eps0, decay, schedule
        The tolerance sequence (:func:`hoag_tolerance`).
    min_tol : float, default=1e-10
        Floor of the linear-solve tolerance.
    max_iter : int, default=100
        Bound on conjugate-gradient iterations.
    v0 : Tensor, default=None
        Warm start of conjugate gradient (see :func:`implicit_hypergradient`).
    solver : {"auto", "cg", "direct"}, default="auto"
        ``"auto"`` solves exactly from the Hessian blocks when the problem
        declares small independent blocks (an exact solve meets any
        tolerance), else by conjugate gradient (see
        :func:`implicit_hypergradient`).

    Returns
    -------
    HypergradResult

    Notes
    -----
    The early hypergradients are inexact; as the tolerances are summable
    the errors are too, which is what the convergence of an inexact
    gradient method needs (Pedregosa 2016, Thm. 2, for its own outer steps
    with a fixed step size). Once ``eps_k`` falls below the floors it is
    :func:`implicit_hypergradient` with conjugate gradient. It assumes what
    the implicit methods assume (a stationary point with an invertible
    Hessian, reached in the limit). Here the outer optimizer is
    :func:`tune`'s (L-BFGS-B or Adam), not HOAG's own step-size rule;
    ``k`` counts evaluations, which L-BFGS-B's line search may make several
    of per iteration. The outer values are inexact as well, and L-BFGS-B's
    line search and :func:`tune`'s choice of the best point compare them:
    too loose an ``eps0`` stops the search once the inner error decides
    between nearby points, short of where an exact implicit hypergradient
    would lead; the default ``1e-4`` keeps that error below the differences
    the search compares on the aggregation problems here.

    References
    ----------
    Pedregosa, F. (2016). Hyperparameter optimization with approximate
    gradient. ICML.
    """
    eps = hoag_tolerance(iteration, eps0=eps0, decay=decay, schedule=schedule)
    tol = max(eps, min_tol)
    res = implicit_hypergradient(
        problem, theta, h, solver=solver, max_iter=max_iter, tol=tol, v0=v0
    )
    res.info.update(method="hoag", iteration=iteration, eps=eps, tol=tol)
    return res
