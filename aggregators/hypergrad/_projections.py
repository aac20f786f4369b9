"""Euclidean projections for constrained hyperparameters (many of them).

:func:`tune` with ``optimizer="adam"`` applies one after every step through its
``project`` argument; e.g. per-row weights of the training loss in data
hyper-cleaning (Franceschi et al. 2017) live in ``{0 <= lam <= 1, sum(lam) <= R}``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["project_capped_simplex"]


def project_capped_simplex(
    v: torch.Tensor, radius: float, *, cap: float = 1.0
) -> torch.Tensor:
    """Euclidean projection onto ``{p : 0 <= p_i <= cap, sum_i p_i <= radius}``.

    The projection is ``p_i = clip(v_i - tau, 0, cap)`` with the smallest
    shift ``tau >= 0`` such that ``sum_i p_i <= radius`` (KKT conditions of the
    quadratic program). ``tau`` is bracketed by bisection on the
    piecewise-linear, non-increasing ``f(tau) = sum_i clip(v_i - tau, 0, cap)``,
    then computed in closed form on the rows found strictly inside
    ``(0, cap)``, so the result is exact up to rounding, not up to the
    bisection's width. Every step is vectorised over the rows; the number of
    bisection steps depends only on the dtype, so nothing is copied to the host.

    Parameters
    ----------
    v : Tensor of shape (..., n)
        Floating-point points to project; leading dimensions are a batch, each
        row of the last dimension is projected on its own.
    radius : float
        Bound ``R >= 0`` on the sum. ``R >= n * cap`` leaves only the box.
    cap : float, default=1.0
        Upper bound of each entry, ``> 0``.

    Returns
    -------
    Tensor
        The projection, same shape, dtype and device as ``v``.

    Raises
    ------
    TypeError
        If ``v`` is not a floating-point tensor.
    ValueError
        If ``radius`` is negative or not finite, ``cap`` is not positive and
        finite, or ``v`` has non-finite entries.

    Examples
    --------
    >>> import torch
    >>> project_capped_simplex(torch.tensor([0.9, 0.5, -1.0, 3.0]), 1.5)
    tensor([0.4500, 0.0500, 0.0000, 1.0000])
    """
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise TypeError(f"v must be a floating-point tensor; got {type(v).__name__} "
                        f"{getattr(v, 'dtype', '')}.")
    radius, cap = float(radius), float(cap)
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be finite and >= 0; got {radius!r}.")
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"cap must be finite and > 0; got {cap!r}.")
    if v.dim() == 0:
        raise ValueError("v must have at least one dimension (the entries to project).")
    if v.shape[-1] == 0:
        return v.clone()
    if not bool(torch.isfinite(v).all()):
        raise ValueError("v has non-finite entries; cannot project NaN or infinity.")

    def total(tau: torch.Tensor) -> torch.Tensor:
        return (v - tau).clamp(0.0, cap).sum(-1, keepdim=True)

    zero = v.new_zeros(v.shape[:-1] + (1,))
    lo = zero
    # f(max v) = 0 <= radius, so the answer lies in [0, max(v, 0)].
    hi = v.amax(-1, keepdim=True).clamp_min(0.0)
    # Each step halves the bracket; after mantissa + 4 steps it is below the
    # spacing of hi, so only rows within rounding of a breakpoint can be
    # misclassified, and those move the answer by at most that spacing.
    for _ in range(round(-math.log2(torch.finfo(v.dtype).eps)) + 4):
        mid = 0.5 * (lo + hi)
        over = total(mid) > radius
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    mid = 0.5 * (lo + hi)
    d = v - mid
    free = (d > 0) & (d < cap)
    n_free = free.sum(-1, keepdim=True)
    n_cap = (d >= cap).sum(-1, keepdim=True)
    # On the identified pieces f is linear: sum_free (v_i - tau) + cap * n_cap = radius.
    exact = ((v * free).sum(-1, keepdim=True) + cap * n_cap - radius) / n_free.clamp_min(1)
    tau = torch.where(n_free > 0, exact.clamp(lo, hi), mid)
    # The sum constraint is inactive where the box alone already satisfies it.
    tau = torch.where(total(zero) <= radius, zero, tau)
    return (v - tau).clamp(0.0, cap)
