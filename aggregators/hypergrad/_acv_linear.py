"""Approximate cross-validation for a linear predictor, and closed-form leave-one-out.

For ``z_i = x_i^T theta`` (stacking, a softmax meta-learner) the fold
Hessians of :mod:`._acv` follow from the ``C x C`` Hessians of the loss in the
predictions, in one pass over the rows instead of ``K p`` backward passes, and
the leave-one-out Newton step has a closed form: Sherman-Morrison for one
output, Woodbury for several, PRESS (``r_i / (1 - h_i)``) for squared loss.
:func:`linear_kfold_problem` is exact cross-validation in closed form for
squared loss and a quadratic penalty (ridge regression, regression stacking).
Conventions and references as in :mod:`._acv`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad, hessian, vmap

from ._acv import (
    ACV_METHODS,
    Folds,
    LinearLoss,
    Penalty,
    _check_choice,
    _fold_derivatives,
    _groups,
    _newton_fold_steps,
    _reduce,
    fold_membership,
)
from ._problem import BilevelProblem, HessianDecision, InnerDivergenceError

__all__ = [
    "linear_acv_fold_params",
    "linear_acv_loss",
    "linear_acv_problem",
    "linear_kfold_problem",
    "linear_loo_predictions",
    "linear_penalty_terms",
    "ridge_loo_residuals",
]


def ridge_loo_residuals(
    X: torch.Tensor,
    y: torch.Tensor,
    alpha: torch.Tensor | float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Leave-one-out residuals of ridge regression in closed form (PRESS).

    For ``theta = argmin sum_i w_i (y_i - x_i^T theta)^2 + theta^T diag(alpha) theta``
    the fit without row ``i`` leaves the residual ``r_i / (1 - h_i)``, with
    ``r = y - X theta`` and ``h_i = w_i x_i^T (X^T W X + diag(alpha))^{-1} x_i``
    (Allen's PRESS; scikit-learn's ``RidgeCV`` uses the same identity).

    Parameters
    ----------
    X : Tensor
        ``(n, p)``; append a column of ones (with ``alpha`` 0 there) for an
        unpenalised intercept.
    y : Tensor
        ``(n,)`` or ``(n, m)`` (outputs share the penalty).
    alpha : float or Tensor
        Scalar or ``(p,)`` penalty weights.
    weights : Tensor, default=None
        ``(n,)`` sample weights.

    Returns
    -------
    Tensor
        Shape of ``y``; differentiable in ``alpha``, ``X``, ``y``, ``weights``.
    """
    n, p = X.shape
    alpha = torch.as_tensor(alpha, dtype=X.dtype, device=X.device)
    w = torch.ones(n, dtype=X.dtype, device=X.device) if weights is None else weights
    gram = X.T @ (w[:, None] * X) + torch.diag(alpha.expand(p))
    chol = torch.linalg.cholesky(gram)
    yy = y.reshape(n, -1)
    theta = torch.cholesky_solve(X.T @ (w[:, None] * yy), chol)
    resid = yy - X @ theta
    hat = w * (X * torch.cholesky_solve(X.T, chol).T).sum(1)
    return (resid / (1.0 - hat)[:, None]).reshape(y.shape)


