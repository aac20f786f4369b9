"""Closed-form derivatives for aggregation functions linear in their parameters.

Where the forward pass is ``design @ Theta`` (:meth:`~Aggregator.linear_design`:
stacking), the training loss cross-entropy or squared error with row weights,
and the penalty a quadratic in the parameters, the loss and its gradient
take one pass (the softmax once), a Hessian-vector product two matrix
products, and the Hessian blocks two batched matrix products. Autograd computes the same
numbers, but on the small tensors of a stacking meta-learner its fixed cost
per call is most of the time: the inner L-BFGS and the conjugate gradient of
the hypergradient make hundreds of such calls per fit.

:func:`attach_linear_derivatives` gives a :class:`BilevelProblem` built by
:mod:`._bilevel` these callables (the engine uses them when present, autograd
otherwise), after checking them against the problem's own autograd losses.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._base import AggregationContext, Aggregator
from .hypergrad import BilevelProblem, is_out_of_memory
from .hypergrad._problem import vjp

__all__ = [
    "ANALYTIC", "WEIGHTS_ANALYTIC", "attach_linear_derivatives", "attach_weights_derivatives",
]

#: Whether :mod:`._bilevel` gives linear-design problems closed-form
#: derivatives (``False``: autograd throughout, for comparison).
ANALYTIC = True

#: Whether linear-design problems give the inner solvers (L-BFGS, conjugate
#: gradient) a block-Jacobi preconditioner: the closed-form Hessian's blocks
#: of one fold and one output (``False``: unpreconditioned, for comparison).
PRECONDITION = True

#: Whether classifiers' Newton steps and block-Jacobi preconditioner form the
#: data part of their Hessian blocks from a float32 copy of a float64 design
#: (``BilevelProblem.newton_hessian``): those batched products are the largest
#: cost of an outer evaluation, and float32 products are cheaper on CPU. Both
#: only steer the solves: convergence is judged on the float64 gradient, and
#: the hypergradient's conjugate gradient on float64 Hessian-vector products.
#: ``False``: the working precision throughout, for comparison.
LOW_PRECISION_BLOCKS = True

#: Levenberg shift of those Newton blocks, relative to each block's largest
#: diagonal entry: a few float32 roundings. The data blocks are singular (the
#: logits' common shift is free), and rounding pushes that eigenvalue either
#: side of zero: without it, Newton's factorisation found the shift by
#: retries, several per step.
LOW_PRECISION_SHIFT = 1e-6

#: Largest number of parameters per fold whose penalty Hessian is formed as a
#: matrix (once per hyperparameter vector); above it the penalty's
#: derivatives come from autograd on the penalty alone.
PENALTY_MATRIX_MAX = 2048

#: Largest ``rows x parameters`` (and ``parameters ** 2``) of a fold for
#: which the Hessian blocks are formed in closed form.
HESSIAN_MAX_ENTRIES = 2**24

#: Largest number of design entries, all folds' training and validation rows
#: together, for which the closed form is given: it copies the designs, and
#: above this the arithmetic, not autograd's fixed cost per call, takes the
#: time (the same reasoning as ``_bilevel.BATCHED_MAX_ENTRIES``).
DESIGN_MAX_ENTRIES = 2**24


class _Sparsity:
    """Where a quadratic penalty's Hessian is non-zero, and columns that share no row.

    Found once from a dense Hessian; at another ``h`` the Hessian then takes
    one gradient per colour (columns of one colour probed together, as in
    Curtis, Powell and Reid's estimation of sparse Jacobians) instead of one
    per parameter: stacking's penalty couples only the diagonal entries of
    each model's block, so ``n_classes + 1`` gradients instead of hundreds.
    """

    def __init__(self, R: torch.Tensor):
        p = R.shape[0]
        nz = R != 0
        nz |= torch.eye(p, dtype=torch.bool, device=R.device)
        rows, cols = nz.nonzero(as_tuple=True)
        self.rows, self.cols = rows, cols
        rows_of = [[] for _ in range(p)]
        for i, j in zip(rows.tolist(), cols.tolist()):
            rows_of[j].append(i)
        colour = [-1] * p
        used: list[set] = []  # rows each colour already covers
        for j in range(p):  # greedy colouring: first colour with no shared row
            for k, covered in enumerate(used):
                if covered.isdisjoint(rows_of[j]):
                    colour[j] = k
                    covered.update(rows_of[j])
                    break
            else:
                colour[j] = len(used)
                used.append(set(rows_of[j]))
        self.colour = torch.as_tensor(colour, device=R.device)
        self.probes = torch.zeros(len(used), p, dtype=R.dtype, device=R.device)
        self.probes[self.colour, torch.arange(p, device=R.device)] = 1.0
        # Gather and scatter-add have a fixed cost that only large, sparse
        # penalties repay; small ones stay dense.
        self.sparse = p >= 384 and rows.numel() <= 0.05 * p * p

    def hessian(self, r_graph: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The Hessian from the penalty's gradient ``r_graph`` at ``t`` (built with
        ``create_graph``): one batched backward pass, one probe per colour."""
        p = self.probes.shape[1]
        (cols,) = torch.autograd.grad(r_graph, t, self.probes, is_grads_batched=True,
                                      retain_graph=True)  # (colours, p): R @ probe
        values = cols[self.colour[self.cols], self.rows]
        if self.sparse:
            return _SparseSym(self.rows, self.cols, values, p)
        R = self.probes.new_zeros(p, p)
        R[self.rows, self.cols] = values
        return R


#: Penalty sparsity patterns by (aggregation function type, parameters, h shape, dtype).
_PATTERNS: dict = {}


class _SparseSym:
    """A sparse ``p x p`` matrix as coordinates: ``T @ R`` by a gather and a
    scatter-add (no sparse-tensor layout, whose CPU kernels warn of a beta state)."""

    def __init__(self, rows, cols, values, p):
        self.rows, self.cols, self.values, self.p = rows, cols, values, p

    def __rmatmul__(self, T: torch.Tensor) -> torch.Tensor:  # T @ R = (R T^T)^T, R symmetric
        out = T.new_zeros(T.shape[:-1] + (self.p,))
        return out.index_add_(-1, self.rows, T[..., self.cols] * self.values)

    def to_dense(self) -> torch.Tensor:
        R = self.values.new_zeros(self.p, self.p)
        R[self.rows, self.cols] = self.values
        return R


class _PenaltyModel:
    """The penalty at one hyperparameter vector ``h``, over ``F`` folds' parameters.

    ``0.5 t^T R t + r^T t + c`` when the penalty is a quadratic in ``t`` (its
    Hessian read off with :class:`_Sparsity`'s colouring, found from a dense
    Hessian at the first ``h`` and again wherever the result fails the check
    at two random points); autograd on the penalty otherwise. ``R`` is kept
    sparse when most of it is zero (a per-coefficient L2 with a few
    couplings, as stacking's pool has).
    """

    def __init__(self, penalty: Callable, h: torch.Tensor, p: int, like: torch.Tensor,
                 state: dict):
        self.penalty, self.h, self.p = penalty, h, p
        self.R = None
        if p > PENALTY_MATRIX_MAX or state.get("failed"):
            return
        try:
            with torch.enable_grad():
                t = like.new_zeros(p).requires_grad_(True)
                c = penalty(t, h)
                (r,) = torch.autograd.grad(c, t, create_graph=True, allow_unused=True)
                R = None
                if r is None or not r.requires_grad:  # constant or linear in t
                    r = like.new_zeros(p) if r is None else r
                    R = like.new_zeros(p, p)
                elif "sparsity" in state:
                    R = state["sparsity"].hessian(r, t)
                if R is not None and not self._matches(R, r.detach(), c.detach(), like):
                    R = None  # its pattern changed with h
                fresh = R is None
                if fresh:  # every column from one batched backward pass
                    eye = torch.eye(p, dtype=like.dtype, device=like.device)
                    (R,) = torch.autograd.grad(r, t, eye, is_grads_batched=True)
        except RuntimeError as e:  # a penalty whose second derivatives do not batch
            if is_out_of_memory(e):
                raise
            state["failed"] = True
            return
        c, r = c.detach(), r.detach()
        if fresh:
            R = 0.5 * (R + R.T)
            if not self._matches(R, r, c, like):
                state["failed"] = True  # not a quadratic: autograd from now on
                return
            state["sparsity"] = sparsity = _Sparsity(R)
            if "key" in state:
                if len(_PATTERNS) >= 64:
                    _PATTERNS.clear()
                _PATTERNS[state["key"]] = sparsity
            if sparsity.sparse:
                R = _SparseSym(sparsity.rows, sparsity.cols, R[sparsity.rows, sparsity.cols], p)
        self.R, self.r, self.c = R, r, c

    def _matches(self, R, r, c, like) -> bool:
        gen = torch.Generator(device="cpu").manual_seed(0)
        tol = max(1e-8, 100 * torch.finfo(like.dtype).eps)
        for _ in range(2):
            t = torch.randn(self.p, generator=gen, dtype=torch.float64).to(like)
            Rt = t @ R  # R symmetric
            want, got = self.penalty(t, self.h), 0.5 * t @ Rt + r @ t + c
            if not bool((want - got).abs() <= tol * (want.abs() + got.abs() + 1)):
                return False
        return True

    def _matvec(self, T: torch.Tensor) -> torch.Tensor:  # (F, p) -> (F, p)
        return T @ self.R

    def value_grad(self, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.R is not None:
            RT = self._matvec(T)
            value = 0.5 * (T * RT).sum() + (T @ self.r).sum() + T.shape[0] * self.c
            return value, RT + self.r
        with torch.enable_grad():
            t = T.detach().requires_grad_(True)
            value = sum(self.penalty(t[k], self.h) for k in range(t.shape[0]))
            (g,) = torch.autograd.grad(value, t, allow_unused=True)
        return value.detach(), torch.zeros_like(T) if g is None else g

    def hvp(self, T: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``V -> (d2 penalty / dt2) V`` at ``T`` (folds independent)."""
        if self.R is not None:
            return self._matvec
        with torch.enable_grad():
            t = T.detach().requires_grad_(True)
            value = sum(self.penalty(t[k], self.h) for k in range(t.shape[0]))
            (g,) = torch.autograd.grad(value, t, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:
            return torch.zeros_like

        def product(V: torch.Tensor) -> torch.Tensor:
            (out,) = vjp(g, t, V, retain_graph=True, allow_unused=True)
            return torch.zeros_like(V) if out is None else out

        return product

    def dense(self) -> torch.Tensor | None:
        if self.R is None:
            return None
        return self.R.to_dense() if isinstance(self.R, _SparseSym) else self.R

    def class_blocks(self, q: int, c: int) -> torch.Tensor | None:
        """``(c, q, q)``: the entries of ``R`` that couple one output's parameters
        (``Theta`` of shape ``(q, c)`` in row-major order), one block per output."""
        if self.R is None:
            return None
        if not isinstance(self.R, _SparseSym):
            return torch.diagonal(self.R.reshape(q, c, q, c), dim1=1, dim2=3).permute(2, 0, 1)
        # Straight from the coordinates: the dense p x p matrix is mostly zeros.
        S = self.R
        keep = (S.rows % c) == (S.cols % c)
        rows, cols, values = S.rows[keep], S.cols[keep], S.values[keep]
        out = values.new_zeros(c, q, q)
        out[rows % c, rows // c, cols // c] = values
        return out


class _LinearRows:
    """One set of rows per fold: design ``(F, n, q)``, targets, row weights ``(F, n)``.

    The loss of fold ``k`` is ``sum_i w_ki loss(y_ki, D_ki Theta_k)``, padding
    weighted 0, as :func:`~aggregators._bilevel.row_losses` defines ``loss``.
    """

    def __init__(self, task: str, D: torch.Tensor, y: torch.Tensor, w: torch.Tensor, c: int):
        self.task, self.D, self.w, self.c = task, D, w, c
        self.Dt = D.transpose(1, 2)
        if task == "classification":
            self.y = y.long()[..., None]
        else:
            self.y = y.reshape(D.shape[0], D.shape[1], c)

    def to(self, dtype: torch.dtype) -> "_LinearRows":
        """The same rows with the design and row weights in ``dtype``."""
        out = object.__new__(_LinearRows)
        out.task, out.c, out.y = self.task, self.c, self.y
        out.D, out.w = self.D.to(dtype), self.w.to(dtype)
        out.Dt = out.D.transpose(1, 2)
        return out

    def value_grad(self, Theta: torch.Tensor, with_probs: bool = False):
        """Loss, its gradient ``(F, q, c)`` and (classification) the softmax."""
        Z = torch.bmm(self.D, Theta)
        w = self.w[..., None]
        if self.task == "classification":
            lse = torch.logsumexp(Z, -1, keepdim=True)
            value = (w * (lse - Z.gather(-1, self.y))).sum()
            P = torch.exp(Z - lse)
            R = (w * P).scatter_add_(-1, self.y, -w)  # w (softmax - one-hot)
        else:
            resid = Z - self.y
            value = (w * resid.pow(2)).sum() / self.c
            R, P = (2.0 / self.c) * w * resid, None
        return value, torch.bmm(self.Dt, R), P

    def hvp(self, P: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        w = self.w[..., None]

        def product(V: torch.Tensor) -> torch.Tensor:  # (F, q, c)
            U = torch.bmm(self.D, V)
            if P is None:
                rows = (2.0 / self.c) * w * U
            else:
                PU = P * U
                rows = w * (PU - P * PU.sum(-1, keepdim=True))
            return torch.bmm(self.Dt, rows)

        return product

    def class_blocks(self, P: torch.Tensor | None) -> torch.Tensor:
        """``(F, c, q, q)``: the Hessian's diagonal blocks, one per output ``j``,
        ``sum_i w_i B_i[j, j] x_i x_i^T`` (the couplings between outputs left out)."""
        if P is None:
            s = (2.0 / self.c) * self.w[..., None].expand(-1, -1, self.c)
        else:
            s = self.w[..., None] * P * (1.0 - P)
        F, n, q = self.D.shape
        c = s.shape[-1]
        # One product per fold, every output at once (q x n times n x q c),
        # rather than one small product per (fold, output) pair.
        Ds = (self.D[..., None] * s[:, :, None, :]).reshape(F, n, q * c)
        return torch.bmm(self.Dt, Ds).reshape(F, q, q, c).permute(0, 3, 1, 2)

    def hessian(self, P: torch.Tensor | None) -> torch.Tensor:
        """``(F, q c, q c)``: ``sum_i w_i x_i x_i^T (x) B_i`` in ``Theta``'s row-major order,
        ``B_i = diag(p_i) - p_i p_i^T`` (softmax) or ``2 / c`` times the identity."""
        F, n, q = self.D.shape
        c = self.c
        eye = torch.eye(c, dtype=self.D.dtype, device=self.D.device)
        if P is None:  # squared loss: (D^T W D) (x) (2 / c) I
            gram = torch.bmm(self.Dt, self.w[..., None] * self.D)
            H = (2.0 / c) * gram[:, :, None, :, None] * eye[None, None, :, None, :]
            return H.reshape(F, q * c, q * c)
        # Two batched products instead of one einsum over (row, q, c, q, c):
        # sum_i w_i p_ic x_i x_i^T on the class diagonal, minus Kw^T K with
        # K_i = x_i (x) p_i and Kw_i = w_i K_i.
        Kw = (self.D[..., None] * (self.w[..., None] * P)[:, :, None, :]).reshape(F, n, q * c)
        KwT = Kw.transpose(1, 2)
        diag = torch.bmm(KwT, self.D).reshape(F, q, c, q)
        H = (diag[..., None] * eye[None, None, :, None, :]).reshape(F, q * c, q * c)
        K = (self.D[..., None] * P[:, :, None, :]).reshape(F, n, q * c)
        return H - torch.bmm(KwT, K)


class _LastPoint:
    """What a closed form computed at the last point it was asked for.

    Newton's line search evaluates the point its next iteration starts from,
    then asks for the Hessian there: the first pass's by-products (the
    softmax, the rows' state) are kept for that one point, keyed by exact
    equality of the tensors (``theta``, and ``h`` where it matters).
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.key, self.value = None, None

    def get(self, *key: torch.Tensor):
        """The value stored at ``key``, or ``None``."""
        if self.key is None or len(key) != len(self.key) or not all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.key, key)
        ):
            return None
        return self.value

    def put(self, value, *key: torch.Tensor):
        """Store ``value`` at (copies of) ``key``; returns ``value``."""
        self.key = tuple(k.detach().clone() for k in key)
        self.value = value
        return value


def _padded_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Folds' tensors (rows first) padded with zeros to one length and stacked:
    with zero row weights, padding rows add nothing to a loss."""
    n = max(t.shape[0] for t in tensors)
    return torch.stack([
        torch.cat([t, t.new_zeros((n - t.shape[0],) + tuple(t.shape[1:]))]) for t in tensors
    ])


def _stack_rows(task, parts, c) -> _LinearRows:
    """``parts``: per fold ``(design, y, weights)``; padded to one length with weight 0."""
    D = _padded_stack([D for D, _, _ in parts])
    y = _padded_stack([y.reshape(y.shape[0], -1) if task != "classification" else y
                       for _, y, _ in parts])
    w = _padded_stack([w for _, _, w in parts])
    return _LinearRows(task, D, y, w, c)


def _match_autograd(problem, theta, hs, scale, inner_value_grad, outer_value_grads) -> bool:
    """Whether the closed-form inner and outer losses and gradients equal
    autograd's through the problem's own losses at ``theta``, at each of ``hs``
    (the inner ones alone where ``outer_value_grads`` is ``None``)."""
    for h in hs:
        h = h.detach()
        with torch.enable_grad():
            th = theta.clone().requires_grad_(True)
            refs = [problem.inner_loss(th, h)]
            if outer_value_grads is not None:
                refs.append(problem.outer_loss(th, h))
            ref_grads = [torch.autograd.grad(a, th)[0] for a in refs]
        got = [inner_value_grad(theta, h)]
        if outer_value_grads is not None:
            got.append(outer_value_grads(theta, h)[:2])
        for a, ga, (b, gb) in zip(refs, ref_grads, got):
            if not (
                torch.allclose(a.detach(), b, rtol=scale, atol=scale)
                and torch.allclose(ga, gb, rtol=scale, atol=scale * (1 + ga.abs().max()))
            ):
                return False
    return True


def attach_linear_derivatives(
    problem: BilevelProblem,
    agg: Aggregator,
    ctx: AggregationContext,
    folds: list,
    penalty: Callable,
    hs: list[torch.Tensor],
    *,
    check: bool = True,
    low_precision: bool = False,
) -> str:
    """Give ``problem`` closed-form derivatives when ``agg`` is linear in its parameters.

    Parameters
    ----------
    problem : BilevelProblem
        ``F`` folds' parameters side by side (``F = 1`` for one problem),
        ``L = sum_k [sum_i w_ki loss_ki + penalty(theta_k, h)]`` and
        ``Q = sum_k sum_i v_ki loss_ki`` as :mod:`._bilevel` builds them.
    agg, ctx
    folds : list of (buffers, train, val)
        Per fold: its buffers and the ``(Z, X, y, w)`` of its training and
        validation rows, ``w`` the rows' weights in the losses (summing to 1
        per fold, or as the problem weighs them).
    penalty : callable
        ``(theta_k, h) -> scalar``, one fold's penalty on its flat parameters.
    hs : list of Tensor
        Hyperparameter vectors at which the closed form is checked against
        the problem's autograd losses (the start and the box's ends).
    check : bool, default=True
        ``False``: the closed form of this aggregation function was checked on
        another problem of the same fit (the folds'), so the values and
        gradients are not compared again; the structural checks still run.
    low_precision : bool, default=False
        Whether Newton's steps and the preconditioner may use float32 blocks
        (see ``LOW_PRECISION_BLOCKS``): for the tuning's fold problems, whose
        solves stop at HOAG's tolerances. A problem whose solution is the
        fitted model (the refit) keeps exact Newton steps, which converge far
        below the tolerance, so that equal problems give equal models.

    Returns
    -------
    str
        ``""`` when attached, else why not (the problem is left unchanged).
    """
    if not ANALYTIC:
        return "the closed-form derivatives are turned off (ANALYTIC = False)"
    if ctx.task == "classification":
        c = ctx.n_outputs
    else:
        c = 1
    rows = sum(part[0].shape[0] for _, train, val in folds for part in (train, val))
    first = agg.linear_design(folds[0][0], folds[0][1][0], folds[0][1][1])
    if first is None:
        return f"{type(agg).__name__} has no linear design here"
    if rows * first.shape[1] > DESIGN_MAX_ENTRIES:
        return f"the designs would hold more than DESIGN_MAX_ENTRIES = {DESIGN_MAX_ENTRIES} entries"
    train_parts, val_parts = [], []
    for buffers, train, val in folds:
        designs = []
        for Z, X, y, w in (train, val):
            D = agg.linear_design(buffers, Z, X)
            if D is None:
                return f"{type(agg).__name__} has no linear design here"
            designs.append((D, y, w))
        train_parts.append(designs[0])
        val_parts.append(designs[1])
    F = len(folds)
    q = train_parts[0][0].shape[1]
    p = q * c
    if problem.theta0.numel() != F * p:
        return f"{type(agg).__name__}'s linear design does not match its parameters"
    train = _stack_rows(ctx.task, train_parts, c)
    val = _stack_rows(ctx.task, val_parts, c)
    cache: dict = {}
    # The penalty Hessian's sparsity, shared by every h and by the problems of
    # one kind (the folds' and the refit's): a pattern that no longer fits is
    # caught by the check at every h and found again.
    key = (type(agg), p, tuple(hs[0].shape), problem.theta0.dtype)
    state: dict = {"key": key}
    if key in _PATTERNS:
        state["sparsity"] = _PATTERNS[key]

    def model(h: torch.Tensor) -> _PenaltyModel:
        # The penalty's quadratic is read off once per hyperparameter vector.
        key = cache.get("h")
        if key is None or key.shape != h.shape or not torch.equal(key, h):
            cache.update(h=h.detach().clone(),
                         model=_PenaltyModel(penalty, h.detach(), p, h, state))
        return cache["model"]

    def shaped(theta: torch.Tensor) -> torch.Tensor:
        return theta.reshape(F, q, c)

    # The softmax at the last point whose gradient was asked.
    last = _LastPoint()

    def probs(theta):
        P = last.get(theta)
        return P if P is not None else train.value_grad(shaped(theta))[2]

    def inner_value_grad(theta, h):
        data, g, P = train.value_grad(shaped(theta))
        last.put(P, theta)
        pen, gp = model(h).value_grad(theta.reshape(F, p))
        return (data + pen).detach(), (g.reshape(-1) + gp.reshape(-1)).detach()

    low = None
    if (low_precision and LOW_PRECISION_BLOCKS and ctx.task == "classification"
            and train.D.dtype == torch.float64):
        # Entries below float32's resolution, relative to the largest (the
        # design's) or to one (the probabilities, in lowered), are set to zero:
        # the blocks' products of four such factors would otherwise fall
        # below float32's smallest normal number, and subnormal arithmetic
        # is many times slower on CPUs. They count for less than the rounding.
        eps = torch.finfo(torch.float32).eps
        low = train.to(torch.float32)
        low.D = low.D.masked_fill(train.D.abs() < eps * train.D.abs().max(), 0.0)
        low.Dt = low.D.transpose(1, 2)

    def lowered(P):
        return P.masked_fill(P < torch.finfo(torch.float32).eps, 0.0).to(torch.float32)

    def data_class_blocks(theta):
        P = probs(theta)
        if low is None:
            return train.class_blocks(P)
        return low.class_blocks(lowered(P)).to(P.dtype)

    def newton_hessian(theta, h):
        P = probs(theta)
        H = low.hessian(lowered(P)).to(P.dtype)
        R = model(h).dense()
        if R is None:
            return inner_hessian(theta, h)
        H = H + R
        shift = LOW_PRECISION_SHIFT * H.diagonal(dim1=1, dim2=2).abs().amax(1)
        return H + shift[:, None, None] * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)

    def inner_hvp(theta, h):
        data = train.hvp(probs(theta))
        pen = model(h).hvp(theta.reshape(F, p))

        def product(v: torch.Tensor) -> torch.Tensor:
            return data(shaped(v)).reshape(-1) + pen(v.reshape(F, p)).reshape(-1)

        return product

    def inner_hessian(theta, h):
        H = train.hessian(probs(theta))
        R = model(h).dense()
        if R is None:  # the penalty's Hessian column by column
            pen = model(h).hvp(theta.reshape(F, p))
            eye = torch.eye(p, dtype=theta.dtype, device=theta.device)
            R_cols = torch.stack([pen(eye[j].expand(F, p)) for j in range(p)], 2)
            return H + R_cols
        return H + R

    def penalty_class_blocks(h) -> torch.Tensor | None:
        """``(c, q, q)``: the penalty Hessian's blocks of one output (cached per h)."""
        m = model(h)
        if cache.get("class_blocks_of") is not m:
            cache["class_blocks"] = m.class_blocks(q, c)
            cache["class_blocks_of"] = m
        return cache["class_blocks"]

    def inner_preconditioner(theta, h):
        # Block Jacobi: the exact Hessian's blocks of one fold and one output
        # (q x q each), where the models' correlated columns and the per-model
        # L2 weights make the conditioning; the couplings between outputs,
        # a rank-one correction per row, are what is left out. Formed once
        # per h, at the first theta asked (an outer evaluation's inner solve
        # starts at the last solution): its conjugate-gradient solve at the
        # new solution reuses it, as a preconditioner need not be exact.
        m = model(h)
        if cache.get("precond_of") is m:
            return cache["precond"]
        cache["precond_of"], cache["precond"] = m, None
        R = penalty_class_blocks(h)
        if R is None:
            return None
        chol, info = torch.linalg.cholesky_ex(data_class_blocks(theta) + R)
        if bool(info.any()):
            return None
        # Explicit inverses: one batched product per application rather than
        # a triangular solve per small block.
        inv = torch.cholesky_inverse(chol).reshape(F * c, q, q)

        def apply(v: torch.Tensor) -> torch.Tensor:
            V = shaped(v).transpose(1, 2).reshape(F * c, q, 1)
            return torch.bmm(inv, V).reshape(F, c, q).transpose(1, 2).reshape(-1)

        cache["precond"] = apply
        return apply

    def outer_value_grads(theta, h):
        value, g, _ = val.value_grad(shaped(theta))
        return value.detach(), g.reshape(-1).detach(), torch.zeros_like(h)

    batched_penalty = torch.func.vmap(penalty, in_dims=(0, None))
    polarized = [True]  # until the batched penalty fails once

    def mixed_product(theta, h, v):
        # Only the penalty depends on h: autograd on it alone, once per hypergradient.
        if polarized[0] and model(h).R is not None:
            # A quadratic in theta (its model at h says so): v . d pen / d theta
            # = (pen(theta + s v) - pen(theta - s v)) / (2 s) exactly, so
            # d/dh of it takes one first-order pass over the 2 F folds' penalties,
            # batched, instead of a second-order pass fold by fold. s brings s v
            # to theta's size, so that the difference loses no digits.
            t, vv = theta.detach().reshape(F, p), v.detach().reshape(F, p)
            v_norm = vv.norm()
            if v_norm == 0:
                return torch.zeros_like(h)
            s = (t.norm() / v_norm).clamp_min(torch.finfo(t.dtype).eps)
            sign = torch.cat([t.new_ones(F), -t.new_ones(F)])
            try:
                with torch.enable_grad():
                    hh = h.detach().requires_grad_(True)
                    values = batched_penalty(torch.cat([t + s * vv, t - s * vv]), hh)
                    (prod,) = torch.autograd.grad(
                        (values * sign).sum() / (2 * s), hh, allow_unused=True
                    )
                return torch.zeros_like(h) if prod is None else prod.detach()
            except RuntimeError as e:  # a penalty that does not batch
                if is_out_of_memory(e):
                    raise
                polarized[0] = False
        with torch.enable_grad():
            t = theta.detach().reshape(F, p).requires_grad_(True)
            hh = h.detach().requires_grad_(True)
            value = sum(penalty(t[k], hh) for k in range(F))
            (g,) = torch.autograd.grad(value, t, create_graph=True, allow_unused=True)
            if g is None or not g.requires_grad:
                return torch.zeros_like(h)
            (prod,) = vjp(g, hh, v.reshape(F, p), allow_unused=True)
        return torch.zeros_like(h) if prod is None else prod.detach()

    blocks_ok = max(train.D.shape[1], p) * p <= HESSIAN_MAX_ENTRIES
    # The closed form must be what the problem computes: values and gradients
    # at a random point, at each h checked; anything else leaves autograd.
    gen = torch.Generator(device="cpu").manual_seed(1)
    theta = torch.randn(F * p, generator=gen, dtype=torch.float64).to(problem.theta0)
    scale = 1e-8 if theta.dtype == torch.float64 else 1e-4
    if check and not _match_autograd(
        problem, theta, hs, scale, inner_value_grad, outer_value_grads
    ):
        return "the closed-form loss does not match the forward pass"
    problem.inner_value_grad = inner_value_grad
    problem.inner_hvp = inner_hvp
    problem.inner_hessian = inner_hessian if blocks_ok else None
    problem.newton_hessian = newton_hessian if blocks_ok and low is not None else None
    problem.outer_value_grads = outer_value_grads
    problem.mixed_product = mixed_product
    problem.inner_preconditioner = inner_preconditioner if PRECONDITION else None
    return ""


# -- learned convex weights ---------------------------------------------------------
#: Whether :mod:`._bilevel` gives ``LearnedWeights`` problems closed-form
#: derivatives (``False``: autograd throughout, for comparison).
WEIGHTS_ANALYTIC = True


class _MixtureRows:
    """One set of rows per fold for ``w = softmax(a)`` mixing the base outputs.

    ``Z`` is ``(F, n, m, K)`` (padding rows weighted 0). Classifiers' class
    scores are ``o = log(max(sum_m w_m Z_m, eps)) / T`` (``pool="linear"``)
    or ``o = sum_m w_m log(max(Z_m, eps)) / T`` (``pool="log"``) and the
    loss their cross-entropy; regressors' output is ``sum_m w_m Z_m`` and
    the loss its squared error averaged over the ``K`` targets. The loss is
    a function of the ``m`` weights through a contraction over rows and
    outputs, so its gradient and Hessian in ``w`` are a few einsums; the
    softmax's chain rule then gives them in ``a``. Every operation is a
    torch operation: the same code, under autograd in ``T``, gives the
    derivatives in the hyperparameters.
    """

    def __init__(self, task: str, pool: str, eps: float, Z, y, w):
        self.task, self.pool, self.eps = task, pool, eps
        F, n, m, K = Z.shape
        self.w = w  # (F, n)
        if task == "classification":
            self.y = y.long()[..., None]
            if pool == "log":
                Z = torch.log(Z.clamp_min(eps))
        else:
            self.y = y.reshape(F, n, K)
        # (F, n K, m): every contraction below is one batched matrix product
        # (einsum's planning costs more than the arithmetic at these sizes).
        self.D = Z.transpose(2, 3).reshape(F, n * K, m).contiguous()
        self.Dt = self.D.transpose(1, 2)
        self.shape = (F, n, K)

    def first(self, wts: torch.Tensor, T: torch.Tensor | None):
        """Loss and its gradient in the weights ``wts`` ``(F, m)``, and what
        :meth:`second` needs for the Hessian at the same point (Newton asks
        for the Hessian where its line search has just taken the gradient)."""
        F, n, K = self.shape
        mix = torch.bmm(self.D, wts[..., None]).reshape(F, n, K)
        w = self.w[..., None]
        if self.task != "classification":
            resid = mix - self.y
            value = (w * resid.pow(2)).sum() / K
            g = torch.bmm(self.Dt, ((2.0 / K) * w * resid).reshape(F, n * K, 1))[..., 0]
            return value, g, (w,)
        if self.pool == "linear":
            p = mix.clamp_min(self.eps)
            o = torch.log(p) / T
            # do_k / dw_m = Z_mk q_k: clamp_min passes the gradient where p >= eps.
            q = (mix >= self.eps) / (T * p)
        else:
            o = mix / T
            q = None
        # log_softmax, not o - logsumexp(o): one kernel where that takes several.
        ls = torch.log_softmax(o, -1)
        value = -(w * ls.gather(-1, self.y)).sum()
        s = ls.exp()
        r = s.scatter_add(-1, self.y, -torch.ones_like(w))  # s - e_y
        qq = 1.0 / T if q is None else q
        g = torch.bmm(self.Dt, (w * r * qq).reshape(F, n * K, 1))[..., 0]
        return value, g, (w, s, r, q, qq, T, o)

    def temperature_terms(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        """``d value / dT`` and ``d g / dT`` ``(F, m)`` from :meth:`first`'s
        ``state`` (classifiers): ``o`` is ``T``'s reciprocal times a function of
        the weights, so ``do/dT = -o / T``, and ``qq`` is ``1/T`` times one, so
        ``d qq / dT = -qq / T``."""
        F, n, K = self.shape
        w, s, r, _, qq, T, o = state
        u = -o / T
        su = (s * u).sum(-1, keepdim=True)
        dvalue = (w * r * u).sum()
        coef = w * qq * (s * (u - su) - r / T)
        return dvalue, torch.bmm(self.Dt, coef.reshape(F, n * K, 1))[..., 0]

    def second(self, state) -> torch.Tensor:
        """The Hessian ``(F, m, m)`` in the weights from :meth:`first`'s ``state``."""
        F, n, K = self.shape
        if self.task != "classification":
            (w,) = state
            coef = ((2.0 / K) * w).expand(F, n, K).reshape(F, n * K, 1)
            return torch.bmm(self.Dt, coef * self.D)
        w, s, r, q, qq, T, _ = state
        # sum_n w_n [A diag(s) A^T - (A s)(A s)^T] with A_mk = Z_mk q_k, plus,
        # for the linear pool, the logarithm's curvature -T A diag(r) A^T.
        d = s if q is None else s - T * r
        coef = (w * d * qq * qq).reshape(F, n * K, 1)
        As = torch.matmul((s * qq)[:, :, None, :], self.D.reshape(F, n, K, -1))[:, :, 0]
        return torch.bmm(self.Dt, coef * self.D) - torch.bmm(As.transpose(1, 2), w * As)


def _softmax_grad(wts, g):
    """``J g`` with ``J = diag(w) - w w^T``: the gradient in the logits ``a``
    from that in ``w = softmax(a)`` (elementwise; no ``(m, m)`` matrix)."""
    u = g * wts
    return u - wts * u.sum(1, keepdim=True)


def _logit_hessian(wts, g, H, wc, ent, l2):
    """The inner loss's Hessian in the logits ``a`` (``w = softmax(a)``), from
    the gradient ``g`` and Hessian ``H`` of the data loss in ``w``, ``wc = w *
    (log w - sum w log w)``, and the entropy and L2 weights.

    The softmax's chain rule gives ``J H J + diag(u - s w) - u w^T - w u^T +
    2 s w w^T`` with ``J = diag(w) - w w^T``, ``u = g * w``, ``s = g . w``; the
    entropy's Hessian is ``-diag(wc + w) + wc w^T + w wc^T + w w^T``. Their
    diagonal and rank-two terms are gathered into one ``diag + y w^T + w y^T
    + c w w^T``: at a few models the count of small tensor operations, not
    the arithmetic, is what a Newton iteration costs."""
    ww = wts[:, :, None] * wts[:, None, :]
    J = torch.diag_embed(wts) - ww
    u = g * wts
    s = u.sum(1, keepdim=True)
    y = ent * wc - u
    yw = y[:, :, None] * wts[:, None, :]
    diag = u - s * wts - ent * (wc + wts) + l2
    return J @ H @ J + (torch.diag_embed(diag) + yw + yw.transpose(1, 2)
                        + (2 * s + ent)[..., None] * ww)


def _entropy_terms(logw, wts):
    """Entropy ``-sum w log w`` of ``w = softmax(a)`` per fold and its gradient
    in ``a``, from ``logw = log_softmax(a)`` (its Hessian is in :func:`_logit_hessian`)."""
    wlogw = (wts * logw).sum(1, keepdim=True)
    return -wlogw[:, 0], -wts * (logw - wlogw)


def attach_weights_derivatives(
    problem: BilevelProblem,
    agg: Aggregator,
    ctx: AggregationContext,
    folds: list,
    hyper_of: Callable,
    hs: list[torch.Tensor],
) -> str:
    """Give a ``LearnedWeights`` problem closed-form derivatives in its logits.

    Parameters as :func:`attach_linear_derivatives`, with ``hyper_of(h)``
    the hyperparameter values at ``h`` (``HyperSpace.values``). The
    derivatives in the logits (gradient, Hessian blocks, Hessian-vector
    products) are closed forms (:class:`_MixtureRows`); those in ``h`` (one
    per hypergradient) are autograd through the same torch expressions,
    whose graph has only the hyperparameters as leaves. Checked against the
    problem's autograd losses at each ``h`` of ``hs``; anything else leaves
    the problem unchanged.

    Returns
    -------
    str
        ``""`` when attached, else why not.
    """
    from .weights import LearnedWeights

    if not WEIGHTS_ANALYTIC:
        return "the closed-form derivatives of LearnedWeights are turned off"
    if (not isinstance(agg, LearnedWeights) or type(agg).forward is not LearnedWeights.forward
            or type(agg).penalty is not LearnedWeights.penalty
            or type(agg).init_params is not LearnedWeights.init_params):
        return f"{type(agg).__name__} is not LearnedWeights"
    if agg.per != "global":
        return "closed-form derivatives cover per='global' only"
    F, m = len(folds), ctx.n_models
    if problem.theta0.numel() != F * m:
        return "the parameters are not one logit per model and fold"
    classify = ctx.task == "classification"

    def stacked(which: int) -> _MixtureRows:
        parts = [f[which] for f in folds]  # (Z, X, y, w) each
        Z, y, w = (_padded_stack([part[k] for part in parts]) for k in (0, 2, 3))
        return _MixtureRows(ctx.task, agg.pool, agg.eps, Z, y, w)

    train, val = stacked(1), stacked(2)

    def unpack(h):
        hyper = hyper_of(h)
        T = hyper["temperature"].reshape(()) if classify else None
        return T, hyper["l2"].reshape(()), hyper["entropy"].reshape(())

    # The values at the last h: the inner solver asks at one h many times.
    unpacked: list = [None, None]

    def unpack_detached(h):
        if unpacked[0] is None or unpacked[0].shape != h.shape or not torch.equal(unpacked[0], h):
            with torch.no_grad():
                unpacked[:] = h.detach().clone(), unpack(h.detach())
        return unpacked[1]

    def chain_to_h(h, coefs):
        """``sum_i coefs[i] * d value_i / dh`` over (temperature, l2, entropy):
        the derivatives in the values are closed forms, and only the map from
        ``h`` to the values (an ``exp`` per tuned entry) goes through autograd."""
        with torch.enable_grad():
            hh = h.detach().requires_grad_(True)
            total = None
            for value, coef in zip(unpack(hh), coefs):
                if value is not None and coef is not None and value.requires_grad:
                    term = value * coef
                    total = term if total is None else total + term
            if total is None:  # nothing tuned that the quantity depends on
                return torch.zeros_like(h)
            (d,) = torch.autograd.grad(total, hh)
        return d

    def inner_first(theta, h):
        """Inner loss and gradient in the logits, and what :func:`inner_second`
        needs for the Hessian at the same point."""
        T, l2, ent = unpack_detached(h)
        a = theta.reshape(F, m)
        logw = torch.log_softmax(a, 1)
        wts = logw.exp()
        value, gw, state = train.first(wts, T)
        ev, eg = _entropy_terms(logw, wts)
        value = value + 0.5 * l2 * a.pow(2).sum() + ent * ev.sum()
        g = _softmax_grad(wts, gw) + l2 * a + ent * eg
        return value, g, (wts, gw, state, -eg, l2, ent)

    def inner_second(first_state):
        wts, gw, state, wc, l2, ent = first_state
        return _logit_hessian(wts, gw, train.second(state), wc, ent, l2)

    # ((value, gradient), first_state) at the last (theta, h).
    last = _LastPoint()

    @torch.no_grad()
    def first_pass(theta, h):
        got = last.get(theta, h)
        if got is None:
            value, g, first_state = inner_first(theta, h)
            got = last.put(((value, g.reshape(-1)), first_state), theta, h)
        return got

    def inner_value_grad(theta, h):
        return first_pass(theta, h)[0]

    @torch.no_grad()
    def inner_hessian(theta, h):
        H = inner_second(first_pass(theta, h)[1])
        return 0.5 * (H + H.transpose(1, 2))

    def inner_hvp(theta, h):
        H = inner_hessian(theta, h)

        def product(v: torch.Tensor) -> torch.Tensor:
            return torch.bmm(H, v.reshape(F, m, 1)).reshape(-1)

        return product

    @torch.no_grad()
    def outer_value_grads(theta, h):
        T, _, _ = unpack_detached(h)
        wts = torch.softmax(theta.detach().reshape(F, m), 1)
        value, g, state = val.first(wts, T)
        ga = _softmax_grad(wts, g)
        dh = chain_to_h(h, (val.temperature_terms(state)[0], None, None)) if classify \
            else torch.zeros_like(h)
        return value, ga.reshape(-1), dh

    @torch.no_grad()
    def mixed_product(theta, h, v):
        """``d/dh (g . v)`` with ``g`` the inner gradient in the logits: in
        the temperature through :meth:`_MixtureRows.temperature_terms` (the
        softmax's Jacobian is symmetric, so ``(J dg_w/dT) . v = dg_w/dT . J v``),
        in ``l2`` and the entropy weight their own terms' gradients."""
        a = theta.detach().reshape(F, m)
        vv = v.reshape(F, m)
        # At the inner solution its last pass is kept.
        wts, _, state, wc, _, _ = first_pass(theta, h)[1]
        c_T = None
        if classify:
            c_T = (train.temperature_terms(state)[1] * _softmax_grad(wts, vv)).sum()
        eg = -wc
        return chain_to_h(h, (c_T, (a * vv).sum(), (eg * vv).sum()))

    gen = torch.Generator(device="cpu").manual_seed(1)
    theta = torch.randn(F * m, generator=gen, dtype=torch.float64).to(problem.theta0)
    scale = 1e-8 if theta.dtype == torch.float64 else 1e-4
    # LearnedWeights itself is checked by the tests (tests/test_weights_analytic.py);
    # a subclass (its _weights or _mix redefined, say) against its own losses
    # here (the check is a vmapped autograd pass, dear next to a small fit).
    if type(agg) is not LearnedWeights and not _match_autograd(
        problem, theta, hs, scale, inner_value_grad, outer_value_grads
    ):
        return "the closed-form loss does not match the forward pass"
    problem.inner_value_grad = inner_value_grad
    problem.inner_hvp = inner_hvp
    problem.inner_hessian = inner_hessian
    problem.outer_value_grads = outer_value_grads
    problem.mixed_product = mixed_product
    return ""
