"""Closed-form inner derivatives of the 2-additive Choquet integral (``k <= 2``).

For ``k <= 2`` :class:`~aggregators.choquet.Choquet`'s integral of a row is
``C = f . mu`` with ``f = [x, pairwise minima of x]`` (fixed by the data)
and ``mu = Phi(u)`` the Möbius masses of the free parameters ``u = (a, q)``
(:func:`~aggregators._capacity.two_additive_masses`). The output map then
reads ``C`` and a few parameters ``t`` of its own (thresholds, or a
regression's scale and offset), one output at a time. So the training loss
is a function of the ``P = m + m (m - 1) / 2`` masses and ``t`` through the
rows, and of ``u`` through a small map:

* in ``(mu, t)``: the loss's derivatives in each row's integrals and output
  parameters (a ``c x c`` matrix per row) contracted with the features: the
  gradient is one matrix product, the Hessian blocks two batched ones;
* in ``u``: the chain rule through ``mu = N(u) / sum(N(u))`` with ``N``
  elementwise-simple (``N_i = exp(a_i) + sum_j tau softplus(-q_ij / tau)``,
  ``N_ij = q_ij``): ``H_u = J^T H_mu J + (rank two) + (diagonal)``, ``J`` the
  ``P x P`` Jacobian, with no pass over the rows.

Autograd computes the same numbers, but forms the Hessian blocks with one
backward pass over the rows per parameter (``P`` of them, batched): most of a
Choquet fit's time at thousands of rows. The interaction penalty (a quadratic
in the pair masses) enters at the ``mu`` level, the L2 penalty at the ``u``
level.

:func:`attach_choquet_derivatives` gives a :class:`BilevelProblem` built by
:mod:`._bilevel` the inner problem's value, gradient, Hessian blocks and the
mixed product in the hyperparameters (autograd through the closed-form
gradient, whose graph has only the hyperparameters as leaves), after checking
the value and gradient against the problem's own autograd loss. No
Hessian-vector products: one costs what the blocks cost (a pass over the
rows), and without them the hypergradient's linear solve is the exact one
autograd's blocks get, so a fit tunes to the same numbers. The validation loss
(charged for unseen errors on classifiers) stays with autograd: one backward
pass per outer evaluation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ._analytic import _LastPoint, _match_autograd, _padded_stack
from ._base import AggregationContext, Aggregator
from ._capacity import n_capacities, pair_index
from .choquet import Choquet, _pairwise_min
from ._outputs import RHO_OFFSET, RHO_SCALE, RHO_THRESHOLD, class_inputs
from .hypergrad import BilevelProblem

__all__ = ["CHOQUET_ANALYTIC", "MAX_FEATURE_ENTRIES", "attach_choquet_derivatives", "mass_chain"]

#: Whether :mod:`._bilevel` gives 2-additive Choquet problems closed-form
#: inner derivatives (``False``: autograd throughout, for comparison).
CHOQUET_ANALYTIC = True

#: Largest number of parameters per fold given closed-form Hessian blocks:
#: the engine's own bound on closed-form Newton blocks; above it the inner
#: solve is L-BFGS and the Hessian is not formed.
MAX_BLOCK = 256


#: Largest number of feature entries (all folds' training rows x integrals x
#: masses) copied for the closed form; the Hessian's temporaries take as much
#: again. Above it autograd runs on the aggregator's own feature cache.
MAX_FEATURE_ENTRIES = 2**26


# -- the masses map ------------------------------------------------------------------
class _MassChain:
    """``mu = Phi(u)`` at one point, and the chain rule from ``mu`` to ``u``.

    Batched over a leading axis ``B`` (folds x capacities); ``u = (a, q)``
    per batch entry, ``a`` ``(B, m)`` and ``q`` ``(B, M)`` (``None`` for
    ``k = 1``). Every quantity is scaled by ``exp(-max a)`` as
    :func:`~aggregators._capacity.two_additive_masses` scales it: ``mu`` is
    invariant to the scale, and the derivatives below are consistent with it.
    """

    def __init__(self, a: torch.Tensor, q: torch.Tensor | None, m: int):
        shift = a.amax(-1, keepdim=True)
        s = torch.exp(a - shift)
        self.m, self.pairs = m, q is not None and m >= 2
        B = a.shape[0]
        if not self.pairs:
            N = s
            self.K = torch.diag_embed(s)  # dN/du
            self.N2 = s  # d2 N_i / da_i^2, the only second derivatives
        else:
            M = q.shape[1]
            tau = 1.0 / (m - 1)
            e = torch.exp(-shift)
            sig = torch.sigmoid(-q / tau)  # -d/dq of tau softplus(-q / tau)
            sp = tau * F.softplus(-q / tau) * e
            rows, cols = pair_index(m, a.device)
            N = torch.cat([s.index_add(1, rows, sp).index_add(1, cols, sp), q * e], -1)
            P = m + M
            K = a.new_zeros(B, P, P)
            idx = torch.arange(m, device=a.device)
            pidx = torch.arange(M, device=a.device)
            K[:, idx, idx] = s
            K[:, rows, m + pidx] = -sig * e
            K[:, cols, m + pidx] = -sig * e
            K[:, m + pidx, m + pidx] = e.expand(B, M)
            self.K = K
            self.rows, self.cols = rows, cols
            self.curv = e * sig * (1.0 - sig) / tau  # d2 N_i / dq_ij^2 (i in the pair)
            self.N2 = s
        self.Z = N.sum(-1, keepdim=True)
        self.mu = N / self.Z

    def grad(self, g_mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dN, du)``: the gradient in ``N`` and in ``u`` from that in ``mu`` ``(B, P)``."""
        gN = (g_mu - (g_mu * self.mu).sum(-1, keepdim=True)) / self.Z
        return gN, torch.bmm(gN[:, None, :], self.K)[:, 0]

    def jacobian(self) -> torch.Tensor:
        """``d mu / du`` ``(B, P, P)``: ``(I - mu 1^T) K / Z``."""
        colsum = self.K.sum(1, keepdim=True)  # 1^T K
        return (self.K - self.mu[:, :, None] * colsum) / self.Z[:, :, None]

    def curvature(self, g_mu: torch.Tensor, gN: torch.Tensor) -> torch.Tensor:
        """``sum_p g_mu[p] d2 mu_p / du2`` ``(B, P, P)``.

        In ``N``: ``(2 (g . mu) 1 1^T - g 1^T - 1 g^T) / Z^2`` (rank two),
        carried to ``u`` by ``K``; plus ``sum_i gN_i d2 N_i / du2``, diagonal
        (each ``N_i`` is a sum of functions of one parameter each).
        """
        k1 = self.K.sum(1)  # K^T 1
        kg = torch.bmm(g_mu[:, None, :], self.K)[:, 0]  # K^T g
        gm = (g_mu * self.mu).sum(-1, keepdim=True)
        Z2 = (self.Z * self.Z)[:, :, None]
        out = (2.0 * gm[:, :, None] * k1[:, :, None] * k1[:, None, :]
               - kg[:, :, None] * k1[:, None, :] - k1[:, :, None] * kg[:, None, :]) / Z2
        m = self.m
        diag = gN[:, :m] * self.N2
        if self.pairs:
            diag = torch.cat([diag, (gN[:, self.rows] + gN[:, self.cols]) * self.curv], -1)
        return out + torch.diag_embed(diag)