def _linear_derivatives(
    X: torch.Tensor, theta: torch.Tensor, h: torch.Tensor, loss: LinearLoss
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions ``(n, C)``, ``dl_i/dz_i`` ``(n, C)`` and ``d2l_i/dz_i^2`` ``(n, C, C)``,
    kept differentiable (the hypergradient backpropagates through them)."""
    n = X.shape[0]
    n_out = theta.shape[1] if theta.dim() == 2 else 1
    z = (X @ theta).reshape(n, n_out)
    shape = (X.shape[0],) + tuple(theta.shape[1:])

    def total(zz: torch.Tensor) -> torch.Tensor:
        return loss(zz.reshape(shape), h).sum()

    def first(zz: torch.Tensor) -> torch.Tensor:
        return grad(total)(zz)

    # torch.func keeps the graph to theta and h only where they need one.
    # Rows do not interact, so the gradient of the summed c-th derivative is
    # row i's c-th Hessian row.
    d1 = first(z)
    d2 = torch.stack(
        [grad(lambda zz, c=c: first(zz)[:, c].sum())(z) for c in range(n_out)], dim=1
    )
    return z, d1, d2


def _penalty_derivatives(
    theta: torch.Tensor, h: torch.Tensor, penalty: Penalty | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and Hessian of ``penalty(theta, h)`` in the flattened ``theta``."""
    p = theta.numel()
    if penalty is None:
        return theta.new_zeros(p), theta.new_zeros(p, p)
    with torch.enable_grad():
        grads, hess = _fold_derivatives(
            lambda t: penalty(t.reshape(theta.shape), h).reshape(1), theta.reshape(-1)
        )
    return grads[0], hess[0]


def _gauss_newton(X: torch.Tensor, d2: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_i a_i J_i^T B_i J_i`` for ``J_i = x_i^T (x) I_C``: the exact Hessian of a
    loss of a linear predictor, in ``theta`` flattened row-major from ``(p, C)``."""
    p, n_out = X.shape[1], d2.shape[1]
    # One matrix product X^T diag(a B_cd) X per pair of outputs c <= d (B_i is
    # symmetric) instead of the einsum over (i, j, c, d, k), which torch does
    # not map onto matrix products: C (C + 1) / 2 products of n p^2 in BLAS,
    # with (n, p) temporaries.
    weighted = a[:, None, None] * d2
    blocks: list[list] = [[None] * n_out for _ in range(n_out)]
    for c in range(n_out):
        for d in range(c, n_out):
            block = X.T @ (X * weighted[:, c, d, None])
            blocks[c][d] = block
            if d != c:
                blocks[d][c] = block.T
    # H[j c, k d] = blocks[c][d][j, k]
    return torch.stack([torch.stack(row, 2) for row in blocks], 1).reshape(
        p * n_out, p * n_out
    )


def linear_acv_fold_params(
    X: torch.Tensor,
    theta: torch.Tensor,
    h: torch.Tensor,
    loss: LinearLoss,
    folds: Folds,
    *,
    penalty: Penalty | None = None,
    weights: torch.Tensor | None = None,
    method: str = "ns",
    normalize: str = "fold",
) -> torch.Tensor:
    """:func:`acv_fold_params` for a linear predictor, with structured Hessians.

    With ``z_i = x_i^T theta`` (``theta`` of shape ``(p,)``) or
    ``z_i = theta^T x_i`` (``(p, C)``, a softmax meta-learner) the Hessian of
    row ``i``'s loss is ``J_i^T B_i J_i`` with ``B_i`` the ``C x C`` Hessian
    in ``z``: the fold Hessians cost one pass over the rows
    (``n p^2 C^2`` products) instead of ``K p`` backward passes, which is
    what makes approximate CV cheaper than exact cross-fitting when ``p C``
    reaches the hundreds (stacking on many models and classes).

    Parameters
    ----------
    X : Tensor
        ``(n, p)`` features (append a column of ones for an intercept).
    theta : Tensor
        ``(p,)`` or ``(p, C)``: the full-data optimum.
    h : Tensor
        Hyperparameters.
    loss : callable
        ``(z, h) -> (n,)``: each row's loss of its prediction(s) ``z``
        (``(n,)`` or ``(n, C)``). Rows must not interact.
    folds, weights, method, normalize
        See :func:`acv_fold_params`.
    penalty : callable, default=None
        ``(theta, h) -> scalar`` with ``theta`` shaped as given.

    Returns
    -------
    Tensor
        ``(K,) + theta.shape``.
    """
    _check_choice("method", method, ACV_METHODS)
    _check_choice("normalize", normalize, ("fold", "full"))
    n, p = X.shape
    member = fold_membership(folds, n, dtype=X.dtype, device=X.device)
    w = torch.ones(n, dtype=X.dtype, device=X.device) if weights is None else weights
    _, d1, d2 = _linear_derivatives(X, theta, h, loss)
    groups = _groups(member, w)
    g_groups = torch.einsum("gi,ij,ic->gjc", groups, X, d1).reshape(groups.shape[0], -1)
    h_groups = _group_hessians(X, d2, groups)
    g_pen, h_pen = _penalty_derivatives(theta, h, penalty)
    steps = _newton_fold_steps(
        theta.reshape(-1), g_groups, h_groups, g_pen, h_pen, member, w, method, normalize
    )
    return steps.reshape((member.shape[0],) + tuple(theta.shape))


def _group_hessians(X: torch.Tensor, d2: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per group of rows, ``sum_i groups[g, i] J_i^T B_i J_i``: the groups are
    disjoint, so this is one pass over the rows, not one per group."""
    out = []
    for g in range(groups.shape[0]):
        idx = torch.nonzero(groups[g] != 0)[:, 0]
        out.append(_gauss_newton(X[idx], d2[idx], groups[g, idx]))
    return torch.stack(out)


def linear_acv_loss(
    X: torch.Tensor,
    theta: torch.Tensor,
    h: torch.Tensor,
    loss: LinearLoss,
    folds: Folds,
    *,
    penalty: Penalty | None = None,
    weights: torch.Tensor | None = None,
    outer_loss: LinearLoss | None = None,
    method: str = "ns",
    normalize: str = "fold",
    reduction: str = "mean",
) -> torch.Tensor:
    """:func:`acv_loss` for a linear predictor (see :func:`linear_acv_fold_params`).

    Parameters
    ----------
    X, theta, h, loss, folds, penalty, weights, method, normalize
        See :func:`linear_acv_fold_params`.
    outer_loss : callable, default=None
        ``(z, h) -> (n,)``: the per-row validation loss; ``loss`` when omitted.
    reduction : {"mean", "folds"}, default="mean"
        See :func:`acv_loss`.

    Returns
    -------
    Tensor
        Scalar, differentiable in ``X``, ``theta`` and ``h``.
    """
    _check_choice("reduction", reduction, ("mean", "folds"))
    thetas = linear_acv_fold_params(
        X, theta, h, loss, folds, penalty=penalty, weights=weights, method=method,
        normalize=normalize,
    )
    member = fold_membership(folds, X.shape[0], dtype=X.dtype, device=X.device)
    # Row i predicted by its own fold's parameters (rows no fold holds out
    # get 0, and no weight below): each fold's rows only, not every row under
    # every fold's parameters.
    rows, parts = [], []
    for k in range(member.shape[0]):
        idx = torch.nonzero(member[k] != 0)[:, 0]
        rows.append(idx)
        parts.append(member[k, idx].reshape((-1,) + (1,) * (thetas.dim() - 2))
                     * (X[idx] @ thetas[k]))
    z = X.new_zeros((X.shape[0],) + tuple(thetas.shape[2:])).index_put(
        (torch.cat(rows),), torch.cat(parts), accumulate=True
    )
    losses = (outer_loss or loss)(z, h)
    return _reduce(losses, member, weights, reduction)


def linear_acv_problem(
    X: torch.Tensor,
    loss: LinearLoss,
    theta0: torch.Tensor,
    folds: Folds,
    *,
    penalty: Penalty | None = None,
    weights: torch.Tensor | None = None,
    outer_loss: LinearLoss | None = None,
    method: str = "ns",
    normalize: str = "fold",
    reduction: str = "mean",
) -> BilevelProblem:
    """:func:`acv_problem` for a linear predictor (see :func:`linear_acv_loss`).

    ``theta0`` has the shape ``(p,)`` or ``(p, C)``; the problem's parameters
    are its flattening (row-major), as the engine wants.
    """
    _check_choice("method", method, ACV_METHODS)
    _check_choice("normalize", normalize, ("fold", "full"))
    _check_choice("reduction", reduction, ("mean", "folds"))
    shape = theta0.shape

    def inner(theta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        t = theta.reshape(shape)
        losses = loss(X @ t, h)
        data = losses.mean() if weights is None else (weights * losses).sum() / weights.sum()
        return data + penalty(t, h) if penalty is not None else data

    def outer(theta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return linear_acv_loss(
            X, theta.reshape(shape), h, loss, folds, penalty=penalty, weights=weights,
            outer_loss=outer_loss, method=method, normalize=normalize, reduction=reduction,
        )

    return BilevelProblem(inner, outer, theta0.detach().reshape(-1))


def linear_loo_predictions(
    X: torch.Tensor,
    theta: torch.Tensor,
    h: torch.Tensor,
    loss: LinearLoss,
    *,
    penalty: Penalty | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Leave-one-out Newton-step predictions of a linear predictor in closed form.

    With ``z_i = x_i^T theta`` (``theta`` of shape ``(p,)``) or
    ``z_i = theta^T x_i`` in ``R^C`` (``theta`` of shape ``(p, C)``, a
    softmax meta-learner), the training loss
    ``L = sum_i w_i l_i(z_i) / sum_i w_i + R(theta)`` at its optimum
    ``theta``, and ``a_i = w_i / sum_j w_j``, one Newton step on ``L`` without
    row ``i`` predicts ``z_tilde_i = z_i + A_i (I - B_i A_i)^{-1} l'_i`` with
    ``A_i = a_i J_i H^{-1} J_i^T``, ``B_i`` the Hessian of ``l_i`` in ``z``
    and ``H`` that of ``L`` in ``theta`` (Woodbury). For ``C = 1`` this is
    Sherman-Morrison, ``z_i + l'_i h_i / (1 - l''_i h_i)``, ``h_i = A_i``
    (Rad & Maleki 2020, Burn 2020). The leave-one-out problem keeps the
    full-data normalisation (``normalize="full"`` of :func:`acv_fold_params`);
    for squared loss the step is the exact refit. ``theta`` must be the
    optimum: the formula uses that the full gradient vanishes.

    Parameters
    ----------
    X : Tensor
        ``(n, p)`` features (append a column of ones for an intercept).
    theta : Tensor
        ``(p,)`` or ``(p, C)``: the full-data optimum.
    h : Tensor
        Hyperparameters.
    loss : callable
        ``(z, h) -> (n,)``: each row's loss of its prediction(s) ``z``
        (shape ``(n,)`` or ``(n, C)``). Rows must not interact.
    penalty : callable, default=None
        ``(theta, h) -> scalar`` with ``theta`` shaped as given.
    weights : Tensor, default=None
        ``(n,)`` sample weights.

    Returns
    -------
    Tensor
        ``z_tilde``, shaped as ``X @ theta``; differentiable in ``X``,
        ``theta`` and ``h``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(20, 2, generator=g, dtype=torch.float64)
    >>> y = torch.randn(20, generator=g, dtype=torch.float64)
    >>> h = torch.tensor(0.1, dtype=torch.float64)
    >>> theta = torch.linalg.solve(X.T @ X / 20 + h * torch.eye(2, dtype=torch.float64),
    ...                            X.T @ y / 20)
    >>> z = linear_loo_predictions(X, theta, h, lambda z, h: 0.5 * (z - y) ** 2,
    ...                            penalty=lambda t, h: 0.5 * h * t @ t)
    >>> press = ridge_loo_residuals(X, y, 0.1 * 20)
    >>> bool(torch.allclose(y - z, press, rtol=1e-12, atol=0))
    True
    """
    n, p = X.shape
    w = torch.ones(n, dtype=X.dtype, device=X.device) if weights is None else weights
    a = w / w.sum()
    zz, d1, d2 = _linear_derivatives(X, theta, h, loss)
    n_out = zz.shape[1]
    hess = _gauss_newton(X, d2, a) + _penalty_derivatives(theta, h, penalty)[1]
    hess = 0.5 * (hess + hess.T)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(hess)).reshape(p, n_out, p, n_out)
    lev = a[:, None, None] * torch.einsum("ij,jckd,ik->icd", X, h_inv, X)  # A_i, (n, C, C)
    eye = torch.eye(n_out, dtype=X.dtype, device=X.device)
    shift = lev @ torch.linalg.solve(eye - d2 @ lev, d1[..., None])
    return (zz + shift[..., 0]).reshape((n,) + tuple(theta.shape[1:]))


def quadratic_penalty_terms(
    penalty: Penalty | None,
    p: int,
    h: torch.Tensor,
    *,
    diagonal: bool = False,
    dtype=None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, r)`` with ``penalty(theta, h) = 0.5 theta^T R theta + r^T theta + const``.

    Read off the gradient at ``theta = 0`` and the Hessian, so exact only for
    a penalty quadratic in ``theta`` (see :func:`quadratic_penalty_kind`);
    differentiable in ``h``. ``diagonal=True`` (a penalty known to have a
    diagonal Hessian, as a per-coefficient L2 has) reads ``R``'s diagonal from
    the gradient at ``theta = 1`` instead: two gradients rather than ``p``
    Hessian columns, which on a few coefficients is most of an outer step.
    """
    zero = torch.zeros(p, dtype=dtype, device=device)
    if penalty is None:
        return zero.new_zeros(p, p), zero
    if diagonal:
        with torch.enable_grad():
            t = torch.stack([zero, torch.ones_like(zero)]).requires_grad_(True)
            total = penalty(t[0], h) + penalty(t[1], h)
            g = (
                torch.autograd.grad(total, t, create_graph=True, allow_unused=True)[0]
                if total.requires_grad else None
            )
        if g is None:  # a penalty that does not depend on theta
            return zero.new_zeros(p, p), zero
        return torch.diag(g[1] - g[0]), g[0]
    r = grad(lambda t: penalty(t, h))(zero)
    R = hessian(lambda t: penalty(t, h))(zero)
    return 0.5 * (R + R.T), r


def linear_penalty_terms(
    penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    values: Callable[[torch.Tensor], torch.Tensor],
    p: int,
    n_values: int,
    hs: list[torch.Tensor],
    *,
    diagonal: bool = False,
    dtype=None,
    device=None,
    rtol: float = 1e-12,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """``h -> (R, r)`` of a quadratic penalty that is linear in its hyperparameter values.

    ``penalty(theta, v)`` takes the vector ``v`` of the tuned hyperparameters'
    values (``values(h)``: ``exp(h)`` for log-scaled ones). Where its
    :func:`quadratic_penalty_terms` are affine in ``v`` (an L2 weight per
    coefficient is), they are ``T(0) + sum_i v_i (T(e_i) - T(0))``: read off
    once here, each outer step forms them with one small matrix product
    instead of a (double) backward pass through the penalty, which on a few
    coefficients is most of a closed-form step. For an L2 weight the entries
    of ``T(e_i) - T(0)`` are 0 and 1, so the terms are the same numbers.

    Checked at every ``h`` of ``hs`` (the penalty against its quadratic form
    at two random ``theta``, to ``rtol``); ``None`` where they differ or are
    not finite (a penalty not linear in ``v``, or undefined at ``v = 0``):
    the caller then forms the terms by autograd. Without tuned values
    (``n_values = 0``) the terms are constants, still a function of ``h``
    for autograd. The function returned carries ``table = (base, slopes,
    diagonal)``: ``R``'s diagonal (or flattened ``R``) and ``r``, concatenated,
    are ``base + slopes @ v``.
    """

    # The terms at v = 0 and at each unit vector.
    basis = torch.cat([
        torch.zeros(1, n_values, dtype=dtype, device=device),
        torch.eye(n_values, dtype=dtype, device=device),
    ])
    gen = torch.Generator(device="cpu").manual_seed(1)
    points = [
        torch.randn(p, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        for _ in range(2)
    ]
    n_R = p if diagonal else p * p

    def close(want: torch.Tensor, got: torch.Tensor) -> bool:
        return bool(torch.isfinite(want).all()) and bool(
            ((want - got).abs() <= rtol * (want.abs() + got.abs() + 1)).all()
        )

    def finish(table: torch.Tensor, checked) -> Callable | None:
        """The affine terms of ``table`` (one row per basis point), checked at hs:
        from ``checked = (vs, pen)``, the penalty's values at ``(0, *points)``
        and each h's values ``vs``, where a batch gave them; else by plain calls."""
        base, slopes = table[0], (table[1:] - table[0]).T
        if not bool(torch.isfinite(base).all() and torch.isfinite(slopes).all()):
            return None

        def affine(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = base + slopes @ values(h)
            R = torch.diag(flat[:n_R]) if diagonal else flat[:n_R].reshape(p, p)
            return R, flat[n_R:]

        # For callers that differentiate the terms in v by hand (no autograd graph).
        affine.table = (base, slopes, diagonal)
        with torch.no_grad():
            if checked is not None:
                # All at once: the penalty (less its value at 0) against the
                # quadratic form at every (h, point); and one plain call against
                # its batched value, which the table rests on too.
                vs, pen = checked
                flat = base + vs @ slopes.T  # (len(hs), n_R + p)
                P = torch.stack(points)  # (2, p)
                got = 0.5 * (flat[:, None, :p] * P**2).sum(-1) + flat[:, p:] @ P.T
                plain = penalty(points[0], vs[0])
                return affine if close(pen[:, 1:] - pen[:, :1], got) and close(
                    plain.reshape(1), pen[0, 1].reshape(1)
                ) else None
            for h in hs:
                v = values(h.detach())
                R, r = affine(h.detach())
                zero = penalty(torch.zeros(p, dtype=dtype, device=device), v)
                for t in points:
                    if not close(penalty(t, v) - zero, 0.5 * t @ R @ t + r @ t):
                        return None
        return affine

    if not diagonal:
        return finish(torch.stack([
            torch.cat([R.reshape(-1), r]) for R, r in (
                quadratic_penalty_terms(
                    lambda th, h, v=v: penalty(th, v), p, v, dtype=dtype, device=device
                ) for v in basis
            )
        ]).detach(), None)

    # The diagonal reading from the penalty's values alone, in one batch under
    # vmap (cheaper there than its gradients): with P(theta) =
    # 0.5 theta^T diag(d) theta + r^T theta + c, d_i = P(e_i) + P(-e_i) - 2 P(0)
    # and r_i = (P(e_i) - P(-e_i)) / 2, the same numbers as its gradients at
    # theta = 0 and 1 give for an L2 weight. The same batch evaluates the
    # penalty where it is checked: theta = 0 and the two random points at each
    # h of hs.
    n_b = len(basis)
    vs = torch.stack([values(h.detach()) for h in hs]).reshape(len(hs), n_values)
    eye = torch.eye(p, dtype=dtype, device=device)
    at_values = torch.cat([eye.new_zeros(1, p), eye, -eye])  # (2p + 1, p)
    try:
        pen = vmap(penalty)(
            torch.cat([
                at_values.repeat(n_b, 1),
                torch.stack([torch.zeros_like(points[0]), *points]).repeat(len(hs), 1),
            ]),
            torch.cat([
                basis.repeat_interleave(2 * p + 1, dim=0), vs.repeat_interleave(3, dim=0)
            ]),
        )
    except (RuntimeError, ValueError, TypeError, IndexError):
        pen = None  # a penalty that does not batch
    if pen is not None:
        T = pen[: n_b * (2 * p + 1)].reshape(n_b, 2 * p + 1)
        zero, plus, minus = T[:, :1], T[:, 1 : p + 1], T[:, p + 1 :]
        return finish(
            torch.cat([plus + minus - 2.0 * zero, 0.5 * (plus - minus)], dim=1),
            (vs, pen[n_b * (2 * p + 1) :].reshape(len(hs), 3)),
        )
    # quadratic_penalty_terms' reading (gradients at theta = 0 and 1) at every
    # basis point: one backward pass through each point's penalty.
    with torch.enable_grad():
        t = torch.zeros(2 * n_b, p, dtype=dtype, device=device)
        t[1::2] = 1.0
        t.requires_grad_(True)
        total = sum(penalty(t[i], basis[i // 2]) for i in range(len(t)))
        g = (
            torch.autograd.grad(total, t, allow_unused=True)[0]
            if isinstance(total, torch.Tensor) and total.requires_grad else None
        )
    if g is None:  # a penalty that does not depend on theta
        g = torch.zeros(2 * n_b, p, dtype=dtype, device=device)
    return finish(torch.cat([g[1::2] - g[0::2], g[0::2]], dim=1).detach(), None)


def quadratic_penalty_kind(
    penalty: Penalty | None,
    p: int,
    hs: list[torch.Tensor],
    *,
    dtype=None,
    device=None,
    rtol: float = 1e-8,
) -> str | None:
    """``"diagonal"``, ``"dense"`` or ``None``: whether ``penalty`` is quadratic in ``theta``.

    Checked at each hyperparameter vector of ``hs`` and two random points
    ``theta``; ``"diagonal"`` when its Hessian is diagonal at every one.
    ``None``: not a quadratic (no closed-form fit).
    """
    if penalty is None:
        return "diagonal"
    gen = torch.Generator(device="cpu").manual_seed(0)
    points = [
        torch.randn(p, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        for _ in range(2)
    ]

    def matches(h, R, r) -> bool:
        base = penalty(torch.zeros(p, dtype=dtype, device=device), h).detach()
        for t in points:
            want = penalty(t, h).detach() - base
            got = 0.5 * t @ R @ t + r @ t
            if not bool(torch.isfinite(want)) or not bool(
                (want - got).abs() <= rtol * (want.abs() + got.abs() + 1)
            ):
                return False
        return True

    kind = "diagonal"
    for h in hs:
        h = h.detach()
        # The diagonal form first (two gradients); the dense Hessian, p backward
        # passes, only where that form does not match at the random points.
        R, r = quadratic_penalty_terms(penalty, p, h, diagonal=True, dtype=dtype, device=device)
        if matches(h, R.detach(), r.detach()):
            continue
        with torch.enable_grad():
            t0 = torch.zeros(p, dtype=dtype, device=device, requires_grad=True)
            (r,) = torch.autograd.grad(penalty(t0, h), t0, create_graph=True)
            cols = []
            for j in range(p):
                col = (
                    torch.autograd.grad(r[j], t0, retain_graph=True, allow_unused=True)[0]
                    if r.requires_grad else None
                )
                cols.append(torch.zeros_like(t0) if col is None else col)
        if not matches(h, torch.stack(cols).detach(), r.detach()):
            return None
        kind = "dense"
    return kind


def linear_kfold_problem(
    designs: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    penalty: Penalty | None = None,
    *,
    diagonal_penalty: bool = False,
    reduction: str = "folds",
    penalty_terms: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[BilevelProblem, Callable[[torch.Tensor], torch.Tensor]]:
    """Exact K-fold cross-validation of squared loss and a quadratic penalty, in closed form.

    Split ``k`` fits ``theta_k = argmin sum_i t_ki (x_ki^T theta - y_i)^2 /
    sum_i t_ki + P(theta; h)`` and is judged on ``sum_i v_ki (x_ki^T theta_k -
    y_i)^2 / sum_i v_ki``, with ``t`` and ``v`` the splits' training and
    validation row weights (0 off the split). With ``P = 0.5 theta^T R(h)
    theta + r(h)^T theta + c`` the fit solves ``(2 G_k + R) theta_k = 2 b_k -
    r`` with ``G_k = X_k^T T_k X_k / sum t_k`` and ``b_k = X_k^T T_k y /
    sum t_k``: the Gram matrices of the training rows are formed once, and
    each outer step costs one batched Cholesky factorisation of ``K`` ``p x p``
    matrices, whatever the number of rows. This is the refit that Woodbury
    (``H - D_k^T W_k D_k``) or NS describe, without the ``n_k x n_k``
    inverse Woodbury needs: ``p`` is small here (stacking: the models plus an
    intercept).

    The validation loss is differentiable in ``h`` through the small linear
    algebra, so the bilevel problem it returns has no inner parameters
    (``theta0`` is empty): the engine's inner solve is a no-op and its
    hypergradient is the direct derivative.

    Parameters
    ----------
    designs : Tensor
        ``(n, p)``, or ``(K, n, p)`` when each split has its own design (its
        features standardised on its own training rows).
    y : Tensor
        ``(n,)`` targets.
    train, val : Tensor
        ``(K, n)`` non-negative row weights of each split's training and
        validation rows (each row of each positive in total).
    penalty : callable, default=None
        ``(theta, h) -> scalar``, quadratic in ``theta`` of shape ``(p,)``
        (checked by :func:`quadratic_penalty_kind` by the caller).
    diagonal_penalty : bool, default=False
        The penalty's Hessian is diagonal (see :func:`quadratic_penalty_terms`).
    reduction : {"folds", "mean"}, default="folds"
        Sum of the splits' validation losses (as the engine's stacked fold
        problems return) or their mean.
    penalty_terms : callable, default=None
        ``h -> (R, r)`` as :func:`quadratic_penalty_terms` returns them,
        where the caller has a cheaper way to form them (a penalty linear in
        its hyperparameter values: :func:`linear_penalty_terms`); ``None``
        reads them off ``penalty`` by autograd at every ``h``.

    Returns
    -------
    problem : BilevelProblem
        ``outer_loss(theta, h)`` ignores its empty ``theta``.
    solutions : callable
        ``solutions(h)``: the splits' parameters, ``(K, p)``, differentiable.
    """
    _check_choice("reduction", reduction, ("folds", "mean"))
    K, n = train.shape
    if designs.dim() == 2:
        designs = designs.expand(K, n, designs.shape[1])
    p = designs.shape[2]
    w_tr, w_va = train.sum(1), val.sum(1)
    if not (bool((w_tr > 0).all()) and bool((w_va > 0).all())):
        raise ValueError(
            "every split needs training and validation rows of positive total weight."
        )
    dtype, device = designs.dtype, designs.device
    moments: list = []  # of each split's training rows, formed at the first solve

    def solutions(h: torch.Tensor) -> torch.Tensor:
        if not moments:
            moments.append(
                torch.einsum("ki,kij,kil->kjl", train, designs, designs) / w_tr[:, None, None]
            )
            moments.append(torch.einsum("ki,kij,i->kj", train, designs, y) / w_tr[:, None])
        gram, moment = moments
        if penalty_terms is not None:
            R, r = penalty_terms(h)
        else:
            R, r = quadratic_penalty_terms(
                penalty, p, h, diagonal=diagonal_penalty, dtype=dtype, device=device
            )
        A = 2.0 * gram + R
        chol, info = torch.linalg.cholesky_ex(0.5 * (A + A.transpose(1, 2)))
        if bool((info > 0).any()):
            raise InnerDivergenceError(
                "the training loss of a split is not strictly convex at these "
                "hyperparameters (its Gram matrix plus penalty is singular)."
            )
        return torch.cholesky_solve((2.0 * moment - r)[..., None], chol)[..., 0]

    def outer(theta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        thetas = solutions(h)
        resid = torch.einsum("kij,kj->ki", designs, thetas) - y
        per_split = (val * resid.pow(2)).sum(1) / w_va
        return per_split.sum() if reduction == "folds" else per_split.mean()

    def inner(theta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # No inner parameters (the fits are in closed form); h enters so that
        # methods differentiating L in h get a zero, not an error.
        return theta.pow(2).sum() + 0.0 * h.sum()

    empty = torch.zeros(0, dtype=dtype, device=device)
    # Decided here: the engine would otherwise probe the Hessian of no parameters
    # (and there is no Hessian block to form: its linear solves are empty).
    decision = HessianDecision(
        False, "the splits' fits are in closed form: no inner parameters, no Hessian blocks"
    )
    return BilevelProblem(inner, outer, empty, hessian=decision), solutions
