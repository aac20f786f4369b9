"""Approximate cross-validation: the cross-fitted validation loss from one inner solve.

Exact K-fold cross-fitting solves K inner problems per outer step. From the
full-data optimum ``theta_hat`` one Newton step on each fold's training loss
(NS) gives the fold's solution to second order in the left-out share, and the
infinitesimal jackknife (IJ) uses the full-data Hessian for every fold.
:func:`acv_loss` takes any per-row loss and forms the fold Hessians by
automatic differentiation (``K p`` backward passes: for a few tens of
parameters); :mod:`._acv_linear` does the same for a linear predictor
(stacking, a softmax meta-learner) in one pass over the rows, and holds the
closed-form leave-one-out steps.

Every function here is differentiable in ``theta_hat`` and in the
hyperparameters ``h`` (the Hessians are built with a graph, so the third
derivatives of the loss appear in backward), which lets the engine's implicit
hypergradient treat the approximate CV loss as an ordinary outer loss
``Q(theta, h)``: :func:`acv_problem` builds that :class:`BilevelProblem`.

Conventions match :func:`aggregators._bilevel.make_problem`: the training
loss is a weighted mean of per-row losses plus a penalty,
``L(theta, h) = sum_i w_i l_i(theta, h) / sum_i w_i + R(theta; h)``, and a
fold's validation loss is the weighted mean over its rows.

References
----------
Beirami, A., Razaviyayn, M., Shahrampour, S., & Tarokh, V. (2017). On optimal
generalizability in parametric learning. NeurIPS.

Rad, K. R., & Maleki, A. (2020). A scalable estimate of the out-of-sample
prediction error via approximate leave-one-out cross-validation. JRSS B.

Giordano, R., Stephenson, W., Liu, R., Jordan, M., & Broderick, T. (2019). A
Swiss army infinitesimal jackknife. AISTATS.

Stephenson, W., & Broderick, T. (2020). Approximate cross-validation in high
dimensions with guarantees. AISTATS.

Burn, R. (2020). Optimizing approximate leave-one-out cross-validation to tune
hyperparameters. arXiv:2011.10218.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.functional import jacobian
from torch.func import jacrev

from ._problem import BilevelProblem

__all__ = ["ACV_METHODS", "acv_fold_params", "acv_loss", "acv_problem", "fold_membership"]

#: Approximate fold solutions: a Newton step on each fold's training loss with
#: that fold's Hessian (``"ns"``), or with the full-data Hessian (``"ij"``).
ACV_METHODS = ("ns", "ij")

RowLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Penalty = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LinearLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Folds = torch.Tensor | Sequence[torch.Tensor]


def fold_membership(
    folds: Folds, n: int, *, dtype: torch.dtype = torch.float64, device=None
) -> torch.Tensor:
    """The ``(K, n)`` 0/1 matrix whose row ``k`` marks the rows held out in fold ``k``.

    Parameters
    ----------
    folds : Tensor or sequence of Tensor
        Either a fold-id vector of ``n`` integers (``0 .. K-1``; a negative id
        marks a row that is never held out, i.e. always trained on), or one
        index tensor per fold (disjoint; rows in none are always trained on).
    n : int
        Number of rows.
    dtype, device
        Of the returned matrix.

    Returns
    -------
    Tensor
        Shape ``(K, n)``.

    Raises
    ------
    ValueError
        When the folds overlap, an index is out of range, a fold is empty or
        a fold-id vector does not have ``n`` entries.

    Examples
    --------
    >>> import torch
    >>> fold_membership(torch.tensor([0, 1, 0, -1]), 4)
    tensor([[1., 0., 1., 0.],
            [0., 1., 0., 0.]], dtype=torch.float64)
    """
    if isinstance(folds, torch.Tensor) and folds.dim() == 1 and not folds.is_floating_point():
        if folds.numel() != n:
            raise ValueError(
                f"a fold-id vector needs one id per row ({n}); got {folds.numel()} ids."
            )
        ids = folds.to(device)
        n_folds = int(ids.max()) + 1 if ids.numel() else 0
        if n_folds < 1:
            raise ValueError("the fold ids hold no fold: every id is negative.")
        ks = torch.arange(n_folds, device=ids.device)
        member = (ids[None, :] == ks[:, None]).to(dtype)
    else:
        parts = list(folds)
        if not parts:
            raise ValueError("folds is empty; give at least one fold.")
        member = torch.zeros(len(parts), n, dtype=dtype, device=device)
        for k, idx in enumerate(parts):
            idx = torch.as_tensor(idx, device=device).long().reshape(-1)
            if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
                raise ValueError(f"fold {k} indexes rows outside 0..{n - 1}.")
            member[k, idx] = 1.0
    counts = member.sum(1)
    if bool((counts == 0).any()):
        raise ValueError(
            f"fold(s) {torch.nonzero(counts == 0).reshape(-1).tolist()} hold no row; "
            "every fold needs at least one row."
        )
    if bool((member.sum(0) > 1).any()):
        raise ValueError("the folds overlap: a row may be held out by one fold only.")
    return member


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}.")


def _no_vmap_rule(e: BaseException) -> bool:
    """Whether ``e`` is torch's complaint that an operation cannot be vmapped."""
    msg = str(e)
    return isinstance(e, NotImplementedError) or "vmap" in msg or "atching rule" in msg