def mass_chain(a: torch.Tensor, q: torch.Tensor | None, m: int) -> _MassChain:
    """The masses of :func:`~aggregators._capacity.two_additive_masses` with their
    Jacobian and curvature in the free parameters (see :class:`_MassChain`)."""
    return _MassChain(a, q, m)


# -- the rows ---------------------------------------------------------------------
class _Rows:
    """The rows of ``F`` folds: features ``(F, n, c, P)``, labels, row weights ``(F, n)``.

    ``c`` is the number of integrals per row (1 for a binary classifier's
    positive class, else one per class or target); padding rows have weight 0.
    """

    def __init__(self, task: str, binary: bool, parts: list, pairs: bool, K: int):
        feats, ys, ws = [], [], []
        for Z, y, w in parts:
            x = class_inputs(Z, binary) if task == "classification" else Z.transpose(1, 2)
            feats.append(torch.cat([x, _pairwise_min(x)], -1) if pairs else x)
            ys.append(y if task == "classification" else y.reshape(y.shape[0], K))
            ws.append(w)
        self.task, self.binary = task, binary
        self.f = _padded_stack(feats)
        self.y = _padded_stack(ys)
        self.w = _padded_stack(ws)
        if task == "classification":
            self.y = self.y.long()
        Fo, n, c, P = self.f.shape
        self.flat = self.f.reshape(Fo, n * c, P)

    def integrals(self, mu: torch.Tensor) -> torch.Tensor:
        """``C (F, n, c)`` from the masses ``(F, cap, P)``."""
        if mu.shape[1] == 1:
            return torch.bmm(self.flat, mu[:, 0, :, None]).reshape(self.f.shape[:3])
        return torch.einsum("fncp,fcp->fnc", self.f, mu)


