"""From an aggregation function and tensors to the engine's bilevel problem.

This is the only place that knows both sides: the estimator hands it tensors
already on the device, the engine gets flat ``theta`` / ``h`` losses back.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from ._analytic import attach_linear_derivatives, attach_weights_derivatives
from ._base import AggregationContext, Aggregator, Hyperparameter, Params
from ._choquet_analytic import attach_choquet_derivatives
from .choquet import Choquet
from .hypergrad import (
    BilevelProblem,
    InnerDivergenceError,
    acv_fold_params,
    acv_problem,
    is_out_of_memory,
    linear_acv_fold_params,
    linear_acv_problem,
    stack_problems,
)
from .hypergrad._acv_linear import (
    linear_kfold_problem,
    linear_penalty_terms,
    quadratic_penalty_kind,
)

__all__ = [
    "HyperSpace", "ParamPacker", "Split", "data_loss", "make_acv_problem",
    "make_fold_problems", "make_linear_cv_problem", "make_problem", "parse_range",
]


class ParamPacker:
    """Flatten a dict of tensors to one vector and back (same order every time)."""

    def __init__(self, params: Params):
        self.names = list(params)
        self.shapes = [params[k].shape for k in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]

    def flatten(self, params: Params) -> torch.Tensor:
        parts = [params[k].reshape(-1) for k in self.names]
        return torch.cat(parts) if parts else torch.zeros(0)

    def unflatten(self, theta: torch.Tensor) -> Params:
        out = {}
        for name, shape, chunk in zip(
            self.names, self.shapes, torch.split(theta, self.sizes)
        ):
            out[name] = chunk.view(shape)
        return out


def parse_range(value) -> tuple[float, float, bool] | None:
    """Read a continuous search range, or return ``None`` for a plain value.

    A range is what :class:`~sklearn.model_selection.RandomizedSearchCV`
    already accepts for a continuous dimension, ``scipy.stats.loguniform(a, b)``
    or ``scipy.stats.uniform(loc, scale)``, or a tuple ``(low, high, "log")`` /
    ``(low, high, "linear")``.

    Returns
    -------
    (low, high, log) or None
    """
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[2], str):
        low, high, scale = value
        if scale not in ("log", "linear"):
            raise ValueError(
                f"the scale of a range must be 'log' or 'linear'; got {scale!r} in {value!r}."
            )
        log = scale == "log"
    elif hasattr(value, "dist") and hasattr(value, "support"):  # a frozen scipy distribution
        name = getattr(value.dist, "name", "")
        if name not in ("loguniform", "reciprocal", "uniform"):
            raise ValueError(
                f"a continuous range must be scipy.stats.loguniform or scipy.stats.uniform; "
                f"got scipy.stats.{name}. Only a box is solved by gradient: a prior's "
                "shape would be ignored."
            )
        low, high = value.support()
        log = name != "uniform"
    else:
        return None
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the bounds of the range {value!r} must be numbers.") from e
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"a range needs finite bounds with low < high; got {value!r}.")
    if log and low <= 0:
        raise ValueError(f"a log-scaled range needs low > 0; got {value!r}.")
    return low, high, log


class HyperSpace:
    """Which hyperparameters are tuned, and the unconstrained space they live in.

    Tuned entries are concatenated into one vector ``u``: ``log(value)`` for
    log-scaled hyperparameters, the value itself otherwise, box-bounded.
    Fixed entries are constants.

    Every value given is checked against the hyperparameter's limits
    (:meth:`Hyperparameter.check`): the aggregator's own value, a fixed value
    and the ends of a range alike; one outside is a ``ValueError`` naming it,
    never clipped.

    Parameters
    ----------
    specs : list of Hyperparameter
    fixed : dict
        ``name -> value`` for hyperparameters that are not tuned, or
        ``name -> range`` (see :func:`parse_range`) for one tuned within
        bounds other than the declared ones (inside its limits). The
        aggregator's value is then where tuning starts, moved into the range.
    device, dtype
    owner : str, default="the aggregator"
        Who declares the hyperparameters (for messages): the aggregation
        function's class name.
    """

    def __init__(
        self, specs: list[Hyperparameter], fixed: dict, device, dtype, *, owner="the aggregator"
    ):
        known = {s.name for s in specs}
        unknown = set(fixed) - known
        if unknown:
            raise ValueError(
                f"hyperparams names {sorted(unknown)} that the aggregator does not "
                f"have; its hyperparameters are {sorted(known)}."
            )
        for s in specs:
            s.check(s.init, owner, f"given to {owner}")
        ranges = {k: r for k, v in fixed.items() if (r := parse_range(v)) is not None}
        for k, (low, high, _) in ranges.items():
            next(s for s in specs if s.name == k).check_range(low, high, owner)
        fixed = {k: v for k, v in fixed.items() if k not in ranges}
        specs = [self._with_range(s, ranges[s.name]) if s.name in ranges else s for s in specs]
        self.specs = specs
        self.ranged = set(ranges)  # the ones whose box the user gave
        self.device, self.dtype = device, dtype
        self.tuned = [s for s in specs if s.name not in fixed]
        self._penalties = {s.name for s in specs if s.penalty}
        self.penalty_factor = 1.0  # see rescaled
        # The fixed values as the problems see them (penalties scaled).
        self.constants = {}
        for s in specs:
            if s.name in fixed:
                v = s.check(fixed[s.name], owner, f"given as hyperparams={{{s.name!r}: ...}}")
                self.constants[s.name] = torch.as_tensor(v, device=device, dtype=dtype)

    def rescaled(self, penalty_factor: float) -> "HyperSpace":
        """The same space whose :meth:`values` multiply the penalty weights
        (:attr:`Hyperparameter.penalty`), tuned or fixed, by ``penalty_factor``.

        ``n / m`` for the problems on a subsample of ``m`` of the ``n`` rows: the
        same tuned vector (its start and bounds unchanged) then means the same
        prior there as on all rows. :meth:`flat_values`, the record of the
        tuning, gives the unscaled values.
        """
        out = copy.copy(self)
        out.penalty_factor = float(penalty_factor)
        ratio = out.penalty_factor / self.penalty_factor
        out.constants = {
            k: v * ratio if k in self._penalties else v for k, v in self.constants.items()
        }
        return out

    @staticmethod
    def _with_range(s: Hyperparameter, rng: tuple[float, float, bool]) -> Hyperparameter:
        low, high, log = rng
        # The range becomes the box; the limits stay those declared.
        return replace(s, low=low, high=high, log=log, limits=s.allowed())

    def _encode(self, s: Hyperparameter, v):
        return np.log(v) if s.log else np.asarray(v, dtype=np.float64)

    def initial(self) -> torch.Tensor:
        parts = [self._encode(s, s.initial()) for s in self.tuned]
        return self._tensor(np.concatenate(parts) if parts else np.zeros(0))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = [np.full(s.size, self._encode(s, s.low)) for s in self.tuned]
        hi = [np.full(s.size, self._encode(s, s.high)) for s in self.tuned]
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
        return self._tensor(cat(lo)), self._tensor(cat(hi))

    def scales(self) -> torch.Tensor:
        """The outer optimiser's unit for each tuned entry.

        The width of the box (in ``u``) for a hyperparameter whose range the
        user gave, as a grid would span it; 1 (one unit of ``log``) for one
        tuned within the aggregator's declared bounds, which only keep it
        sane and say nothing of where it matters.
        """
        parts = [
            np.full(s.size, self._encode(s, s.high) - self._encode(s, s.low)
                    if s.name in self.ranged else 1.0)
            for s in self.tuned
        ]
        return self._tensor(np.concatenate(parts) if parts else np.zeros(0))

    def _tensor(self, a) -> torch.Tensor:
        return torch.as_tensor(a, device=self.device, dtype=self.dtype)

    def values(self, u: torch.Tensor) -> Params:
        """Hyperparameter values from the tuned vector ``u``: 1-D tensors, or
        for a batch of vectors ``(..., n_tuned)`` the tuned ones with that
        leading shape (the held ones stay 1-D)."""
        out = dict(self.constants)
        off = 0
        for s in self.tuned:
            seg = u[..., off : off + s.size]
            off += s.size
            out[s.name] = torch.exp(seg) if s.log else seg
            if self.penalty_factor != 1.0 and s.penalty:
                out[s.name] = out[s.name] * self.penalty_factor
        return out

    def entry_names(self) -> list[str]:
        return [n for s in self.specs for n in s.entry_names()]

    def flat_values(self, u: torch.Tensor) -> np.ndarray:
        """Every hyperparameter's entries (``entry_names`` order) at ``u``, or one
        row per vector of a 2-D ``u``."""
        batch = u.shape[:-1]
        if not self.specs:
            return np.zeros((*batch, 0))
        vals = self.rescaled(1.0).values(u) if self.penalty_factor != 1.0 else self.values(u)
        cols = []
        for s in self.specs:
            v = vals[s.name].detach().cpu().reshape(-1, s.size)  # (1 or batch, size)
            cols.append(v.expand(int(np.prod(batch)), s.size) if batch else v[0])
        out = torch.cat(cols, dim=-1)
        return out.reshape(*batch, out.shape[-1]).numpy()


def data_loss(
    task: str,
    out: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor | None = None,
    charge: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy on class log-scores, or mean squared error.

    With ``weights`` (one per row), ``sum_i w_i loss_i / n_rows`` instead.
    With ``charge``, each row's cross-entropy is charged as
    :func:`charged_row_losses` says (validation losses only).
    """
    if charge and task == "classification":
        losses = charged_row_losses(task, out, y, charge)
        return losses.mean() if weights is None else (weights * losses).mean()
    if weights is None:
        if task == "classification":
            return row_losses(task, out, y).mean()
        return (out - y).pow(2).mean()
    return (weights * row_losses(task, out, y)).mean()