def _fold_derivatives(
    fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(m, p)`` and dense Hessians ``(m, p, p)`` of a vector function ``fn``.

    Reverse over reverse with ``torch.func`` (vmapped vector-Jacobian
    products), so the result keeps the graph to ``theta`` and to whatever
    ``fn`` captures (the hyperparameters): backward through it is the third
    derivative the hypergradient of the approximate CV loss needs. An
    operation without a batched (vmap) rule falls back to one backward pass
    per entry.
    """

    def grads_twice(t: torch.Tensor):
        g = jacrev(fn)(t)
        return g, g

    try:
        hess, grads = jacrev(grads_twice, has_aux=True)(theta)
    except (RuntimeError, NotImplementedError) as e:
        # Only a missing vmap rule falls back; out of memory or a bug in
        # ``fn`` must surface, not be retried in a slower form.
        if isinstance(e, torch.OutOfMemoryError) or not _no_vmap_rule(e):
            raise

        def grads_fn(t: torch.Tensor) -> torch.Tensor:
            return jacobian(fn, t, create_graph=True)

        grads = grads_fn(theta)
        hess = jacobian(grads_fn, theta, create_graph=True)
    return grads, 0.5 * (hess + hess.transpose(-1, -2))


def acv_fold_params(
    row_loss: RowLoss,
    theta: torch.Tensor,
    h: torch.Tensor,
    folds: Folds,
    *,
    penalty: Penalty | None = None,
    weights: torch.Tensor | None = None,
    method: str = "ns",
    normalize: str = "fold",
) -> torch.Tensor:
    """Approximate solutions ``theta_tilde_{-k}`` of the folds' training problems.

    Fold ``k`` trains on the rows it does not hold out:
    ``L_{-k}(theta) = c_k sum_{i not in S_k} w_i l_i(theta, h) + R(theta; h)``.
    From the full-data optimum ``theta`` (where ``L``'s gradient vanishes),
    ``theta_tilde_{-k} = theta - M_k^{-1} grad L_{-k}(theta)`` with ``M_k``
    the Hessian of ``L_{-k}`` at ``theta`` (NS, one Newton step; exact for a
    quadratic ``L``) or of the full-data ``L`` (IJ, one matrix for all folds).

    Parameters
    ----------
    row_loss : callable
        ``(theta, h) -> (n,)``: each row's training loss ``l_i`` (without
        sample weights). Called inside ``torch.func.jacrev``; it should be
        vmappable (otherwise a slower loop is used).
    theta : Tensor
        Flat ``(p,)`` full-data optimum of
        ``L = sum_i w_i l_i / sum_i w_i + R``.
    h : Tensor
        Hyperparameters.
    folds : Tensor or sequence of Tensor
        See :func:`fold_membership`.
    penalty : callable, default=None
        ``(theta, h) -> scalar``: ``R(theta; h)``; none when omitted.
    weights : Tensor, default=None
        ``(n,)`` non-negative sample weights; all equal when omitted.
    method : {"ns", "ij"}, default="ns"
        See :data:`ACV_METHODS`.
    normalize : {"fold", "full"}, default="fold"
        ``c_k``: ``1 / sum_{i not in S_k} w_i``, the weighted mean over the
        fold's training rows (what the engine's exact cross-fitting,
        :func:`aggregators._bilevel.make_fold_problems`, minimises), or
        ``1 / sum_i w_i`` (the penalty keeps its weight against the data
        sum, as in classical leave-one-out: the closed forms
        :func:`linear_loo_predictions` and :func:`ridge_loo_residuals`).

    Returns
    -------
    Tensor
        ``(K, p)``, differentiable in ``theta``, ``h`` and ``weights``.
    """
    _check_choice("method", method, ACV_METHODS)
    _check_choice("normalize", normalize, ("fold", "full"))
    if theta.dim() != 1:
        raise ValueError(f"theta must be a flat (p,) vector; got shape {tuple(theta.shape)}.")
    with torch.no_grad():  # the number of rows, to check the folds against
        n = row_loss(theta.detach(), h.detach()).shape[0]
    with torch.enable_grad():
        member = fold_membership(folds, n, dtype=theta.dtype, device=theta.device)
        w = torch.ones(n, dtype=theta.dtype, device=theta.device) if weights is None else weights
        # Fold sums of the weighted losses, the rows held out by no fold, and
        # the penalty: one dense Hessian call yields every piece.
        groups = _groups(member, w)

        def pieces(t: torch.Tensor) -> torch.Tensor:
            sums = groups @ row_loss(t, h)
            pen = penalty(t, h) if penalty is not None else sums.new_zeros(())
            return torch.cat([sums, pen.reshape(1)])

        grads, hess = _fold_derivatives(pieces, theta)
    return _newton_fold_steps(
        theta, grads[:-1], hess[:-1], grads[-1], hess[-1], member, w, method, normalize
    )


def _groups(member: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(K + 1, n)`` weights: each fold's rows, then the rows no fold holds out."""
    return torch.cat([member, (1.0 - member.sum(0, keepdim=True)).clamp_min(0.0)]) * w