def _classification_terms(rows: _Rows, C, b, T):
    """Loss and its gradients in the integrals ``C`` and the thresholds ``b``,
    row weights applied, and what :func:`_classification_curvature` needs.

    ``s = (C - 1/2) / T - RHO_THRESHOLD b``; log-scores ``[0, s]`` (binary) or
    ``log sigmoid(s)``; cross-entropy. Returns ``value, gC (F, n, c), gt (F, c),
    state``.
    """
    gamma, rho = 1.0 / T, RHO_THRESHOLD
    s = gamma * (C - 0.5) - rho * b[:, None, :]
    w = rows.w[..., None]
    if rows.binary:
        yy = rows.y.to(s.dtype)[..., None]
        value = (w * (F.softplus(s) - yy * s)).sum()
        sg = torch.sigmoid(s)
        r = w * (sg - yy)
        state = (sg, None, None)
    else:
        ls = torch.log_softmax(F.logsigmoid(s), -1)
        y = rows.y[..., None]
        value = -(rows.w * ls.gather(-1, y)[..., 0]).sum()
        pi = ls.exp()
        res = pi.scatter_add(-1, y, -torch.ones_like(pi[..., :1]))  # pi - e_y
        D = torch.sigmoid(-s)  # d out / ds
        r = w * res * D
        state = (pi, res, D)
    return value, gamma * r, -rho * r.sum(1), state


def _classification_curvature(rows: _Rows, T, state):
    """Second derivatives in ``(C, b)``: the ``c x c`` matrix of each row in
    ``C`` as ``diag(dC) - uC uC^T`` (``uC`` ``None`` for one integral), and
    ``XCt (F, n, c, c)``, ``Htt (F, c, c)``.

    Multiclass: ``d2 l / ds2 = D (diag(pi) - pi pi^T) D + diag((pi - e_y) d2
    out / ds2)`` with ``D = sigmoid(-s)`` the derivative of ``log sigmoid``.
    """
    gamma, rho = 1.0 / T, RHO_THRESHOLD
    w = rows.w[..., None]
    if rows.binary:
        sg = state[0]
        d = w * sg * (1.0 - sg)
        Bs, u = d[..., None], None
    else:
        pi, res, D = state
        dpi = D * pi
        d = w * (D * dpi - res * D * (1.0 - D))
        u = torch.sqrt(w) * dpi
        Bs = torch.diag_embed(d) - u[..., :, None] * u[..., None, :]
    return (gamma * gamma * d, None if u is None else gamma * u,
            -gamma * rho * Bs, rho * rho * Bs.sum(1))


def _regression_terms(rows: _Rows, C, log_scale, offset, lo, span):
    """The same for the regression map ``lo + E (C - lo) + RHO_OFFSET span off``,
    ``E = exp(RHO_SCALE log_scale)``; squared error averaged over the ``K``
    targets; ``t = (log_scale (K), offset (K))``."""
    K = C.shape[-1]
    E = torch.exp(RHO_SCALE * log_scale)[:, None, :]  # (F, 1, K)
    lo_, span_ = lo[:, None, :], span[:, None, :]
    dev = C - lo_
    out = lo_ + E * dev + RHO_OFFSET * span_ * offset[:, None, :]
    w = rows.w[..., None]
    resid = out - rows.y
    value = (w * resid.pow(2)).sum() / K
    r = (2.0 / K) * w * resid  # dl/d out
    v = RHO_SCALE * E * dev  # d out / d log_scale
    o = (RHO_OFFSET * span_).expand_as(v)  # d out / d offset
    gt = torch.cat([(r * v).sum(1), (r * o).sum(1)], -1)
    return value, r * E, gt, (E, r, v, o)