def unseen_error_charge(agg: Aggregator, task: str, n_validation: int) -> float:
    """The charge on validation rows of ``agg``: ``1 / (n + 1)`` or none.

    Only aggregation functions that declare ``charge_unseen_errors = True``
    (classifiers): ``n`` validation rows cannot show an error rate below
    about ``1 / (n + 1)`` (Laplace's rule of succession), so a tuning that
    may sharpen the scores without bound (an output temperature over a
    bounded score) would otherwise drive it to its floor wherever the
    validation rows hold no error, and pay for it on the first test error.
    """
    if task != "classification" or not getattr(agg, "charge_unseen_errors", False):
        return 0.0
    return 1.0 / (n_validation + 1)


def charged_row_losses(
    task: str, out: torch.Tensor, y: torch.Tensor, charge: float
) -> torch.Tensor:
    """Row cross-entropies plus ``charge`` times each row's loss on an error.

    A row's loss on an error is ``-log(1 - p_y)``, what the scores would pay
    were its label any other class (drawn by their probabilities): large
    exactly where the scores are confident. It is smooth in the scores, so
    the charged loss keeps its hypergradient. ``aggregator="auto"`` charges
    its held-out rows the same way (at the most probable wrong class).
    """
    loss = row_losses(task, out, y)
    if not charge or task != "classification" or out.shape[-1] < 2:
        return loss
    own = y.unsqueeze(-1) == torch.arange(out.shape[-1], device=out.device)
    wrong = torch.logsumexp(out.masked_fill(own, -torch.inf), -1)
    return loss + charge * (torch.logsumexp(out, -1) - wrong)