def _newton_fold_steps(
    theta: torch.Tensor,
    g_groups: torch.Tensor,
    h_groups: torch.Tensor,
    g_pen: torch.Tensor,
    h_pen: torch.Tensor,
    member: torch.Tensor,
    w: torch.Tensor,
    method: str,
    normalize: str,
) -> torch.Tensor:
    """``theta - M_k^{-1} grad L_{-k}(theta)`` for every fold, from the weighted
    gradient and Hessian sums of the row groups of :func:`_groups` and the
    penalty's gradient and Hessian."""
    n_folds = member.shape[0]
    total_w = w.sum()
    kept_w = total_w - member @ w
    if not bool((kept_w > 0).all()):
        raise ValueError(
            "a fold holds out every row with positive weight: its training loss is "
            "empty; use more folds."
        )
    scale = 1.0 / (kept_w if normalize == "fold" else total_w.expand(n_folds))
    g_all, h_all = g_groups.sum(0), h_groups.sum(0)
    grad_k = scale[:, None] * (g_all - g_groups[:n_folds]) + g_pen
    if method == "ns":
        hess_k = scale[:, None, None] * (h_all - h_groups[:n_folds]) + h_pen
    else:
        hess_k = (h_all / total_w + h_pen).expand(n_folds, -1, -1)
    # Directions along which every fold's training loss is flat (a softmax's
    # common shift of the class scores through an unpenalised intercept) make
    # the Hessians singular. The step has no component along them (the
    # gradient vanishes there), but the solve's backward amplifies rounding by
    # the inverse of a rounding-size eigenvalue, and the hypergradient with it.
    # Adding them back at the Hessian's own scale leaves the step unchanged.
    hess_k = hess_k + _flat_directions(h_all / total_w + h_pen)
    step = torch.linalg.solve(hess_k, grad_k[..., None])[..., 0]
    return theta - step