def _regression_curvature(rows: _Rows, state):
    """Second derivatives in ``(C, t)`` of :func:`_regression_terms`: ``dC``
    (diagonal in ``C``), ``XCt (F, n, K, 2K)``, ``Htt (F, 2K, 2K)``."""
    E, r, v, o = state
    K = r.shape[-1]
    c2 = (2.0 / K) * rows.w[..., None]
    XCt = torch.cat([torch.diag_embed(c2 * E * v + r * RHO_SCALE * E),
                     torch.diag_embed(c2 * E * o)], -1)
    h_ss = (c2 * v * v + r * RHO_SCALE * v).sum(1)
    h_so = (c2 * v * o).sum(1)
    h_oo = (c2 * o * o).sum(1)
    Htt = torch.cat([torch.cat([torch.diag_embed(h_ss), torch.diag_embed(h_so)], -1),
                     torch.cat([torch.diag_embed(h_so), torch.diag_embed(h_oo)], -1)], -2)
    return c2 * E * E, None, XCt, Htt


def _mu_gradient(rows: _Rows, cap: int, gC) -> torch.Tensor:
    """The data loss's gradient in the masses, ``(F, cap, P)``."""
    Fo, n, c, P = rows.f.shape
    if cap == 1:
        return torch.bmm(gC.reshape(Fo, 1, n * c), rows.flat)
    return torch.einsum("fncp,fnc->fcp", rows.f, gC)


def _mu_hessian(rows: _Rows, cap: int, dC, uC, XCt):
    """The data loss's Hessian blocks in the masses ``(F, cap P, cap P)`` and
    across masses and output parameters ``(F, cap P, n_t)``, from each row's
    ``diag(dC) - uC uC^T`` in its integrals: a product of the features with
    themselves weighted by ``dC``, less ``G^T G`` with ``G_n = [uC_nc f_nc]``
    (summed over the integrals when they share one capacity)."""
    f = rows.f
    Fo, n, c, P = f.shape
    if cap == 1:
        H = torch.bmm(rows.flat.transpose(1, 2), dC.reshape(Fo, n * c, 1) * rows.flat)
        if uC is not None:
            G = (uC[..., None] * f).sum(2)  # (F, n, P)
            H = H - torch.bmm(G.transpose(1, 2), G)
        Ht = torch.bmm(rows.flat.transpose(1, 2), XCt.reshape(Fo, n * c, -1))
        return H, Ht
    fT = f.permute(0, 2, 3, 1).reshape(Fo * c, P, n)
    diag = torch.bmm(fT, (dC.permute(0, 2, 1).reshape(Fo * c, n, 1)
                          * fT.transpose(1, 2))).reshape(Fo, c, P, P)
    idx = torch.arange(c, device=f.device)
    H = f.new_zeros(Fo, c, P, c, P)
    H[:, idx, :, idx, :] = diag.permute(1, 0, 2, 3)
    H = H.reshape(Fo, c * P, c * P)
    if uC is not None:
        G = (uC[..., None] * f).reshape(Fo, n, c * P)
        H = H - torch.bmm(G.transpose(1, 2), G)
    Ht = torch.einsum("fncp,fnct->fcpt", f, XCt)
    return H, Ht.reshape(Fo, c * P, -1)