def row_losses(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy, or its squared error averaged over the outputs."""
    if task == "classification":
        # The same as F.cross_entropy(out, y, reduction="none"), written so that
        # its second derivatives batch: cross_entropy's double backward runs once
        # per Hessian probe under vmap, this form once for all of them.
        return torch.logsumexp(out, -1) - out.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (out - y).pow(2).reshape(out.shape[0], -1).mean(1)


@dataclass
class Split:
    """Tensors of one set of rows, already on the device.

    ``w``: the rows' sample weights (``None``: all equal). Losses over the
    rows are then weighted means, ``sum_i w_i loss_i / sum_i w_i``.
    """

    Z: torch.Tensor
    y: torch.Tensor
    X: torch.Tensor | None = None
    w: torch.Tensor | None = None

    def take(self, idx: torch.Tensor) -> "Split":
        return Split(
            self.Z[idx], self.y[idx],
            None if self.X is None else self.X[idx],
            None if self.w is None else self.w[idx],
        )

    def mean_weights(self) -> torch.Tensor | None:
        """``w`` scaled to mean 1 (what :func:`data_loss` takes), ``None`` without weights."""
        if self.w is None:
            return None
        total = self.w.sum()
        if not bool(total > 0):
            raise ValueError(
                "a set of rows the aggregator is fitted or validated on has a total "
                "sample weight of 0; give those rows positive weights or use fewer folds."
            )
        return self.w * (self.w.shape[0] / total)


def make_problem(
    agg: Aggregator,
    ctx: AggregationContext,
    train: Split,
    val: Split | None,
    space: HyperSpace,
    theta0: torch.Tensor | None = None,
    *,
    row_weights: Callable[[torch.Tensor], torch.Tensor] | None = None,
    analytic: bool = True,
    analytic_checked: bool = False,
    charge: float = 0.0,
) -> tuple[BilevelProblem, ParamPacker, Params]:
    """Build the bilevel problem of fitting ``agg`` on ``train``, judged on ``val``.

    ``row_weights``, when given, maps the hyperparameter vector ``u`` to one
    weight per training row, and the inner data loss becomes
    ``sum_i w_i loss_i / n_train`` (data hyper-cleaning: the weights are the
    hyperparameters). ``space`` reads only the first entries of ``u``; the
    hook may use the rest.

    With ``analytic`` (and no ``row_weights``), an aggregation function
    linear in its parameters gets closed-form derivatives
    (:func:`~aggregators._analytic.attach_linear_derivatives`);
    ``analytic_checked``: they agreed with autograd on another problem of
    this fit (the folds'), and are not compared again.
    ``charge``: the validation rows' charge for unseen errors
    (:func:`unseen_error_charge`); the closed forms know no charge, so
    there are none with it.

    Returns the problem, the packer of its parameters and the buffers
    computed from ``train``.
    """
    agg.bind(ctx)
    buffers = agg.fit_buffers(ctx, train.Z, train.y, train.X)
    init = agg.init_params(ctx, train.Z, train.y, train.X)
    packer = ParamPacker(init)
    start = packer.flatten(init) if theta0 is None else theta0

    def forward(theta, u, part: Split):
        params = {**packer.unflatten(theta), **buffers}
        return agg.forward(params, space.values(u), part.Z, part.X)

    sample_w = train.mean_weights()
    val_w = val.mean_weights() if val is not None else sample_w

    def inner(theta, u):
        w = sample_w
        if row_weights is not None:
            w = row_weights(u) if w is None else w * row_weights(u)
        loss = data_loss(ctx.task, forward(theta, u, train), train.y, w)
        params, hyper = packer.unflatten(theta), space.values(u)
        extra = agg.data_penalty({**params, **buffers}, hyper, train.Z, train.X)
        if extra is not None:
            loss = loss + extra
        return loss + agg.penalty(params, hyper)

    def outer(theta, u):
        part = val if val is not None else train
        return data_loss(ctx.task, forward(theta, u, part), part.y, val_w, charge)

    problem = BilevelProblem(inner, outer, start.detach())
    if analytic and row_weights is None:
        n_tr = train.y.shape[0]
        w_tr = (sample_w if sample_w is not None else train.Z.new_ones(n_tr)) / n_tr
        part = val if val is not None else train
        w_va = (val_w if val_w is not None else part.Z.new_ones(part.y.shape[0]))
        w_va = w_va / part.y.shape[0]
        _attach(problem, agg, ctx, space, packer, [(
            buffers, (train.Z, train.X, train.y, w_tr), (part.Z, part.X, part.y, w_va),
        )], check=not analytic_checked, charge=charge)
    return problem, packer, buffers


#: Closed forms that matched autograd in this process, by what decides their
#: algebra (:func:`_closed_form_key`): a later problem of the same key is not
#: checked again: ``aggregator="auto"`` fits the same few configurations a
#: dozen times on its outer folds, and the check (autograd at three points)
#: is a fixed cost of every small fit that the algebra does not need twice.
_CHECKED: set = set()
#: Bound on :data:`_CHECKED`'s size (it is emptied when reached).
_CHECKED_MAX = 1024


def _closed_form_key(problem, agg, ctx, n_folds: int, charge: float):
    """What a closed form's agreement with autograd depends on: the aggregation
    function's class and the methods that define its loss (so that a subclass
    or a patched method is checked anew), callables set on the instance, its
    parameters, the task's shape, whether the validation loss is charged, the
    number of folds, the dtype and the device type. ``None`` where the
    parameters cannot be read: then the check always runs."""
    cls = type(agg)
    try:
        params = repr(sorted(agg.get_params(deep=False).items()))
    except Exception:  # noqa: BLE001 - an unreadable aggregator is checked every time
        return None
    methods = tuple(getattr(cls, m, None) for m in (
        "forward", "penalty", "linear_design", "data_penalty", "init_params", "fit_buffers"))
    own = tuple(sorted(k for k, v in vars(agg).items() if callable(v)))
    return (cls, methods, own, params, ctx.task, ctx.n_models, ctx.n_outputs,
            ctx.n_features if agg.uses_X else None, bool(charge), n_folds,
            problem.theta0.dtype, problem.theta0.device.type)


def _attach(problem, agg, ctx, space, packer, folds, check: bool = True,
            charge: float = 0.0, low_precision: bool = False) -> str:
    """Closed-form derivatives on ``problem`` where ``agg`` is linear in its parameters
    (checked at the start and at the box's ends, unless ``check`` is ``False``
    or a problem of the same :func:`_closed_form_key` was checked before);
    returns why not, or ``""``. ``charge``: the validation loss's charge for
    unseen errors, which only closed forms that leave the outer loss to
    autograd (Choquet's) serve."""
    key = _closed_form_key(problem, agg, ctx, len(folds), charge) if check else None
    why = _attach_checked(problem, agg, ctx, space, packer, folds,
                          check and key not in _CHECKED, charge, low_precision)
    if why == "" and key is not None:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED.add(key)
    return why


def _attach_checked(problem, agg, ctx, space, packer, folds, check: bool,
                    charge: float, low_precision: bool) -> str:
    if type(agg).data_penalty is not Aggregator.data_penalty:
        return f"{type(agg).__name__} adds a data_penalty"
    if isinstance(agg, Choquet):
        return attach_choquet_derivatives(
            problem, agg, ctx, folds, space.values, _check_points(space), check=check
        )
    if charge:
        return "the closed forms know no charge on the validation loss"
    if getattr(agg, "convex_mixture", False):  # LearnedWeights: its own closed form
        return _attach_weights(problem, agg, ctx, space, folds)
    if type(agg).linear_design is Aggregator.linear_design:
        return f"{type(agg).__name__} has no linear design"

    def penalty(theta, u):
        return agg.penalty(packer.unflatten(theta), space.values(u))

    return attach_linear_derivatives(
        problem, agg, ctx, folds, penalty, _check_points(space), check=check,
        low_precision=low_precision,
    )


def _check_points(space: HyperSpace) -> list[torch.Tensor]:
    """Where closed forms are checked: the start and the box's ends (where finite),
    each distinct point once (with nothing tuned, all three are the start)."""
    h0 = space.initial()
    lower, upper = space.bounds()
    hs = [h0]
    for end in (torch.where(torch.isfinite(lower), lower, h0),
                torch.where(torch.isfinite(upper), upper, h0)):
        if not any(torch.equal(end, h) for h in hs):
            hs.append(end)
    return hs


def _attach_weights(problem, agg, ctx, space, folds) -> str:
    """:func:`~aggregators._analytic.attach_weights_derivatives`, checked at the start
    (the hyperparameters scale terms of the loss; they do not change its form)."""
    return attach_weights_derivatives(problem, agg, ctx, folds, space.values, [space.initial()])


#: Largest ``rows x outputs`` of a fold whose Hessian blocks come from the
#: fold-batched loss (see :func:`make_fold_problems`).
BATCHED_HESSIAN_MAX_ENTRIES = 1024
#: Largest number of entries of the folds' base outputs (all folds, training
#: and validation rows) that are copied into padded, stacked tensors: the
#: batching saves per-fold overhead, which only small problems notice, and
#: the copies double the memory the folds' outputs take.
BATCHED_MAX_ENTRIES = 2**22


def _padded(t: torch.Tensor, n: int) -> torch.Tensor:
    # Padding repeats the fold's own rows (finite values for every aggregator);
    # their weight is 0.
    return t[torch.arange(n, device=t.device) % t.shape[0]]


def _stacked_rows(parts: list[Split]) -> tuple[Split, torch.Tensor]:
    """Folds' rows padded to one length and stacked, with per-row weights ``1 / n_fold``
    (``w_i / sum(w)`` with sample weights; 0 on the padding)."""
    n = max(p.y.shape[0] for p in parts)
    ref = parts[0].Z
    w = torch.stack([
        (torch.arange(n, device=ref.device) < p.y.shape[0]).to(ref.dtype) / p.y.shape[0]
        if p.w is None
        else torch.cat([p.mean_weights() / p.y.shape[0], p.w.new_zeros(n - p.y.shape[0])])
        for p in parts
    ])
    stacked = Split(
        torch.stack([_padded(p.Z, n) for p in parts]),
        torch.stack([_padded(p.y, n) for p in parts]),
        None if parts[0].X is None else torch.stack([_padded(p.X, n) for p in parts]),
    )
    return stacked, w


def make_fold_problems(
    agg: Aggregator,
    ctx: AggregationContext,
    folds: list[tuple[Split, Split]],
    space: HyperSpace,
) -> tuple[BilevelProblem, Callable, list[tuple[ParamPacker, Params]]]:
    """The cross-fitting folds' problems as one problem that shares ``h``.

    The loss is ``sum_k L_k(theta_k, h)`` (and ``sum_k Q_k``) as in
    :func:`~aggregators.hypergrad.stack_problems`. When the folds' parameters
    and buffers have the same shapes (every aggregator whose training loss
    has no :meth:`~Aggregator.data_penalty`), the folds' rows are padded to
    one length and the per-fold losses are evaluated by one ``torch.vmap``
    over the fold axis: one forward and one backward graph for all folds
    instead of one per fold, which is most of the time per gradient on small
    problems. The batched losses are checked against the folds' own losses
    (value and gradient) at the start, and anything that does not batch
    falls back to the fold-by-fold sum.

    Returns
    -------
    problem : BilevelProblem
        Blocks: one per fold.
    split : callable
        ``split(theta)`` returns the folds' parameter vectors.
    parts : list of (ParamPacker, dict)
        Each fold's parameter packer and buffers.
    """
    problems, parts = [], []
    charge = unseen_error_charge(agg, ctx.task, sum(int(va.y.shape[0]) for _, va in folds))
    for train, val in folds:
        prob, packer, buffers = make_problem(
            agg, ctx, train, val, space, analytic=False, charge=charge
        )
        problems.append(prob)
        parts.append((packer, buffers))
    joint, split = stack_problems(problems)
    closed_form = len({(tuple(p.names), tuple(p.shapes)) for p, _ in parts}) == 1

    def attach() -> str:
        # Weights as the losses use them: each fold's a weighted mean.
        def rows(part: Split):
            w = part.mean_weights()
            n = part.y.shape[0]
            return part.Z, part.X, part.y, (part.Z.new_ones(n) if w is None else w) / n
        return _attach(joint, agg, ctx, space, parts[0][0], [
            (buffers, rows(train), rows(val)) for (train, val), (_, buffers) in zip(folds, parts)
        ], charge=charge, low_precision=True)

    # LearnedWeights' closed form answers every loss and derivative the engine
    # asks of the folds: where it attaches, batching their autograd losses (and
    # checking the batch against them) is work that nothing would use.
    attach_first = closed_form and getattr(agg, "convex_mixture", False)
    if attach_first and attach() == "":
        return joint, split, parts
    if len(folds) > 1:
        batched = _batched_problem(agg, ctx, folds, space, parts, joint, charge)
        if batched is not None:
            joint = batched
    if closed_form and not attach_first:
        attach()
    return joint, split, parts


def make_acv_problem(
    agg: Aggregator,
    ctx: AggregationContext,
    full: Split,
    fold_ids: torch.Tensor,
    space: HyperSpace,
    method: str = "ns",
) -> tuple[BilevelProblem, ParamPacker, Params, Callable]:
    """The approximate cross-validation problem that stands in for :func:`make_fold_problems`.

    One inner problem on all rows (the same training loss as
    :func:`make_problem` on ``full``) and, as outer loss, the approximate
    cross-fitted validation loss of
    :func:`~aggregators.hypergrad.acv_problem`: each fold's solution is one
    Newton step (``method="ns"``; ``"ij"``: with the full-data Hessian) from
    the full-data optimum on that fold's training loss, a weighted mean over
    the fold's training rows plus the penalty, as the exact folds minimise
    (``normalize="fold"``). The value is the sum over folds of each fold's
    weighted mean validation loss (``reduction="folds"``), as the stacked
    fold problems return, so dividing by the number of folds gives the same
    mean validation loss.

    The fold Hessians are dense ``p x p`` matrices, their graph kept for the
    hypergradient (third derivatives). For an aggregation function linear
    in its parameters (:meth:`~Aggregator.linear_design`, stacking) they
    come from the loss's Hessians in the predictions in one pass over the
    rows (:func:`~aggregators.hypergrad.linear_acv_problem`); otherwise by
    differentiating the forward pass twice per parameter
    (:func:`~aggregators.hypergrad.acv_problem`), practical up to a few
    hundred parameters.

    Buffers (:meth:`~Aggregator.fit_buffers`) are computed once on all rows
    and shared by the folds; exact cross-fitting computes them on each
    fold's training rows, so the two differ for aggregation functions whose
    buffers are statistics of the rows.

    Parameters
    ----------
    agg : Aggregator
    ctx : AggregationContext
    full : Split
        All tuning rows.
    fold_ids : Tensor of shape (n_rows,)
        Integer fold of each row's validation set (``0 .. K-1``).
    space : HyperSpace
    method : {"ns", "ij"}, default="ns"

    Returns
    -------
    problem : BilevelProblem
    packer : ParamPacker
    buffers : dict
        Computed from all rows.
    fold_params : callable
        ``fold_params(theta, u)``: the folds' approximate solutions, shape
        ``(K, n_params)``, from the full-data optimum ``theta``.

    Raises
    ------
    ValueError
        When the aggregation function adds a :meth:`~Aggregator.data_penalty`
        to its training loss: statistics over each fold's own rows that one
        Newton step from the full-data fit does not see.
    """
    agg.bind(ctx)
    buffers = agg.fit_buffers(ctx, full.Z, full.y, full.X)
    init = agg.init_params(ctx, full.Z, full.y, full.X)
    packer = ParamPacker(init)
    if agg.data_penalty({**init, **buffers}, space.values(space.initial()), full.Z, full.X) \
            is not None:
        raise ValueError(
            f"{type(agg).__name__} adds a data_penalty to its training loss, which "
            "approximate cross-validation cannot carry to the folds; use cv_mode='exact'."
        )

    options = dict(weights=full.w, method=method, normalize="fold")
    design = agg.linear_design(buffers, full.Z, full.X)
    if design is not None:
        shape = (design.shape[1], ctx.n_outputs)

        def loss(z, u):
            return row_losses(ctx.task, z, full.y)

        def shaped_penalty(t, u):
            return agg.penalty(packer.unflatten(t.reshape(-1)), space.values(u))

        problem = linear_acv_problem(
            design, loss, packer.flatten(init).reshape(shape), fold_ids,
            penalty=shaped_penalty, reduction="folds", **options,
        )

        def linear_fold_params(theta, u):
            return linear_acv_fold_params(
                design, theta.reshape(shape), u, loss, fold_ids, penalty=shaped_penalty,
                **options,
            ).reshape(-1, theta.numel())

        return problem, packer, buffers, linear_fold_params

    def row_loss(theta, u):
        params = {**packer.unflatten(theta), **buffers}
        return row_losses(ctx.task, agg.forward(params, space.values(u), full.Z, full.X), full.y)

    def penalty(theta, u):
        return agg.penalty(packer.unflatten(theta), space.values(u))

    options["penalty"] = penalty
    problem = acv_problem(
        row_loss, packer.flatten(init), fold_ids, reduction="folds", **options
    )

    def fold_params(theta, u):
        return acv_fold_params(row_loss, theta, u, fold_ids, **options)

    return problem, packer, buffers, fold_params


def make_linear_cv_problem(
    agg: Aggregator,
    ctx: AggregationContext,
    full: Split,
    splits: list[tuple[np.ndarray, np.ndarray]],
    space: HyperSpace,
    *,
    check: bool = True,
    like: "LinearSolutions | None" = None,
) -> tuple[BilevelProblem | None, Callable | None, list[tuple[ParamPacker, Params]], str]:
    """Exact cross-fitting in closed form, where the training loss is a quadratic.

    A regressor whose aggregation function is linear in its parameters
    (:meth:`~Aggregator.linear_design`: stacking on one target), trained on
    squared loss with a penalty quadratic in its parameters and no
    :meth:`~Aggregator.data_penalty`, has each split's fit in closed form
    (:func:`~aggregators.hypergrad._acv_linear.linear_kfold_problem`): the
    same fits, validation loss and hypergradient as the iterative folds of
    :func:`make_fold_problems`, for one batched ``p x p`` factorisation per
    outer step. Buffers are computed on each split's training rows, as the
    iterative folds do, so each split has its own design.

    Parameters
    ----------
    agg, ctx, space
    full : Split
        All tuning rows.
    splits : list of (train, validation) row indices
    check : bool, default=True
        Check that the forward pass is the design and the penalty a quadratic
        (``False``: known already, as for the refit after tuning).
    like : LinearSolutions, default=None
        With ``check=False``: the solutions of a problem on the same function
        and hyperparameters, whose penalty's form is reused (not probed again).

    Returns
    -------
    problem : BilevelProblem or None
        ``None`` where the closed form does not apply; the problem has no
        inner parameters (the fits are its outer loss's business).
    solutions : LinearSolutions or None
        ``solutions(u)``: the splits' flat parameters, ``(K, n_params)``.
    parts : list of (ParamPacker, dict)
        Each split's packer and buffers (empty when ``problem`` is ``None``).
    reason : str
        Why the closed form applies, or why not.
    """
    name = type(agg).__name__
    if ctx.task != "regression":
        return None, None, [], "the training loss (cross-entropy) is not quadratic"
    if any(va is None for _, va in splits):
        return None, None, [], "there is no validation split"
    agg.bind(ctx)
    n, K = full.y.shape[0], len(splits)
    h0 = space.initial()
    hyper0 = space.values(h0)
    # The base class's data_penalty is None: no need to ask it per split.
    own_data_penalty = type(agg).data_penalty is not Aggregator.data_penalty
    designs, parts, design = [], [], None
    train_rows, val_rows = np.zeros((K, n)), np.zeros((K, n))
    device = full.Z.device
    for k, (tr, va) in enumerate(splits):
        rows = full.take(torch.as_tensor(tr, device=device))
        if full.w is not None:  # the iterative folds' error for a weightless split
            rows.mean_weights()
            full.take(torch.as_tensor(va, device=device)).mean_weights()
        buffers = agg.fit_buffers(ctx, rows.Z, rows.y, rows.X)
        init = agg.init_params(ctx, rows.Z, rows.y, rows.X)
        packer = ParamPacker(init)
        if own_data_penalty and agg.data_penalty(
            {**init, **buffers}, hyper0, rows.Z, rows.X
        ) is not None:
            return None, None, [], f"{name} adds a data_penalty (not a quadratic loss)"
        # The design reads the split's rows only through its buffers: without
        # any, every split has the same one.
        if buffers or design is None:
            design = agg.linear_design(buffers, full.Z, full.X)
            if design is None:
                return None, None, [], (
                    f"{name} has no single linear design (several targets, each with "
                    "its own coefficients, or not linear in its parameters)"
                )
        if design.shape[1] != sum(packer.sizes):
            return None, None, [], f"{name}'s linear design does not match its parameters"
        train_rows[k, tr] = 1.0
        val_rows[k, va] = 1.0
        designs.append(design)
        parts.append((packer, buffers))
    w = full.w if full.w is not None else full.Z.new_ones(n)
    train = torch.as_tensor(train_rows, dtype=w.dtype, device=device) * w
    val = torch.as_tensor(val_rows, dtype=w.dtype, device=device) * w
    packer, buffers = parts[0]
    p = designs[0].shape[1]

    def penalty(theta, u):
        return agg.penalty(packer.unflatten(theta), space.values(u))

    # The design must be what the forward pass computes (checked at a random
    # point), and the penalty a quadratic: then each fit is one linear solve.
    dtype, device = full.Z.dtype, full.Z.device
    if not check:
        if like is not None:  # the checks made for the splits hold here
            return _closed_form(
                designs, full, n, train, val, penalty, like.penalty_kind, parts, "",
                like.penalty_terms, space,
            )
        kind = quadratic_penalty_kind(penalty, p, [h0], dtype=dtype, device=device)
        return _closed_form(designs, full, n, train, val, penalty, kind, parts, "", None, space)
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(p, generator=gen, dtype=torch.float64).to(full.Z.dtype).to(full.Z.device)
    out = agg.forward({**packer.unflatten(probe), **buffers}, hyper0, full.Z, full.X)
    # Tolerances scale with the precision: float32 rounds at ~1e-7.
    tol = max(1e-8, 100 * torch.finfo(full.Z.dtype).eps)
    if out.reshape(n, -1).shape[1] != 1 or not torch.allclose(
        out.reshape(-1), designs[0] @ probe, rtol=tol, atol=tol
    ):
        return None, None, [], f"{name}'s forward pass is not its linear design"
    # Checked at the start and at the box's ends (where their ends are finite).
    hs = _check_points(space)
    # A penalty affine in its tuned values with a diagonal Hessian (an L2 weight
    # per coefficient) is read off once, and that check at hs is the same test
    # quadratic_penalty_kind makes; any other is probed by it as before.
    values, as_hyper, n_values = _tuned_values(space)

    def penalty_v(theta, v):
        return agg.penalty(packer.unflatten(theta), as_hyper(v))

    terms = linear_penalty_terms(
        penalty_v, values, p, n_values, hs, diagonal=True, dtype=dtype, device=device, rtol=tol
    )
    if terms is not None:
        kind = "diagonal"
    else:
        kind = quadratic_penalty_kind(penalty, p, hs, dtype=dtype, device=device, rtol=tol)
        if kind is None:
            return None, None, [], f"{name}'s penalty is not quadratic in its parameters"
        if kind == "dense":
            terms = linear_penalty_terms(
                penalty_v, values, p, n_values, hs, dtype=dtype, device=device, rtol=tol
            )
    return _closed_form(designs, full, n, train, val, penalty, kind, parts, (
        f"{name} is linear in its {p} parameters with squared loss and a quadratic "
        "penalty: each split's fit in closed form"
    ), terms, space)


def _tuned_values(space: HyperSpace):
    """``(values, as_hyper, n)``: the tuned hyperparameters' values as one vector.

    ``values(u)`` is what :meth:`HyperSpace.values` gives the tuned entries
    (``exp`` of the log-scaled ones), concatenated; ``as_hyper(v)`` the dict
    the aggregation function takes, the fixed ones included.
    """
    sizes = [(s.name, s.size) for s in space.tuned]
    n = sum(size for _, size in sizes)

    def values(u: torch.Tensor) -> torch.Tensor:
        vals = space.values(u)
        return torch.cat([vals[name] for name, _ in sizes]) if sizes else u[:0]

    def as_hyper(v: torch.Tensor) -> Params:
        out, off = dict(space.constants), 0
        for name, size in sizes:
            out[name] = v[off : off + size]
            off += size
        return out

    return values, as_hyper, n


@dataclass(frozen=True)
class LinearSolutions:
    """``u -> (K, n_params)``: the splits' closed-form fits, and the penalty's form.

    ``penalty_kind`` (``"diagonal"`` or ``"dense"``) and ``penalty_terms``
    (see :func:`~aggregators.hypergrad._acv_linear.linear_penalty_terms`) let
    the fit on all rows skip the checks that found them.
    """

    fits: Callable[[torch.Tensor], torch.Tensor]
    penalty_kind: str
    penalty_terms: Callable | None = None

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.fits(u)


def _closed_form(designs, full, n, train, val, penalty, kind, parts, reason, terms, space):
    D = torch.stack(designs)
    problem, fits = _kfold(D, full.y.reshape(n), train, val, penalty, kind, terms, space)
    return problem, LinearSolutions(fits, kind, terms), parts, reason


def _kfold(D, y, train, val, penalty, kind, terms, space):
    """:func:`~aggregators.hypergrad._acv_linear.linear_kfold_problem`, its
    outer step and (without a graph to follow) its fits served by
    :class:`_HostKFold` where that applies, else by the torch versions; the
    choice is made at the first use (the refit's problem, never used, pays
    for neither)."""
    problem, solutions = linear_kfold_problem(
        D, y, train, val, penalty, diagonal_penalty=kind == "diagonal", reduction="folds",
        penalty_terms=terms,
    )
    chosen: list = []

    def host() -> "_HostKFold | None":
        if not chosen:
            chosen.append(_HostKFold.make(D, y, train, val, terms, space))
            value_grads.on_host = chosen[0] is not None  # for tests: which one serves
        return chosen[0]

    def fits(u: torch.Tensor) -> torch.Tensor:
        h = host() if not u.requires_grad else None
        return solutions(u) if h is None else h.fits(u)

    torch_value_grads: list = []

    def value_grads(theta, u):
        h = host()
        if h is not None:
            return h.value_grads(theta, u)
        if not torch_value_grads:
            torch_value_grads.append(_kfold_value_hypergrad(D, y, train, val, terms))
        return torch_value_grads[0](theta, u)

    value_grads.on_host = None  # not chosen yet
    if terms is not None:
        problem.outer_value_grads = value_grads
    return problem, fits


def _host_values(space: HyperSpace) -> Callable | None:
    """``u -> (v, dv/du)`` in numpy: the tuned values of :func:`_tuned_values` and
    their derivative: ``c exp(u)`` for log-scaled entries, else ``c u``, with
    each entry's factor ``c`` (1, or the penalty weights' factor of a
    :meth:`HyperSpace.rescaled` space) read off at ``u = 0`` and ``u = 0.5``.

    ``None`` unless that also matches :meth:`HyperSpace.values` at ``u = -0.7``
    (a space that maps ``u`` otherwise keeps autograd). Found once per space
    (the splits' problem and the fit on all rows share it).
    """
    if space in _HOST_VALUES:
        return _HOST_VALUES[space]
    log = np.concatenate(
        [np.full(s.size, bool(s.log)) for s in space.tuned] or [np.zeros(0, dtype=bool)]
    )
    values = _tuned_values(space)[0]

    def at(shift: float) -> np.ndarray:
        u = torch.full(log.shape, shift, dtype=space.dtype, device=space.device)
        return values(u).detach().cpu().numpy().astype(np.float64)

    want0, want1 = at(0.0), at(0.5)
    c = np.where(log, want0, 2.0 * want1) if want0.shape == log.shape else None

    def host(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = c * np.where(log, np.exp(np.where(log, u, 0.0)), u)
        return v, np.where(log, v, c)

    def all_log(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = c * np.exp(u)  # every entry log-scaled (an L2 weight per model)
        return v, v

    host = all_log if log.all() else host
    if c is None or not all(
        np.all(np.abs(host(np.full(log.shape, shift))[0] - want) <= 1e-12 * np.abs(want))
        for shift, want in ((0.0, want0), (0.5, want1), (-0.7, at(-0.7)))
    ):
        host = None
    _HOST_VALUES[space] = host
    return host


#: :func:`_host_values` by space, for as long as the space lives.
_HOST_VALUES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _HostKFold:
    """The closed-form K-fold problem in numpy on the host: the splits' fits,
    and :func:`_kfold_value_hypergrad`'s value and adjoint hypergradient.

    For CPU tensors and penalty terms affine in the tuned values with a
    diagonal ``R`` (an L2 weight per coefficient: ``terms.table``, see
    :func:`~aggregators.hypergrad._acv_linear.linear_penalty_terms`), the
    terms' derivative in ``u`` by hand (``slopes`` times ``dv/du``) instead of
    an autograd graph: on a stacking meta-learner's few coefficients an outer
    step is a few dozen tiny operations, and torch's fixed cost per operation
    (and autograd's per graph) was most of it. Use :meth:`make`.
    """

    def __init__(self, D, y, train, val, base, slopes, host_values):
        self.base, self.slopes, self.host_values = base, slopes, host_values
        Dn, yn, tr, va = (t.detach().numpy() for t in (D, y, train, val))
        K, _, p = Dn.shape
        self.p = p
        # One design for every split where they are the same (no buffers).
        same = all(np.array_equal(Dn[0], Dn[k]) for k in range(1, K))
        self.D = Dn[0] if same else Dn
        trn = tr / tr.sum(1)[:, None]
        # Each split's D^T diag(t_k) / sum t_k, then its moments by matmul.
        Dt = trn[:, None, :] * (self.D.T if same else Dn.transpose(0, 2, 1))
        gram = Dt @ (self.D if same else Dn)
        self.gram2 = gram + gram.transpose(0, 2, 1)  # 2 G_k, symmetric to the last bit
        self.moment2 = 2.0 * (Dt @ yn)
        self.val_share, self.y = va / va.sum(1)[:, None], yn

    @classmethod
    def make(cls, D, y, train, val, terms, space) -> "_HostKFold | None":
        """One, or ``None`` where it does not apply (the torch versions then serve)."""
        table = getattr(terms, "table", None)
        if table is None or not table[2] or D.device.type != "cpu" or space is None:
            return None
        host_values = _host_values(space)
        if host_values is None:
            return None
        base, slopes = (t.detach().numpy() for t in table[:2])
        return cls(D, y, train, val, base, slopes, host_values)

    def _solve(self, u: torch.Tensor):
        v, dv = self.host_values(u.detach().cpu().numpy())
        flat = self.base + self.slopes @ v
        A = self.gram2 + np.diag(flat[: self.p])
        try:
            np.linalg.cholesky(A)  # strictly convex fits, as the torch version asks
        except np.linalg.LinAlgError as e:
            raise InnerDivergenceError(
                "the training loss of a split is not strictly convex at these "
                "hyperparameters (its Gram matrix plus penalty is singular)."
            ) from e
        thetas = np.linalg.solve(A, (self.moment2 - flat[self.p:])[..., None])[..., 0]
        return A, thetas, dv

    def fits(self, u: torch.Tensor) -> torch.Tensor:
        """The splits' flat parameters at ``u``, ``(K, p)`` (no graph)."""
        return torch.from_numpy(self._solve(u)[1]).to(u.dtype)

    def value_grads(self, theta, u):
        A, thetas, dv = self._solve(u)
        D, y = self.D, self.y
        if D.ndim == 2:
            resid = thetas @ D.T - y  # (K, n)
            weighted = self.val_share * resid
            adj = weighted @ D
        else:
            resid = np.einsum("kij,kj->ki", D, thetas) - y
            weighted = self.val_share * resid
            adj = np.einsum("kij,ki->kj", D, weighted)
        value = float((weighted * resid).sum())
        # Half the adjoint: lambda_k / 2 = A_k^{-1} D_k^T (v_k * resid_k) / sum v_k.
        half = np.linalg.solve(A, adj[..., None])[..., 0]
        # d/du of -(sum_k lambda_k^T diag(d) theta_k + lambda_k^T r): d and r are
        # base + slopes @ v, so the derivative in v is one product with slopes.
        d_flat = -2.0 * np.concatenate([np.einsum("kj,kj->j", half, thetas), half.sum(0)])
        grad = (d_flat @ self.slopes) * dv
        return (
            torch.from_numpy(np.array(value, dtype=self.base.dtype)).to(u.dtype),
            theta.new_zeros(theta.shape),
            torch.from_numpy(np.asarray(grad, dtype=self.base.dtype)).to(u.dtype),
        )


def _kfold_value_hypergrad(
    D: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    terms: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(theta, u) -> (Q, dQ/dtheta, dQ/du)`` of the closed-form K-fold problem
    (:func:`~aggregators.hypergrad._acv_linear.linear_kfold_problem`, summed over
    the splits), its penalty's terms ``u -> (R, r)`` given.

    The same fits and loss as its ``outer_loss`` (to round-off), and the
    hypergradient by the adjoint: with ``A_k theta_k = 2 b_k - r`` and
    ``lambda_k = A_k^{-1} dQ_k/dtheta_k``, ``dQ/du = -sum_k lambda_k^T
    (dA/du theta_k + dr/du)``. Autograd then runs through the penalty's terms
    alone, not through the factorisation and the residuals of every row, whose
    graph dominates an outer step on a stacking meta-learner's few coefficients.
    ``theta`` is empty (the problem has no inner parameters).
    """
    moments: list = []  # formed at the first call: the refit's problem never calls

    def value_grads(theta, u):
        if not moments:
            w_tr = train.sum(1)
            gram = torch.einsum("ki,kij,kil->kjl", train, D, D) / w_tr[:, None, None]
            moments.extend([
                gram + gram.transpose(1, 2),  # 2 G_k, symmetric to the last bit
                2.0 * torch.einsum("ki,kij,i->kj", train, D, y)[..., None] / w_tr[:, None, None],
                D.transpose(1, 2), (val / val.sum(1)[:, None])[..., None], y[:, None],
            ])
        gram2, moment2, Dt, val_share, y1 = moments
        with torch.enable_grad():  # the terms' graph, for the derivative in u below
            uu = u.detach().requires_grad_(True)
            R_graph, r_graph = terms(uu)
        with torch.no_grad():
            R, r = R_graph.detach(), r_graph.detach()
            try:
                chol = torch.linalg.cholesky(gram2 + 0.5 * (R + R.transpose(-2, -1)))
            except torch.linalg.LinAlgError as e:
                raise InnerDivergenceError(
                    "the training loss of a split is not strictly convex at these "
                    "hyperparameters (its Gram matrix plus penalty is singular)."
                ) from e
            thetas = torch.cholesky_solve(moment2 - r[..., None], chol)  # (K, p, 1)
            resid = torch.bmm(D, thetas) - y1
            weighted = val_share * resid
            value = (weighted * resid).sum()
            # Half the adjoint: lambda_k / 2 = A_k^{-1} D_k^T (v_k * resid_k) / sum v_k.
            half = torch.cholesky_solve(torch.bmm(Dt, weighted), chol)[..., 0]
            # d/du of sum_k lambda_k^T sym(R) theta_k + lambda_k^T r, lambda and theta held.
            L = half.T @ thetas[..., 0]
            M, m = L + L.T, 2.0 * half.sum(0)
        with torch.enable_grad():
            s = -((M * R_graph).sum() + (m * r_graph).sum())
            grad = (
                torch.autograd.grad(s, uu, allow_unused=True)[0] if s.requires_grad else None
            )
        grad = torch.zeros_like(u) if grad is None else grad.detach()
        return value, theta.new_zeros(theta.shape), grad

    return value_grads


def linear_full_fit(
    agg: Aggregator,
    ctx: AggregationContext,
    full: Split,
    space: HyperSpace,
    u: torch.Tensor,
    *,
    like: LinearSolutions | None = None,
) -> torch.Tensor:
    """The closed-form fit on all rows at ``u`` (where :func:`make_linear_cv_problem`
    applies), flat in the packer's order: the refit's starting point.

    ``like``: the splits' solutions, whose penalty checks hold here too.
    """
    n = full.y.shape[0]
    design = None
    if like is not None and like.penalty_terms is not None:
        agg.bind(ctx)
        # Without buffers the design needs nothing of the rows but themselves:
        # one solve with all rows' weights, not a pass of make_linear_cv_problem.
        if not agg.fit_buffers(ctx, full.Z, full.y, full.X):
            design = agg.linear_design({}, full.Z, full.X)
    if design is not None:
        w = (full.w if full.w is not None else full.Z.new_ones(n))[None]
        _, fits = _kfold(
            design[None], full.y.reshape(n), w, w, None, like.penalty_kind,
            like.penalty_terms, space,
        )
        with torch.no_grad():
            return fits(u.detach())[0]
    idx = np.arange(n)
    _, solutions, _, _ = make_linear_cv_problem(
        agg, ctx, full, [(idx, idx)], space, check=False, like=like
    )
    with torch.no_grad():
        return solutions(u)[0].detach()


def _batched_problem(
    agg, ctx, folds, space, parts, joint, charge: float = 0.0
) -> BilevelProblem | None:
    """The vmapped version of ``joint``, or ``None`` when it does not apply.

    ``charge``: the validation rows' charge for unseen errors, as ``joint``'s
    outer losses carry it."""
    if type(agg).data_penalty is not Aggregator.data_penalty:
        return None  # statistics over each fold's own rows: padding would change them
    if sum(tr.Z.numel() + va.Z.numel() for tr, va in folds) > BATCHED_MAX_ENTRIES:
        return None
    packer = parts[0][0]
    layout = (packer.names, packer.shapes)
    buffers = [b for _, b in parts]
    keys = list(buffers[0])
    if any((p.names, p.shapes) != layout for p, _ in parts) or any(
        list(b) != keys
        or any(not isinstance(b[k], torch.Tensor) or b[k].shape != buffers[0][k].shape for k in keys)
        for b in buffers
    ):
        return None
    stacked_buffers = {k: torch.stack([b[k] for b in buffers]) for k in keys}
    train, w_train = _stacked_rows([tr for tr, _ in folds])
    val, w_val = _stacked_rows([va for _, va in folds])
    n_folds, size = len(folds), sum(packer.sizes)
    if size == 0:
        return None  # no inner parameters: nothing to solve per fold, nothing to batch
    x_dim = None if train.X is None else 0

    def fold_loss(theta, buf, Z, X, y, w, hyper, with_penalty):
        params = packer.unflatten(theta)
        out = agg.forward({**params, **buf}, hyper, Z, X)
        if with_penalty:
            return (w * row_losses(ctx.task, out, y)).sum() + agg.penalty(params, hyper)
        return (w * charged_row_losses(ctx.task, out, y, charge)).sum()

    in_dims = (0, 0, 0, x_dim, 0, 0, None)  # hyperparameters: shared by the folds
    batched_inner = torch.vmap(lambda *a: fold_loss(*a, True), in_dims=in_dims)
    batched_outer = torch.vmap(lambda *a: fold_loss(*a, False), in_dims=in_dims)

    def inner(theta, u):
        return batched_inner(
            theta.view(n_folds, size), stacked_buffers, train.Z, train.X, train.y, w_train,
            space.values(u),
        ).sum()

    def outer(theta, u):
        return batched_outer(
            theta.view(n_folds, size), stacked_buffers, val.Z, val.X, val.y, w_val,
            space.values(u),
        ).sum()

    # Hessian blocks come from a vmap (probes) over the backward of this vmap
    # (folds), which turns the folds' matmuls into copies of their rows: on
    # the CPU that pays while a fold has a few hundred (row, output) entries
    # (less overhead per fold) and costs from a few thousand (the copies
    # dominate). Above the bound the blocks come from the fold-by-fold sum.
    large = train.y.shape[1] * ctx.n_outputs > BATCHED_HESSIAN_MAX_ENTRIES
    problem = BilevelProblem(
        inner, outer, joint.theta0, blocks=joint.blocks,
        hessian_loss=joint.inner_loss if large else None,
    )
    # Same values and gradients as the fold-by-fold sum at the start, or no
    # batching. The fold-by-fold values come first, outside the try: their
    # errors are the aggregation function's own and propagate; what fails
    # only under vmap (a forward pass that does not batch) means no batching.
    u0 = space.initial()
    with torch.enable_grad():
        th = joint.theta0.detach().clone().requires_grad_(True)
        ref = [joint.inner_loss(th, u0), joint.outer_loss(th, u0)]
        ref_grads = [torch.autograd.grad(a, th)[0] for a in ref]
        try:
            got = [problem.inner_loss(th, u0), problem.outer_loss(th, u0)]
            got_grads = [torch.autograd.grad(b, th)[0] for b in got]
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            if is_out_of_memory(e):
                raise
            return None
    for a, b, ga, gb in zip(ref, got, ref_grads, got_grads):
        scale = 1e-8 if a.dtype == torch.float64 else 1e-4
        if not (
            torch.allclose(a, b, rtol=scale, atol=scale)
            and torch.allclose(ga, gb, rtol=scale, atol=scale * (1 + ga.abs().max()))
        ):
            return None
    return problem