def _flat_directions(hess: torch.Tensor) -> torch.Tensor:
    """``s N N^T``: the (numerically) null eigenvectors ``N`` of ``hess`` at its scale ``s``.

    Null means an eigenvalue below ``1000 eps`` of the largest in magnitude
    (rounding, not a small penalty: a ridge of ``1e-6`` stays). Computed
    without a graph: it is a constant added to the fold Hessians.
    """
    with torch.no_grad():
        sym = 0.5 * (hess + hess.transpose(-1, -2)).detach()
        vals, vecs = torch.linalg.eigh(sym)
        top = vals.abs().max().clamp_min(torch.finfo(sym.dtype).tiny)
        null = vecs[:, vals.abs() <= 1e3 * torch.finfo(sym.dtype).eps * top]
        return top * (null @ null.T)


def _reduce(losses: torch.Tensor, member: torch.Tensor, weights, reduction: str) -> torch.Tensor:
    """Validation loss of the held-out rows: ``losses`` is ``(K, n)`` (each fold's
    parameters on every row) or ``(n,)`` (each row under its own fold's)."""
    wm = member if weights is None else member * weights
    fold_sums = (wm * losses).sum(1)
    if reduction == "mean":
        return fold_sums.sum() / wm.sum()
    return (fold_sums / wm.sum(1)).sum()


def acv_loss(
    row_loss: RowLoss,
    theta: torch.Tensor,
    h: torch.Tensor,
    folds: Folds,
    *,
    penalty: Penalty | None = None,
    weights: torch.Tensor | None = None,
    outer_row_loss: RowLoss | None = None,
    method: str = "ns",
    normalize: str = "fold",
    reduction: str = "mean",
) -> torch.Tensor:
    """Approximate K-fold cross-validation loss from the full-data optimum.

    ``sum_k sum_{i in S_k} w_i l_i(theta_tilde_{-k}, h)``, divided by the
    weight of all held-out rows (``reduction="mean"``), or the sum over folds
    of each fold's weighted mean (``reduction="folds"``, the value the
    engine's stacked fold problems return, K times the mean of fold means),
    with ``theta_tilde_{-k}`` from :func:`acv_fold_params`.

    Parameters
    ----------
    row_loss, theta, h, folds, penalty, weights, method, normalize
        See :func:`acv_fold_params`.
    outer_row_loss : callable, default=None
        ``(theta, h) -> (n,)``: the per-row validation loss, when it differs
        from the training loss (e.g. a training loss with a relaxation or
        per-row weights that depend on ``h``); ``row_loss`` when omitted.
    reduction : {"mean", "folds"}, default="mean"

    Returns
    -------
    Tensor
        Scalar, differentiable in ``theta`` and ``h`` (through the Hessians:
        backward takes third derivatives of ``row_loss``).

    Examples
    --------
    Ridge regression is quadratic, so one Newton step is the exact fold fit:

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    >>> y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    >>> rows = lambda t, h: 0.5 * (X @ t - y) ** 2
    >>> pen = lambda t, h: 0.5 * h.exp() * t @ t
    >>> h = torch.tensor(0.0, dtype=torch.float64)
    >>> theta = torch.linalg.solve(X.T @ X / 30 + torch.eye(3, dtype=torch.float64), X.T @ y / 30)
    >>> ids = torch.arange(30) % 3
    >>> acv = acv_loss(rows, theta, h, ids, penalty=pen)
    >>> exact = 0.0
    >>> for k in range(3):
    ...     tr, va = ids != k, ids == k
    ...     A = X[tr].T @ X[tr] / tr.sum() + torch.eye(3, dtype=torch.float64)
    ...     t_k = torch.linalg.solve(A, X[tr].T @ y[tr] / tr.sum())
    ...     exact = exact + rows(t_k, h)[va].sum() / 30
    >>> bool(torch.isclose(acv, exact, rtol=1e-12))
    True
    """
    _check_choice("reduction", reduction, ("mean", "folds"))
    thetas = acv_fold_params(
        row_loss, theta, h, folds, penalty=penalty, weights=weights, method=method,
        normalize=normalize,
    )
    outer = row_loss if outer_row_loss is None else outer_row_loss
    # Every fold's parameters see all n rows and the fold's own rows are
    # picked out: K forward passes, the same as evaluating exact CV's folds.
    losses = torch.stack([outer(t, h) for t in thetas])  # (K, n)
    member = fold_membership(folds, losses.shape[1], dtype=losses.dtype, device=losses.device)
    return _reduce(losses, member, weights, reduction)