def attach_choquet_derivatives(
    problem: BilevelProblem,
    agg: Aggregator,
    ctx: AggregationContext,
    folds: list,
    hyper_of: Callable,
    hs: list[torch.Tensor],
    *,
    check: bool = True,
) -> str:
    """Give a 2-additive ``Choquet`` problem closed-form inner derivatives.

    Parameters
    ----------
    problem : BilevelProblem
        ``F`` folds' parameters side by side, as :mod:`._bilevel` builds it.
    agg, ctx
    folds : list of (buffers, train, val)
        Per fold: its buffers and the ``(Z, X, y, w)`` of its training and
        validation rows, ``w`` the rows' weights in the losses.
    hyper_of : callable
        ``h -> hyperparameter values`` (``HyperSpace.values``).
    hs : list of Tensor
        Where the value and gradient are checked against the problem's
        autograd inner loss.
    check : bool, default=True
        ``False``: checked on another problem of the same fit.

    Returns
    -------
    str
        ``""`` when attached, else why not (the problem is left unchanged).
    """
    if not CHOQUET_ANALYTIC:
        return "the closed-form derivatives of Choquet are turned off"
    if (not isinstance(agg, Choquet)
            or any(getattr(type(agg), k) is not getattr(Choquet, k)
                   for k in ("forward", "penalty", "init_params", "_integral", "_masses"))):
        return f"{type(agg).__name__} is not Choquet"
    m = ctx.n_models
    if agg._uses_lattice(m) or agg._k(m) > 2:
        return "closed-form derivatives cover k <= 2 only"
    classify = ctx.task == "classification"
    binary = classify and ctx.n_outputs == 2
    cap = n_capacities(agg.share, ctx)
    pairs = agg._k(m) == 2 and m >= 2
    M = m * (m - 1) // 2 if pairs else 0
    P = m + M
    K = ctx.n_outputs
    n_t = (1 if binary else K) if classify else 2 * K
    p = cap * P + n_t
    Fo = len(folds)
    if problem.theta0.numel() != Fo * p:
        return "the parameters are not Choquet's k <= 2 layout"
    if p > MAX_BLOCK:
        return f"a fold has {p} parameters, more than MAX_BLOCK = {MAX_BLOCK}"
    rows = sum(int(f[1][0].shape[0]) for f in folds)
    if rows * (1 if binary else K) * P > MAX_FEATURE_ENTRIES:
        return f"the features would hold more than MAX_FEATURE_ENTRIES = {MAX_FEATURE_ENTRIES}"
    train = _Rows(ctx.task, binary, [(f[1][0], f[1][2], f[1][3]) for f in folds], pairs, K)
    if not classify:
        lo = torch.stack([f[0]["x_low"] for f in folds])
        span = torch.stack([f[0]["x_span"] for f in folds])
    dev = problem.theta0.device
    # Packer order: singleton_raw (cap, m), pair_raw (cap, M), then the map's
    # parameters; ``order`` lists it capacity by capacity, [a_k, q_k], then t.
    a_pos = torch.arange(cap * m, device=dev).reshape(cap, m)
    q_pos = cap * m + torch.arange(cap * M, device=dev).reshape(cap, M)
    order = torch.cat([torch.cat([a_pos, q_pos], 1).reshape(-1),
                       cap * P + torch.arange(n_t, device=dev)])
    pos = torch.empty_like(order)
    pos[order] = torch.arange(p, device=dev)

    def unpack(h):
        hyper = hyper_of(h)
        T = hyper["temperature"].reshape(()) if classify else None
        inter = hyper["interaction"].reshape(()) if "interaction" in hyper else None
        return T, inter, hyper["l2"].reshape(())

    def first(theta, h):
        """Inner loss and gradient (packer order), and what :func:`second` needs
        for the Hessian at the same point."""
        T, inter, l2 = unpack(h)
        th = theta.reshape(Fo, p)[:, order]  # (F, p) in capacity order
        u = th[:, : cap * P].reshape(Fo * cap, P)
        t = th[:, cap * P :]
        chain = _MassChain(u[:, :m], u[:, m:] if pairs else None, m)
        mu = chain.mu.reshape(Fo, cap, P)
        C = train.integrals(mu)
        if classify:
            value, gC, gt, rows_state = _classification_terms(train, C, t, T)
        else:
            value, gC, gt, rows_state = _regression_terms(train, C, t[:, :K], t[:, K:], lo, span)
        g_mu = _mu_gradient(train, cap, gC).reshape(Fo * cap, P)
        pen = 0.5 * l2 * u.pow(2).sum()
        if inter is not None and pairs:
            wi = inter * M / cap
            pm = mu[..., m:]
            pen = pen + wi * pm.pow(2).sum()
            g_mu = g_mu + torch.cat([torch.zeros_like(g_mu[:, :m]),
                                     2.0 * wi * pm.reshape(Fo * cap, M)], -1)
        gN, g_u = chain.grad(g_mu)
        g_t = gt
        if not classify:  # the L2 pulls the log of the regression scale
            ls = t[:, :K]
            pen = pen + 0.5 * l2 * (RHO_SCALE * ls).pow(2).sum()
            g_t = g_t + torch.cat([l2 * RHO_SCALE ** 2 * ls, torch.zeros_like(ls)], -1)
        g = torch.cat([(g_u + l2 * u).reshape(Fo, cap * P), g_t], -1)
        value = value + pen
        return value, g[:, pos].reshape(-1), (chain, g_mu, gN, rows_state, T, inter, l2)

    eye_pairs = None
    if pairs:
        eye_pairs = torch.cat([problem.theta0.new_zeros(m), problem.theta0.new_ones(M)])

    def second(state) -> torch.Tensor:
        chain, g_mu, gN, rows_state, T, inter, l2 = state
        if classify:
            dC, uC, XCt, Htt = _classification_curvature(train, T, rows_state)
        else:
            dC, uC, XCt, Htt = _regression_curvature(train, rows_state)
        H_mu, H_mt = _mu_hessian(train, cap, dC, uC, XCt)
        if inter is not None and pairs:  # the interaction penalty's curvature in mu
            d = (2.0 * inter * M / cap) * eye_pairs.repeat(cap)
            H_mu = H_mu + torch.diag_embed(d.expand(Fo, cap * P))
        J = chain.jacobian().reshape(Fo, cap, P, P)
        S = chain.curvature(g_mu, gN).reshape(Fo, cap, P, P)
        # J^T H J block by block over the capacities: (F, cap, P, cap, P).
        Hb = H_mu.reshape(Fo, cap, P, cap, P)
        Hb = torch.einsum("fkpa,fkplq,flqb->fkalb", J, Hb, J) if cap > 1 else (
            (J[:, 0].transpose(1, 2) @ Hb[:, 0, :, 0, :] @ J[:, 0])[:, None, :, None, :])
        Hb = Hb.clone()
        idx = torch.arange(cap, device=dev)
        Hb[:, idx, :, idx, :] += S.permute(1, 0, 2, 3)
        H_uu = Hb.reshape(Fo, cap * P, cap * P)
        H_ut = torch.einsum("fkpa,fkpt->fkat", J, H_mt.reshape(Fo, cap, P, -1)).reshape(
            Fo, cap * P, -1)
        H_uu = H_uu + l2 * torch.eye(cap * P, dtype=H_uu.dtype, device=dev)
        if not classify:
            Htt = Htt + torch.diag_embed(torch.cat([
                (l2 * RHO_SCALE ** 2).expand(K), torch.zeros_like(Htt[0, 0, :K])]))
        H = torch.cat([torch.cat([H_uu, H_ut], -1),
                       torch.cat([H_ut.transpose(1, 2), Htt], -1)], -2)
        H = H[:, pos][:, :, pos]
        return 0.5 * (H + H.transpose(1, 2))

    # ((value, gradient), state) at the last (theta, h).
    last = _LastPoint()

    @torch.no_grad()
    def first_pass(theta, h):
        got = last.get(theta, h)
        if got is None:
            value, g, state = first(theta, h)
            got = last.put(((value, g), state), theta, h)
        return got

    def inner_value_grad(theta, h):
        return first_pass(theta, h)[0]

    @torch.no_grad()
    def inner_hessian(theta, h):
        return second(first_pass(theta, h)[1])

    def mixed_product(theta, h, v):
        with torch.enable_grad():
            hh = h.detach().requires_grad_(True)
            _, g, _ = first(theta.detach(), hh)
            gv = (g * v.reshape(-1)).sum()
            if not gv.requires_grad:  # nothing tuned
                return torch.zeros_like(h)
            (prod,) = torch.autograd.grad(gv, hh, allow_unused=True)
        return torch.zeros_like(h) if prod is None else prod.detach()

    if check:
        gen = torch.Generator(device="cpu").manual_seed(1)
        theta = 0.5 * torch.randn(Fo * p, generator=gen, dtype=torch.float64).to(
            problem.theta0)
        scale = 1e-8 if theta.dtype == torch.float64 else 1e-4
        # The validation loss stays with autograd: only the inner one is compared.
        if not _match_autograd(problem, theta, hs, scale, inner_value_grad, None):
            return "the closed-form loss does not match the forward pass"
        last.clear()
    problem.inner_value_grad = inner_value_grad
    problem.inner_hessian = inner_hessian
    problem.mixed_product = mixed_product
    return ""
