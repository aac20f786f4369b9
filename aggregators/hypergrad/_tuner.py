"""The outer loop: hypergradient descent on a (cross-fitted) validation loss."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import minimize

from ._forward import forward_hypergradient
from ._greedy import darts_hypergradient, greedy_hypergradient
from ._hoag import SCHEDULE_OPTIONS, hoag_hypergradient, hoag_tolerance
from ._implicit import implicit_hypergradient
from ._inner import solve_inner
from ._newton import decide_exact_hessian
from ._problem import BilevelProblem, HessianDecision, HypergradResult, InnerDivergenceError
from ._unrolled import drmad_hypergradient, reverse_hypergradient

__all__ = ["METHODS", "TuningResult", "hypergradient", "tune"]

#: Hypergradient methods by name, and whether each needs an inner optimum.
#: Those that do get the (warm-started) inner solution as ``theta``; the
#: others (unrolled from ``theta0``) pay for their own inner steps.
METHODS: dict[str, bool] = {
    "implicit-cg": True,
    "implicit-neumann": True,
    "hoag": True,
    "truncated-reverse": True,
    "reverse": False,
    "forward": False,
    "drmad": False,
    "t1-t2": True,
    "darts-fd": True,
}


def hypergradient(
    problem: BilevelProblem,
    theta: torch.Tensor,
    h: torch.Tensor,
    method: str = "implicit-cg",
    **options,
) -> HypergradResult:
    """Compute ``dQ/dh`` with the named method.

    ======================  =====================================================
    ``"implicit-cg"``       implicit function theorem, ``H v = d_theta Q`` by
                            conjugate gradient (:func:`implicit_hypergradient`)
    ``"implicit-neumann"``  implicit, ``H^{-1}`` by a truncated Neumann series
                            (Lorraine et al. 2020)
    ``"hoag"``              implicit, conjugate gradient to a tolerance that
                            decreases with the outer step (Pedregosa 2016;
                            :func:`hoag_hypergradient`)
    ``"truncated-reverse"`` reverse mode through the last K steps from
                            ``theta`` (Shaban et al. 2019); ``n_steps=20``
    ``"reverse"``           reverse mode through ``n_steps`` unrolled steps from
                            ``theta`` (Maclaurin et al. 2015)
    ``"forward"``           forward mode through the same steps (Franceschi et
                            al. 2017; :func:`forward_hypergradient`)
    ``"drmad"``             reverse pass along a straight-line trajectory
                            (Fu et al. 2016; :func:`drmad_hypergradient`)
    ``"t1-t2"``             one unrolled step from ``theta``, i.e.
                            ``H^{-1} ~ lr I`` (Luketina et al. 2016;
                            :func:`greedy_hypergradient`); biased
    ``"darts-fd"``          DARTS' finite-difference mixed derivative, one step
                            or inside conjugate gradient (Liu et al. 2019;
                            :func:`darts_hypergradient`)
    ======================  =====================================================

    Parameters
    ----------
    problem : BilevelProblem
    theta : Tensor
        The inner optimum for the methods with ``METHODS[method] = True``;
        the start of the trajectory for the others.
    h : Tensor
    method : str, default="implicit-cg"
        A key of :data:`METHODS`.
    **options
        Passed to the method's function (``max_iter``, ``tol``, ``damping``,
        ``n_terms``, ``alpha``, ``n_steps``, ``truncate``, ``lr``,
        ``iteration``, ``eps0``, ``decay``, ``solver``, ``eps``, ...).

    Returns
    -------
    HypergradResult
    """
    if method == "implicit-cg":
        return implicit_hypergradient(problem, theta, h, solver="cg", **options)
    if method == "implicit-neumann":
        return implicit_hypergradient(problem, theta, h, solver="neumann", **options)
    if method == "hoag":
        return hoag_hypergradient(problem, theta, h, **options)
    if method == "truncated-reverse":
        opts = {"n_steps": 20, **options}
        opts.setdefault("truncate", opts["n_steps"])
        return reverse_hypergradient(problem, theta, h, **opts)
    if method == "reverse":
        return reverse_hypergradient(problem, theta, h, **options)
    if method == "forward":
        return forward_hypergradient(problem, theta, h, **options)
    if method == "drmad":
        return drmad_hypergradient(problem, theta, h, **options)
    if method == "t1-t2":
        return greedy_hypergradient(problem, theta, h, **options)
    if method == "darts-fd":
        return darts_hypergradient(problem, theta, h, **options)
    raise ValueError(f"unknown hypergradient method {method!r}; choose from {list(METHODS)}.")


def _per_step(method: str, step: int, inner_tol: float, options: dict) -> tuple[float, dict]:
    """Inner tolerance and method options of outer evaluation ``step``.

    Fixed for every method but HOAG, whose inner and linear-solve tolerances
    follow its decreasing schedule (floored at ``inner_tol``).
    """
    if method != "hoag":
        return inner_tol, options
    sched = {k: options[k] for k in SCHEDULE_OPTIONS if k in options}
    return max(hoag_tolerance(step, **sched), inner_tol), {**options, "iteration": step}


def _direct_hypergradient(
    problem: BilevelProblem, theta: torch.Tensor, h: torch.Tensor
) -> HypergradResult:
    """``Q`` and ``dQ/dh`` of a problem without inner parameters (one backward
    pass, or the problem's closed-form ``outer_value_grads``)."""
    if problem.outer_value_grads is not None:
        q, _, g = problem.outer_value_grads(theta.detach(), h.detach())
        return HypergradResult(value=q, grad=g, theta=theta, info={})
    with torch.enable_grad():
        hh = h.detach().requires_grad_(True)
        q = problem.outer_loss(theta.detach(), hh)
        (g,) = torch.autograd.grad(q, hh, allow_unused=True)
    return HypergradResult(
        value=q.detach(), grad=torch.zeros_like(h) if g is None else g, theta=theta, info={}
    )


@dataclass
class TuningResult:
    """Outcome of :func:`tune`.

    Attributes
    ----------
    h : Tensor
        Best hyperparameters found (lowest outer loss).
    value : float
        Outer loss at ``h``.
    thetas : list of Tensor
        Inner solutions at ``h``, one per problem.
    history : list of dict
        Per evaluation: ``outer_loss``, ``h`` (array), ``hypergrad_norm``,
        ``inner_iter``, ``seconds``.
    diverged : bool
        Whether an inner solve diverged (the last good point is returned).
    message : str
        Why the loop stopped.
    hessian : list of HessianDecision or None
        Per problem: whether its exact Hessian blocks were formed, and why
        (``None`` where no solve could use them).
    """

    h: torch.Tensor
    value: float
    thetas: list
    history: list = field(default_factory=list)
    diverged: bool = False
    message: str = ""
    hessian: list[HessianDecision | None] = field(default_factory=list)


class _Stop(Exception):
    pass


class _Converged(Exception):
    pass


class _Stalled(Exception):
    pass


class _Budget(Exception):
    """The evaluation budget (``2 * max_outer_iter``, ``shared_stage``, ``max_evals``) is spent."""


#: Evaluations in a row that may fail to improve the best outer loss (by
#: ``tol``, relatively) before L-BFGS-B is stopped. Where the inner solves
#: stop short (non-smooth losses at their iteration bound, HOAG's loose early
#: tolerances) the outer values carry noise of their own, and the line search
#: can backtrack towards the last point for many evaluations without ever
#: improving on it. Five leaves room for a line search that is making
#: progress; fewer stops some of those too.
STALL_EVALS = 5


def _small_decrease(prev: float, cur: float, tol: float, start: float) -> bool:
    """A decrease of at most ``tol`` times the loss at the start (or now, if larger).

    Scale-free, unlike SciPy's ``ftol``, which divides by ``max(|f|, 1)``:
    below a loss of 1 that is an absolute test, which stops the tuning of a
    near-perfect regressor (a standardised validation loss of a few
    thousandths) before its hyperparameters move. Relative to the start rather than to the
    current loss, so that a loss tuned far below its start does not ask for
    ever smaller gains.
    """
    return prev - cur <= tol * max(abs(start), abs(prev), abs(cur))


def tune(
    problems: Sequence[BilevelProblem],
    h0: torch.Tensor,
    *,
    lower: torch.Tensor,
    upper: torch.Tensor,
    method: str = "implicit-cg",
    method_options: dict | None = None,
    optimizer: str = "lbfgs",
    max_outer_iter: int = 30,
    outer_lr: float = 0.1,
    tol: float = 1e-4,
    max_inner_iter: int = 500,
    inner_tol: float = 1e-7,
    callback: Callable[[dict], None] | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    inner_solver: str = "auto",
    scale: torch.Tensor | None = None,
    shared_stage: bool = False,
    max_evals: int | None = None,
) -> TuningResult:
    """Minimise ``sum_k Q_k(theta_k*(h), h)`` over box-bounded ``h``.

    Every problem (one per cross-fitting fold) shares ``h``; each keeps its own
    warm-started inner solution.

    Parameters
    ----------
    problems : sequence of BilevelProblem
    h0 : Tensor
        Start, in the unconstrained (e.g. log) space the problems use.
    lower, upper : Tensor
        Box bounds on ``h`` (``-inf`` / ``inf`` allowed).
    method : str, default="implicit-cg"
        Hypergradient method (see :data:`METHODS` and :func:`hypergradient`).
    method_options : dict, default=None
        Options for the method. With ``"hoag"``, evaluation ``k`` (from 0)
        solves the inner problems to ``max(eps_k, inner_tol)`` and the linear
        systems to ``eps_k`` (:func:`hoag_tolerance`; ``eps0``, ``decay``,
        ``schedule`` are read from here).
    optimizer : {"lbfgs", "adam"}, default="lbfgs"
        ``"lbfgs"``: L-BFGS-B with the bounds (few evaluations, best for a
        handful of hyperparameters); ``"adam"``: projected Adam steps of size
        ``outer_lr`` on the device (for many hyperparameters).
    max_outer_iter : int, default=30
        Bound on outer iterations.
    outer_lr : float, default=0.1
        Adam step size.
    tol : float, default=1e-4
        Decrease of the outer loss, relative to its value at ``h0`` (or to
        the current value, if larger), below which the loop stops: between
        L-BFGS-B's accepted iterates, or the change over one Adam step.
    max_inner_iter : int, default=500
    inner_tol : float, default=1e-7
    callback : callable, default=None
        Called with each history entry.
    project : callable, default=None
        ``h -> h'``: projection onto the feasible set, applied to ``h0`` and
        after every Adam step instead of clipping to ``[lower, upper]`` (so it
        must keep ``h`` inside those bounds itself), e.g.
        :func:`project_capped_simplex` for many per-row weights under a
        budget. Only with ``optimizer="adam"``.
    inner_solver : {"auto", "newton", "lbfgs"}, default="auto"
        Solver of the inner problems (:func:`solve_inner`). With ``"lbfgs"``
        HOAG's linear systems are solved by conjugate gradient too (no
        Hessian is formed).
    scale : Tensor, default=None
        Positive unit of each entry of ``h`` for L-BFGS-B, which works on
        ``h / scale``. Its first step (and any step after it resets its
        curvature pairs) is along the projected negative gradient, its
        largest entry ``FIRST_STEP`` units long: give the width of a range the
        user chose, so that step is measured in that range. ``None``: the
        units of ``h``.
    shared_stage : bool, default=False
        With ``optimizer="lbfgs"`` and more than one entry in ``h``: first
        move every entry together (a 1-D search on a shared shift, in
        ``h / scale``), then refine them one by one with L-BFGS-B, all in at
        most ``SHARED_BUDGET`` evaluations (see :func:`_shared_search`). For
        a vector of like hyperparameters (one L2 weight per base model),
        whose common level matters most.
    max_evals : int, default=None
        With ``optimizer="lbfgs"``: at most this many outer evaluations, line
        searches included (``None``: ``2 * max_outer_iter``; the smaller of
        the two is kept). An aggregation function whose evaluations are dear
        declares it (``Aggregator.outer_budget``).

    Returns
    -------
    TuningResult
    """
    method_options = dict(method_options or {})
    if method == "hoag" and inner_solver == "lbfgs":
        method_options.setdefault("solver", "cg")
    if project is not None and optimizer != "adam":
        raise ValueError(
            f"project needs optimizer='adam' (L-BFGS-B only knows box bounds); "
            f"got optimizer={optimizer!r}."
        )
    if method not in METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; choose from {list(METHODS)}.")
    needs_optimum = METHODS[method]
    thetas = [p.theta0.detach().clone() for p in problems]
    history: list[dict] = []
    best = {"value": math.inf, "h": h0.detach().clone(), "thetas": list(thetas)}
    state = {"diverged": False, "message": ""}
    # Conjugate gradient starts from the previous evaluation's solution: the
    # systems of nearby h differ little (HOAG's warm start).
    warm_cg = method in ("implicit-cg", "hoag") and "v0" not in method_options
    cg_starts: list = [None] * len(problems)
    if needs_optimum and inner_solver == "auto":
        # Exact Hessian blocks or first-order methods: decided once per
        # problem, at the start, for a reason kept in problem.hessian.
        for prob in problems:
            if prob.theta0.numel():  # nothing to solve without inner parameters
                decide_exact_hessian(prob, prob.theta0, h0)

    def evaluate(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        value = torch.zeros((), dtype=h.dtype, device=h.device)
        grad = torch.zeros_like(h)
        inner_iter = 0
        new_thetas = []
        step_tol, step_options = _per_step(method, len(history), inner_tol, method_options)
        for k, prob in enumerate(problems):
            try:
                if needs_optimum:
                    theta, n_it, _ = solve_inner(
                        prob, h, thetas[k], max_iter=max_inner_iter, tol=step_tol,
                        solver=inner_solver,
                    )
                    inner_iter += n_it
                else:
                    theta = prob.theta0
                if needs_optimum and theta.numel() == 0:
                    # No inner parameters (splits fitted in closed form inside
                    # the outer loss): every method's hypergradient is the
                    # direct derivative; its linear solves would be empty.
                    res = _direct_hypergradient(prob, theta, h)
                else:
                    opts = {**step_options, "v0": cg_starts[k]} if warm_cg else step_options
                    res = hypergradient(prob, theta, h, method, **opts)
            except InnerDivergenceError as e:
                state.update(diverged=True, message=str(e))
                raise _Stop from e
            if not (torch.isfinite(res.value) and torch.isfinite(res.grad).all()):
                state.update(
                    diverged=True,
                    message="the outer loss or its hypergradient became non-finite",
                )
                raise _Stop
            if warm_cg:
                cg_starts[k] = res.info.get("v")
            if not needs_optimum:
                inner_iter += res.info.get("n_steps", 0)
            value = value + res.value
            grad = grad + res.grad
            new_thetas.append(res.theta if not needs_optimum else theta)
        thetas[:] = new_thetas
        v = float(value)
        entry = {
            "outer_loss": v,
            "h": h.detach().cpu().numpy().copy(),
            "hypergrad_norm": float(grad.norm()),
            "inner_iter": inner_iter,
            "seconds": time.perf_counter() - t0,
        }
        history.append(entry)
        if callback is not None:
            callback(entry)
        if v < best["value"]:
            best.update(value=v, h=h.detach().clone(), thetas=list(new_thetas))
        return value, grad

    if h0.numel() == 0:
        max_outer_iter = 0
    try:
        if max_outer_iter <= 0:
            evaluate(h0.detach())
            state["message"] = "no tuning asked for"
        elif optimizer == "lbfgs":
            _run_lbfgs(
                evaluate, h0, lower, upper, max_outer_iter, tol, state, scale, shared_stage,
                max_evals,
            )
        elif optimizer == "adam":
            _run_adam(evaluate, h0, lower, upper, max_outer_iter, outer_lr, tol, state, project)
        else:
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam'; got {optimizer!r}.")
    except _Stop:
        pass
    if not history:  # diverged at the very first point: nothing good to return
        raise InnerDivergenceError(
            f"the inner problem diverged at the initial hyperparameters: {state['message']}"
        )
    return TuningResult(
        h=best["h"],
        value=best["value"],
        thetas=best["thetas"],
        history=history,
        diverged=state["diverged"],
        message=state["message"],
        hessian=[p.hessian for p in problems],
    )


#: Distance (in L-BFGS-B's units, ``h / scale``: fractions of the ranges)
#: within which a finished L-BFGS-B run counts as not having left its start.
#: Where the validation loss is flat near the start its hypergradient is tiny,
#: and so is L-BFGS-B's first step (the projected negative gradient, of unit
#: step length on a boxed problem): the loss then changes by less than ``tol``
#: and the run stops there, however much lower the loss is further away.
LEAVE_START = 0.05

#: Step lengths (same units) tried along the descent direction, in turn,
#: while the loss keeps decreasing, when a run did not leave its start.
BRACKET_STEPS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


#: Length (max-norm, in L-BFGS-B's units ``h / scale``) of L-BFGS-B's first
#: trial step. On a boxed problem that step is the negative gradient itself,
#: so its length is in the loss's units: where the hypergradient is a few
#: thousandths (a standardised regression loss) it moved a log-L2 by as much,
#: and the next evaluations only learnt the curvature a longer step shows.
#: Scaling the outer loss by ``FIRST_STEP / max|gradient|`` at the start
#: makes that step one unit (a factor ``e`` of an L2 tuned in log space); the
#: line search shortens it where the loss rises, and the later steps scale
#: themselves from the curvature pairs.
FIRST_STEP = 1.0


#: Outer evaluations, all stages together, of a tuning with ``shared_stage``
#: (or ``2 * max_outer_iter``, if fewer).
SHARED_BUDGET = 8

#: Of those, at most this many (the start included) go to the 1-D search on
#: the shared shift; L-BFGS-B refines the entries one by one with the rest.
SHARED_EVALS = 4

#: The 1-D search is tried only where the hypergradient at the start lies
#: within this cosine of the shared direction (all entries moving together):
#: where some weights want to grow and others to shrink, a common shift gains
#: little and its evaluations are better spent by L-BFGS-B.
SHARED_COSINE = 0.5

#: The 1-D search stops once the slope along the shared shift has fallen to
#: this fraction of its value at the start: the common level is found to well
#: within what the per-entry refinement moves next.
SHARED_SLOPE = 0.1


def _shared_search(raw, x0, xlo, xhi, n_evals):
    """1-D search for the best common shift ``t`` of every entry of ``x``.

    Minimises ``phi(t) = f(clip(x0 + t))`` from its slope
    ``phi'(t) = sum of g over entries inside their bounds``: the first
    trial is one unit (``FIRST_STEP``) downhill; while the slope keeps its
    sign the next is a secant extrapolation (2 to 4 times the last step, as
    a warm-started regularisation path would go), and once a sign change or
    a rise of ``phi`` brackets the minimum, a safeguarded secant step inside
    the bracket. ``raw`` is called at most ``n_evals`` times, the start
    included. Only the start is evaluated where the hypergradient there is
    not within ``SHARED_COSINE`` of the shared direction.

    Returns
    -------
    list of (x, f, g)
        Every point evaluated, the start first.
    """
    pts = []

    def at(t):
        x = np.clip(x0 + t, xlo, xhi)
        f, g = raw(x)
        free = ~((x <= xlo) & (g > 0) | (x >= xhi) & (g < 0))
        pts.append((x.copy(), f, g))
        return f, float(np.sum(g[free]))

    f0, s0 = at(0.0)
    g0 = pts[0][2]
    norm = float(np.linalg.norm(g0))
    if not (np.isfinite(s0) and norm > 0) or abs(s0) < SHARED_COSINE * np.sqrt(g0.size) * norm:
        return pts  # the entries pull apart: the shared shift is no short cut
    line = [(0.0, f0, s0)]  # (t, phi, phi')
    t_next = -np.sign(s0) * FIRST_STEP
    while len(pts) < n_evals:
        f, sl = at(t_next)
        line.append((t_next, f, sl))
        tb, fb, sb = min(line, key=lambda p: p[1])
        if abs(sb) <= SHARED_SLOPE * abs(s0):
            break
        if np.array_equal(pts[-1][0], pts[-2][0]):
            break  # every entry at a bound: the line ends here
        # The bracket: the best point and its nearest neighbour past which the
        # slope turns up (or the loss rises).
        ahead = [
            p for p in line
            if (p[0] - tb) * -sb > 0 and (np.sign(p[2]) != np.sign(sb) or p[1] > fb)
        ]
        if ahead:
            tc, fc, sc = min(ahead, key=lambda p: abs(p[0] - tb))
            if sc != sb and np.sign(sc) != np.sign(sb):
                t_new = tb - sb * (tc - tb) / (sc - sb)
            else:  # a rise without a sign change: the parabola through fb, sb, fc
                d = tc - tb
                curv = fc - fb - sb * d
                t_new = tb - sb * d * d / (2 * curv) if curv > 0 else tb + d / 2
            lo_t, hi_t = sorted((tb, tc))
            w = hi_t - lo_t
            t_new = float(np.clip(t_new, lo_t + 0.1 * w, hi_t - 0.1 * w))
        else:
            # Still downhill: extrapolate by the secant of the slope from the
            # previous best, between 2 and 4 times the last step.
            tp, _, sp = line[-2] if line[-1][0] == tb else line[-1]
            step = tb - tp
            if sp != sb and np.sign(sp) == np.sign(sb) and abs(sb) < abs(sp):
                mult = float(np.clip(-sb / (sb - sp), 2.0, 4.0))
            else:
                mult = 4.0
            t_new = tb + mult * abs(step) * -np.sign(sb)
        t_next = t_new
    return pts


def _run_lbfgs(
    evaluate, h0, lower, upper, max_outer_iter, tol, state, scale=None, shared_stage=False,
    max_evals=None,
):
    dtype, device = h0.dtype, h0.device
    lo, hi = lower.detach().cpu().numpy(), upper.detach().cpu().numpy()
    unit = np.ones_like(lo) if scale is None else scale.detach().cpu().numpy().astype(np.float64)
    if not (unit.shape == lo.shape and np.all(np.isfinite(unit)) and np.all(unit > 0)):
        raise ValueError(f"scale must hold {lo.size} positive finite values; got {unit!r}.")
    # L-BFGS-B sees x = h / unit.
    xlo, xhi = lo / unit, hi / unit
    bounds = [
        (None if not np.isfinite(a) else float(a), None if not np.isfinite(b) else float(b))
        for a, b in zip(xlo, xhi)
    ]

    seen: list = []  # (x, f, g) of every evaluation, line-search trials included
    accepted: list = []  # f at the iterates L-BFGS-B accepted
    max_fun = 2 * max_outer_iter
    x0 = np.clip(h0.detach().cpu().numpy().astype(np.float64), lo, hi) / unit
    shared_stage = shared_stage and x0.size > 1
    if shared_stage:
        max_fun = min(max_fun, SHARED_BUDGET)
    # A hard budget: L-BFGS-B's maxfun alone lets a line search overrun it,
    # and the estimator promises at most twice max_outer_iter.
    if max_evals is not None:
        max_fun = max(1, min(max_fun, int(max_evals)))
    n_raw = [0]
    # L-BFGS-B minimises gain * Q, gain fixed at the first evaluation (see FIRST_STEP).
    gain: list = [None]

    def raw(x):
        # Only the hyperparameter vector crosses to the host here.
        if n_raw[0] >= max_fun:
            state["message"] = f"reached the budget of {max_fun} outer evaluations"
            raise _Budget  # L-BFGS-B's line search may overrun its maxfun
        n_raw[0] += 1
        h = np.clip(x * unit, lo, hi)  # no rounding past a bound
        value, grad = evaluate(torch.as_tensor(h, dtype=dtype, device=device))
        f = float(value)
        g = grad.detach().cpu().numpy().astype(np.float64) * unit
        if gain[0] is None:
            m = float(np.max(np.abs(g)))
            gain[0] = FIRST_STEP / m if m > 0 and np.isfinite(m) else 1.0
        return f * gain[0], g * gain[0]

    def fun(x):
        if seen and np.array_equal(x, seen[-1][0]):
            return seen[-1][1], seen[-1][2]  # a restart from the last point evaluated
        f, g = raw(x)
        if seen:
            best = min(v for _, v, _ in seen)
            improved = f < best - tol * max(abs(best), abs(seen[0][1]))
            state["stall"] = 0 if improved else state.get("stall", 0) + 1
            if state["stall"] >= STALL_EVALS:
                seen.append((x.copy(), f, g))
                raise _Stalled
        seen.append((x.copy(), f, g))
        return f, g

    def after_iteration(xk):
        f = next((f for x, f, _ in reversed(seen) if np.array_equal(x, xk)), seen[-1][1])
        prev = accepted[-1] if accepted else seen[0][1]
        accepted.append(f)
        if _small_decrease(prev, f, tol, seen[0][1]):
            raise _Converged

    def run(x0, maxiter, maxfun):
        state["stall"] = 0
        try:
            res = minimize(
                fun, x0, jac=True, method="L-BFGS-B", bounds=bounds, callback=after_iteration,
                # Its own ftol is off: the relative test above replaces it.
                options={"maxiter": maxiter, "maxfun": maxfun, "ftol": 0.0, "gtol": 1e-8},
            )
        except _Converged:
            state["message"] = "the relative decrease of the outer loss fell below tol"
        except _Stalled:
            state["message"] = (
                f"{STALL_EVALS} evaluations in a row did not improve the outer loss by tol: its "
                "values are no longer precise enough for the line search"
            )
        except _Budget:
            pass
        else:
            state["message"] = str(res.message)

    if shared_stage:
        seen.extend(_shared_search(raw, x0, xlo, xhi, min(SHARED_EVALS, max_fun)))
        ib = int(np.argmin([f for _, f, _ in seen]))
        left = max_fun - len(seen)
        if left >= 1:
            # L-BFGS-B from the best common level; its first call is answered
            # without evaluating, and its relative test starts from there.
            m = float(np.max(np.abs(seen[ib][2])))
            if m > 0 and np.isfinite(m):
                # Its first step one unit long again (see FIRST_STEP): the
                # slope there is the per-entry spread, smaller than at the start.
                k = FIRST_STEP / m
                gain[0] *= k
                seen[:] = [(x, f * k, g * k) for x, f, g in seen]
            accepted.append(seen[ib][1])
            seen.append(seen[ib])
            run(seen[ib][0], max_outer_iter, left + 1)
        elif not state["message"]:
            state["message"] = f"reached the budget of {max_fun} outer evaluations"
        return
    run(x0, max_outer_iter, max_fun)
    if not seen:
        return
    ib = int(np.argmin([f for _, f, _ in seen]))
    f0 = seen[0][1]
    if (
        np.max(np.abs(seen[ib][0] - seen[0][0])) >= LEAVE_START
        or not _small_decrease(f0, seen[ib][1], tol, f0)
        or len(seen) + 2 > max_fun
    ):
        return
    # The run stayed at its start, its loss there no better than at the start
    # by tol: bracket along the descent direction with growing steps, while
    # the loss decreases, then go on from the best point.
    n_before = len(seen)
    xb, fb, gb = seen[ib]
    if np.all(gb == 0):
        directions = [-np.ones_like(xb), np.ones_like(xb)] if xb.size == 1 else []
    else:
        d = -gb / np.max(np.abs(gb))
        # A one-hyperparameter loss flat at the start: its slope's sign may be noise.
        directions = [d, -d] if xb.size == 1 else [d]
    for d in directions:
        d = np.where((xb <= xlo) & (d < 0) | (xb >= xhi) & (d > 0), 0.0, d)
        if not np.any(d):
            continue
        prev_f, moved = fb, False
        for t in BRACKET_STEPS:
            if len(seen) >= max_fun:
                break
            x = np.clip(xb + t * d, xlo, xhi)
            f, g = raw(x)
            seen.append((x.copy(), f, g))
            if not f < prev_f:
                break
            prev_f, moved = f, True
            if np.array_equal(x, np.clip(xb + 2 * t * d, xlo, xhi)):
                break  # at a bound
        if moved:
            break
    ib2 = int(np.argmin([f for _, f, _ in seen]))
    if ib2 == ib:
        return
    left = max_fun - len(seen)
    if left >= 1:
        accepted.clear()
        seen.append(seen[ib2])  # L-BFGS-B's first call, answered without evaluating
        run(seen[ib2][0], max(1, max_outer_iter - (len(seen) - n_before) // 2), left + 1)


def _run_adam(evaluate, h0, lower, upper, max_outer_iter, lr, tol, state, project=None):
    if project is None:
        project = lambda x: x.clamp(lower, upper)  # noqa: E731
    h = project(h0.detach().clone())
    m = torch.zeros_like(h)
    v = torch.zeros_like(h)
    b1, b2, eps = 0.9, 0.999, 1e-8
    prev = start = math.inf
    for t in range(1, max_outer_iter + 1):
        value, g = evaluate(h)
        if t == 1:
            start = float(value)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        h = project(h - step)
        cur = float(value)
        if math.isfinite(prev) and abs(prev - cur) <= tol * max(abs(start), abs(prev), abs(cur)):
            state["message"] = "outer loss changed by less than tol"
            return
        prev = cur
    state["message"] = "reached max_outer_iter"
