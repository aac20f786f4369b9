"""L-BFGS with a strong-Wolfe line search, on one flat tensor.

The engine's own, rather than ``torch.optim.LBFGS``: constructing any
``torch.optim`` optimizer imports ``torch._dynamo`` on first use, a cost of
a second or so that every fresh process would pay on its first fit, and an
inner solve needs no parameter groups or optimizer state. The algorithm is
the textbook one (Nocedal & Wright 2006, Algorithms 7.4, 3.5 and 3.6).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._problem import InnerDivergenceError

__all__ = ["lbfgs"]

FunGrad = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _cubic_min(a, fa, ga, b, fb, gb, lo, hi) -> float:
    """Minimiser of the cubic through two points with slopes, kept in ``[lo, hi]``."""
    d1 = ga + gb - 3.0 * (fa - fb) / (a - b)
    disc = d1 * d1 - ga * gb
    if disc >= 0 and math.isfinite(disc):
        d2 = math.copysign(math.sqrt(disc), b - a)
        denom = gb - ga + 2.0 * d2
        if denom != 0:
            t = b - (b - a) * (gb + d2 - d1) / denom
            if math.isfinite(t):
                return min(max(t, lo), hi)
    return 0.5 * (lo + hi)


def _strong_wolfe(phi, f0: float, gd0: float, t: float, c1=1e-4, c2=0.9, max_eval=25):
    """A step ``t`` with sufficient decrease and small slope along the direction.

    ``phi(t)`` returns ``(f, g, gd)``: loss, gradient and directional slope at
    ``x + t d``. Returns ``(t, f, g, n_eval)``; ``t = 0`` when no step gave a
    decrease.
    """
    t_prev, f_prev, gd_prev, g_prev = 0.0, f0, gd0, None
    best = (0.0, f0, None)
    n_eval = 0
    lo = hi = None
    while n_eval < max_eval:
        f, g, gd = phi(t)
        n_eval += 1
        if f < best[1]:
            best = (t, f, g)
        if f > f0 + c1 * t * gd0 or (n_eval > 1 and f >= f_prev):
            lo, hi = (t_prev, f_prev, gd_prev, g_prev), (t, f, gd, g)
            break
        if abs(gd) <= -c2 * gd0:
            return t, f, g, n_eval
        if gd >= 0:
            lo, hi = (t, f, gd, g), (t_prev, f_prev, gd_prev, g_prev)
            break
        t_prev, f_prev, gd_prev, g_prev = t, f, gd, g
        t = 2.0 * t  # still descending steeply: extrapolate
    if lo is None:  # no bracket within the budget: the best step seen
        return best[0], best[1], best[2], n_eval
    # Zoom: shrink [lo, hi] (lo always satisfies sufficient decrease).
    while n_eval < max_eval:
        (a, fa, ga, _), (b, fb, gb, _) = lo, hi
        width = abs(b - a)
        if width < 1e-12 * max(1.0, abs(a)):
            break
        left, right = min(a, b), max(a, b)
        t = _cubic_min(a, fa, ga, b, fb, gb, left + 0.1 * width, right - 0.1 * width)
        f, g, gd = phi(t)
        n_eval += 1
        if f < best[1]:
            best = (t, f, g)
        if f > f0 + c1 * t * gd0 or f >= fa:
            hi = (t, f, gd, g)
        else:
            if abs(gd) <= -c2 * gd0:
                return t, f, g, n_eval
            if gd * (b - a) >= 0:
                hi = lo
            lo = (t, f, gd, g)
    return best[0], best[1], best[2], n_eval


def lbfgs(
    fun_grad: FunGrad,
    x0: torch.Tensor,
    *,
    max_iter: int = 500,
    tol: float = 1e-7,
    tolerance_change: float = 1e-20,
    history_size: int = 20,
    precond: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int, bool]:
    """Minimise a smooth function of one flat tensor.

    Parameters
    ----------
    fun_grad : callable
        ``x -> (f, grad)``, both detached.
    x0 : Tensor
    max_iter : int, default=500
        Bound on iterations (search directions).
    tol : float, default=1e-7
        Stop when the gradient's max-norm falls below ``tol``.
    tolerance_change : float, default=1e-20
        Also stop when a step changes the loss, or every parameter, by less.
    history_size : int, default=20
        Curvature pairs kept.
    precond : callable, default=None
        ``v -> M v`` for a symmetric positive definite ``M`` near the inverse
        Hessian: the initial inverse-Hessian model (scaled by
        ``s^T y / y^T M y`` once there are curvature pairs) in place of a
        multiple of the identity, and the first step ``-M g`` tried at unit
        length.

    Returns
    -------
    x : Tensor
    n_iter : int
    converged : bool
        Whether the gradient tolerance was met.

    Raises
    ------
    InnerDivergenceError
        When the loss or its gradient is not finite at ``x0`` or at an
        accepted step (a trial step of the line search with a non-finite
        loss is shortened instead).
    """

    def evaluate(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        f, g = fun_grad(x)
        f = float(f)
        if not math.isfinite(f):
            raise InnerDivergenceError(f"the inner solve diverged: the inner loss became {f}.")
        return f, g

    def trial(x: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        # A trial step into a non-finite region (a log of a negative, say) is
        # a step too long: the line search shortens it.
        f, g = fun_grad(x)
        f = float(f)
        return (f, g) if math.isfinite(f) else (math.inf, None)

    x = x0.detach().clone()
    f, g = evaluate(x)
    pairs: list = []  # (s, y, 1 / y.s), oldest first
    for it in range(max_iter):
        if not bool(torch.isfinite(g).all()):
            raise InnerDivergenceError("the inner solve diverged: non-finite gradient.")
        if float(g.abs().max()) <= tol:
            return x, it, True
        # Two-loop recursion: d = -H g with H the L-BFGS inverse-Hessian model.
        q = -g
        alphas = []
        for s, y, rho in reversed(pairs):
            a = rho * (s @ q)
            q = q - a * y
            alphas.append(a)
        if pairs:
            s, y, _ = pairs[-1]
            if precond is None:
                q = q * ((s @ y) / (y @ y))
            else:
                q = precond(q) * ((s @ y) / (y @ precond(y)))
            t0 = 1.0
        elif precond is not None:
            q, t0 = precond(q), 1.0
        else:
            t0 = min(1.0, 1.0 / float(g.abs().sum()))
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            q = q + (a - rho * (y @ q)) * s
        d = q
        gd = float(g @ d)
        if not gd < 0:  # not a descent direction: forget the curvature model
            pairs.clear()
            d, gd = -g, -float(g @ g)
            t0 = min(1.0, 1.0 / float(g.abs().sum()))
            if precond is not None:
                d = -precond(g)
                gd, t0 = float(g @ d), 1.0
                if not gd < 0:  # a preconditioner that is not positive definite here
                    d, gd = -g, -float(g @ g)
                    t0 = min(1.0, 1.0 / float(g.abs().sum()))

        def phi(t: float, d=d):
            ft, gt = trial(x + t * d)
            return ft, gt, (math.nan if gt is None else float(gt @ d))

        t, f_new, g_new, _ = _strong_wolfe(phi, f, gd, t0)
        if t == 0.0 or g_new is None:  # the line search found no decrease
            return x, it, False
        step = t * d
        x_new = x + step
        y = g_new - g
        sy = float(step @ y)
        if sy > 1e-10 * float(step @ step) ** 0.5 * float(y @ y) ** 0.5:
            if len(pairs) == history_size:
                pairs.pop(0)
            pairs.append((step, y, 1.0 / sy))
        small_change = abs(f_new - f) < tolerance_change or float(step.abs().max()) <= tolerance_change
        x, f, g = x_new, f_new, g_new
        if small_change:
            return x, it + 1, float(g.abs().max()) <= tol
    return x, max_iter, float(g.abs().max()) <= tol