def acv_problem(
    row_loss: RowLoss,
    theta0: torch.Tensor,
    folds: Folds,
    *,
    penalty: Penalty | None = None,
    weights: torch.Tensor | None = None,
    outer_row_loss: RowLoss | None = None,
    method: str = "ns",
    normalize: str = "fold",
    reduction: str = "mean",
) -> BilevelProblem:
    """The bilevel problem of tuning ``h`` on the approximate CV loss.

    Inner loss: the full-data training loss
    ``sum_i w_i l_i(theta, h) / sum_i w_i + R(theta; h)``; outer loss:
    :func:`acv_loss` at ``theta``. At the inner optimum the engine's implicit
    hypergradient (:func:`~aggregators.hypergrad.hypergradient` with
    ``"implicit-cg"``, ``"implicit-neumann"`` or ``"hoag"``) then returns
    ``dACV/dh = d_h Q - (d2_{h theta} L)^T H^{-1} d_theta Q``, where
    ``d_theta Q`` carries the dependence of the fold steps on ``theta``.
    One inner solve per outer step replaces K.

    Parameters
    ----------
    row_loss, folds, penalty, weights, outer_row_loss, method, normalize, reduction
        See :func:`acv_loss`.
    theta0 : Tensor
        Start of the inner solve.

    Returns
    -------
    BilevelProblem

    Examples
    --------
    >>> import torch
    >>> from aggregators.hypergrad import hypergradient, solve_inner
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    >>> y = (X[:, 0] + 0.5 * torch.randn(40, generator=g, dtype=torch.float64) > 0).double()
    >>> rows = lambda t, h: torch.nn.functional.binary_cross_entropy_with_logits(
    ...     X @ t, y, reduction="none")
    >>> pen = lambda t, h: 0.5 * h.exp().sum() * t @ t
    >>> problem = acv_problem(rows, torch.zeros(3, dtype=torch.float64), torch.arange(40) % 5,
    ...                       penalty=pen)
    >>> h = torch.tensor([-2.0], dtype=torch.float64)
    >>> theta, _, _ = solve_inner(problem, h, tol=1e-10)
    >>> res = hypergradient(problem, theta, h, "implicit-cg")
    >>> res.grad.shape
    torch.Size([1])
    """
    _check_choice("method", method, ACV_METHODS)
    _check_choice("normalize", normalize, ("fold", "full"))
    _check_choice("reduction", reduction, ("mean", "folds"))

    def inner(theta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        losses = row_loss(theta, h)
        data = losses.mean() if weights is None else (weights * losses).sum() / weights.sum()
        return data + penalty(theta, h) if penalty is not None else data

    def outer(theta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return acv_loss(
            row_loss, theta, h, folds, penalty=penalty, weights=weights,
            outer_row_loss=outer_row_loss, method=method, normalize=normalize,
            reduction=reduction,
        )

    return BilevelProblem(inner, outer, theta0.detach())
