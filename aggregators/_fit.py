"""The fit pipeline of the aggregated estimators, as a function.

:func:`fit_aggregated` takes validated data and the estimator's parameters:
it checks what can be checked before any base model runs, asks the pool for
the base outputs once, splits the rows, hands the engine one joint bilevel
problem over the splits, and refits the aggregation parameters on all rows
with the tuned hyperparameters. It returns a :class:`FitResult`, whose
fields the estimator stores as its learned attributes (each name with a
trailing underscore).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from numbers import Integral
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import KFold, StratifiedKFold, check_cv, train_test_split
from sklearn.utils import Bunch, check_random_state

from base_models import (
    PoolFit,
    check_pool,
    fit_pool,
    resolve_device,
    resolve_dtype,
    small_problem_threads,
    to_tensor,
)

from ._base import AggregationContext, Aggregator
from ._bilevel import (
    HyperSpace,
    Split,
    linear_full_fit,
    make_acv_problem,
    make_fold_problems,
    make_linear_cv_problem,
    make_problem,
    parse_range,
    unseen_error_charge,
)
from ._registry import resolve_aggregator
from .hypergrad import HessianDecision, InnerDivergenceError, solve_inner, tune

__all__ = ["FitResult", "HypergradientWarning", "fit_aggregated"]


class HypergradientWarning(ConvergenceWarning):
    """Tuning did not go as asked: it stopped early (an inner solve diverged; the
    last good point is kept), or the engine had to fall back to first-order
    methods (the loss lacks the second derivatives Newton steps need)."""


@dataclass
class FitResult:
    """What one fit learns; the estimator stores each field as ``<name>_``.

    See the Attributes of :class:`~aggregators.AggregatedClassifier` for
    their meaning.
    """

    device: torch.device
    base_models: dict
    estimators: list
    named_estimators: Bunch
    fitted_inside: list
    aggregator: Any
    hyperparams: dict
    tuning_history: pd.DataFrame
    tuning_time: float
    validation_loss: float
    n_iter: int
    last_routing: pd.Series
    fold_aggregators: list = field(default_factory=list)

    def items(self):
        """``(name, value)`` of every field."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


def _first_order_reason(agg) -> str | None:
    """Why the engine keeps to first-order methods for ``agg``, as it declares, or ``None``.

    Newton steps and exact Hessian blocks need second derivatives that cost
    little more than a gradient (``second_order``) and a loss without kinks
    (``smooth``): a quadratic model is wrong at a kink, where Newton's line
    search stalls.
    """
    name = type(agg).__name__
    if not getattr(agg, "second_order", True):
        return f"{name} declares second_order = False (its second derivatives are dear)"
    if not getattr(agg, "smooth", True):
        return f"{name} declares smooth = False (its training loss has kinks)"
    return None


def _inner_solver(agg) -> str:
    """The engine's inner solver for an aggregation function (see :func:`_first_order_reason`)."""
    return "auto" if _first_order_reason(agg) is None else "lbfgs"


def _declare_first_order(agg, problem) -> None:
    """Record on ``problem`` that it keeps to first-order methods, when ``agg`` declares it."""
    reason = _first_order_reason(agg)
    if reason is not None:
        problem.hessian = HessianDecision(False, reason)


def _tuner_options(agg, tuner: str, options: dict | None, cv_solver: str) -> dict | None:
    """The tuner's options: the user's, over the aggregation function's own
    defaults for the method (``hoag_eps0``, ``hoag_decay`` and ``hoag_min_tol``
    for ``"hoag"``), which serve exact cross-fitting by iterative fold solves
    (``cv_solver="iterative"``) only: approximate cross-validation's values are
    extrapolated from one full-data solve, whose error a looser solve adds to."""
    own = {k: getattr(agg, f"hoag_{k}", None) for k in ("eps0", "decay", "min_tol")}
    own = {k: v for k, v in own.items() if v is not None}
    if tuner != "hoag" or not own or cv_solver != "iterative":
        return options
    return {**own, **(options or {})}


class _Progress:
    """Prints one line per outer step (``verbose > 0``).

    The engine sums the validation loss over the cross-fitting folds; the line
    shows the mean, the number ``validation_loss_`` and ``tuning_history_`` give.
    """

    def __init__(self, n_folds: int):
        self.step = 0
        self.n_folds = n_folds

    def __call__(self, entry: dict) -> None:
        loss = entry["outer_loss"] / self.n_folds
        print(
            f"[hyperagg] step {self.step}: validation loss {loss:.6g}  "
            f"|hypergrad| {entry['hypergrad_norm']:.3g}  inner iters "
            f"{entry['inner_iter']}  {entry['seconds']:.3f}s",
            flush=True,
        )
        self.step += 1


def make_splits(n: int, y_strat, seed: int, cv, validation_fraction: float) -> list[tuple]:
    """``(train, validation)`` row indices of the tuning splits.

    ``cv=None``: one split with ``validation_fraction`` of the rows for
    validation (stratified where every class allows it); an int: shuffled
    (stratified) folds; anything else goes through ``check_cv``.
    """
    idx = np.arange(n)
    if cv is None:
        try:
            tr, va = train_test_split(
                idx, test_size=validation_fraction, random_state=seed, stratify=y_strat
            )
        except ValueError:  # a class too rare to stratify on
            tr, va = train_test_split(idx, test_size=validation_fraction, random_state=seed)
        return [(tr, va)]
    if isinstance(cv, Integral):
        if y_strat is not None and np.bincount(y_strat).min() >= cv:
            splitter = StratifiedKFold(cv, shuffle=True, random_state=seed)
        else:
            splitter = KFold(cv, shuffle=True, random_state=seed)
    else:
        splitter = check_cv(cv, y_strat, classifier=y_strat is not None)
    return list(splitter.split(np.zeros((n, 1)), y_strat))


#: Rows that ``max_tuning_rows="auto"`` tunes the hyperparameters on, of a
#: larger aggregation set. The cross-fitted validation loss on this many rows
#: resolves the hyperparameters' effect on the loss well below the gains that
#: tuning brings, while the tuning's cost stops growing with the rows: the
#: fit on all rows then costs about one untuned fit, warm-started.
AUTO_TUNING_ROWS = 10_000


def tuning_row_limit(max_tuning_rows) -> int | None:
    """The estimator's ``max_tuning_rows`` as a number of rows (``None``: no limit)."""
    if max_tuning_rows is None:
        return None
    return AUTO_TUNING_ROWS if isinstance(max_tuning_rows, str) else int(max_tuning_rows)


def tuning_rows(
    max_tuning_rows, cv, n: int, y_strat, seed: int
) -> np.ndarray | None:
    """The rows the hyperparameters are tuned on: ``None`` for all ``n``, else
    a sorted index array of (about) ``max_tuning_rows`` of them.

    Drawn at random with ``seed``; for classifiers stratified by class, each
    class keeping its share of the rows but at least as many as the folds
    (or all of its rows, if fewer), so that every class is in every fold
    where it was on all rows. Only with ``cv`` an int or ``None``: the
    splits of a splitter or an iterable the user gave refer to all rows.
    """
    m = tuning_row_limit(max_tuning_rows)
    if m is None or n <= m:
        return None
    auto = isinstance(max_tuning_rows, str)
    if cv is not None and not isinstance(cv, Integral):
        if auto:
            return None
        raise ValueError(
            f"max_tuning_rows={m} subsamples the rows for tuning, which only an int "
            f"cv (or cv=None) allows: the splits of cv={cv!r} refer to all "
            f"{n} rows. Use max_tuning_rows=None or an int cv."
        )
    n_folds = 2 if cv is None else int(cv)
    if m < 2 * n_folds:
        raise ValueError(
            f"max_tuning_rows={m} is too few rows to tune on with cv={cv!r}: give "
            f"at least {2 * n_folds}, or None to tune on all rows."
        )
    rng = np.random.default_rng(seed)
    if y_strat is None:
        return np.sort(rng.choice(n, m, replace=False))
    take = []
    for c in np.unique(y_strat):
        rows = np.flatnonzero(y_strat == c)
        k = max(int(round(m * rows.size / n)), min(rows.size, n_folds))
        take.append(rng.choice(rows, min(k, rows.size), replace=False))
    return np.sort(np.concatenate(take))


#: Whether exact cross-fitting solves the splits in closed form where the
#: training loss is a quadratic (:func:`make_linear_cv_problem`: regression
#: stacking on one target). ``False`` keeps the iterative inner solves, which
#: give the same fits (the tests compare the two).
LINEAR_CLOSED_FORM = True

#: Most parameters for which ``cv_mode="auto"`` picks approximate cross-validation.
#: Its fold Hessians are dense ``p x p`` matrices, formed (without a
#: :meth:`~Aggregator.linear_design`) by ``K p`` backward passes per outer
#: evaluation and their double backward for the hypergradient: beyond a few
#: hundred parameters that costs more than the exact folds' inner solves it
#: replaces. And one Newton step is a worse stand-in for a fold's fit the
#: closer the parameters come to the fold's rows in number.
ACV_MAX_PARAMS = 200

#: Rows per parameter from which ``cv_mode="auto"`` also takes approximate
#: cross-validation for an aggregation function linear in its parameters
#: with up to :data:`ACV_LARGE_N_MAX_PARAMS` parameters. One Newton step from
#: the full fit is nearly a fold's fit when the fold's rows outnumber the
#: parameters by far, and its fold Hessians (one pass over the rows) then
#: cost less than the exact folds' iterative inner solves on the same rows.
ACV_LARGE_N_ROWS_PER_PARAM = 200

#: Most parameters for the large-``n`` rule above: the fold Hessians take
#: ``n p^2`` products against the exact folds' ``n p`` per inner iteration,
#: so beyond a few hundred parameters they cost more whatever ``n``.
ACV_LARGE_N_MAX_PARAMS = 400


def acv_fold_ids(splits: list[tuple], n: int) -> np.ndarray | None:
    """Each row's validation fold, or ``None`` when the splits are not a partition.

    Approximate cross-validation describes fold ``k`` by the rows it holds
    out: its training rows must be all the others. Splits whose validation
    sets overlap (repeated or shuffled splits) or whose training and
    validation rows leave some out have no such description.
    """
    ids = np.full(n, -1, dtype=np.int64)
    for k, (tr, va) in enumerate(splits):
        if va is None or len(tr) + len(va) != n or np.union1d(tr, va).size != n:
            return None
        if (ids[va] >= 0).any():
            return None
        ids[va] = k
    return ids


def _cv_mode(
    mode: str, agg, ctx, full: Split, space: HyperSpace, splits: list[tuple]
) -> tuple[str, str]:
    """The cross-fitting used for ``cv_mode``: ``("exact" | "approx", why)``.

    ``"approx"`` asked for where it cannot apply (a single split, splits
    that are not a partition, a kinked or row-statistics training loss) is
    a ``ValueError``, except for ``cv=None``, which is always exact: one
    split costs one inner solve already.
    """
    if mode == "exact":
        return "exact", "cv_mode='exact'"
    if len(splits) < 2:
        return "exact", "a single validation split (cv=None) is solved exactly"
    name = type(agg).__name__
    agg.bind(ctx)
    buffers = agg.fit_buffers(ctx, full.Z, full.y, full.X)
    init = agg.init_params(ctx, full.Z, full.y, full.X)
    n_params = sum(int(v.numel()) for v in init.values())
    data_penalty = agg.data_penalty(
        {**init, **buffers}, space.values(space.initial()), full.Z, full.X
    )
    # Reasons that rule it out even when asked for: a Newton step from the
    # full-data fit says nothing at a kink, nor of statistics of a fold's rows.
    if acv_fold_ids(splits, full.y.shape[0]) is None:
        reason = "the cv splits are not a partition of the rows into validation folds"
    elif not getattr(agg, "smooth", True):
        reason = f"{name} declares smooth = False (a Newton step is wrong at a kink)"
    elif data_penalty is not None:
        reason = f"{name} adds a data_penalty (statistics over each fold's own rows)"
    elif unseen_error_charge(agg, ctx.task, full.y.shape[0]):
        reason = (f"{name} charges its validation rows for unseen errors, which one "
                  "Newton step's shared row losses do not")
    else:
        reason = None
    if reason is not None:
        if mode == "approx":
            raise ValueError(
                f"cv_mode='approx' cannot be used here: {reason}; use cv_mode='exact' "
                "or 'auto'."
            )
        return "exact", reason
    if mode == "approx":
        return "approx", "cv_mode='approx'" + (
            " (the buffers are computed on all rows, not on each fold's)" if buffers else ""
        )
    # "auto": only where the approximation is as accurate as it is cheap.
    if not getattr(agg, "second_order", True):
        return "exact", f"{name} declares second_order = False (its Hessians are dear)"
    if buffers:
        return "exact", f"{name} computes buffers from each fold's training rows"
    # Linear in its parameters with a convex loss, a fold's fit is close to one
    # Newton step from the full fit (leave-one-out's classical setting). A
    # nonlinear one (softmax weights) can be flat enough that the step
    # overshoots the fold's fit by far: bench_acv.py measures it.
    if agg.linear_design(buffers, full.Z, full.X) is None:
        return "exact", (
            f"{name} is not linear in its parameters (no linear_design): one Newton "
            "step can overshoot a fold's fit"
        )
    if n_params <= ACV_MAX_PARAMS:
        return "approx", f"{name} is linear in its {n_params} parameters, without buffers"
    n_rows = int(full.y.shape[0])
    if (n_params <= ACV_LARGE_N_MAX_PARAMS
            and n_rows >= ACV_LARGE_N_ROWS_PER_PARAM * n_params):
        return "approx", (
            f"{name} is linear in its {n_params} parameters, without buffers, and the "
            f"{n_rows} rows are at least ACV_LARGE_N_ROWS_PER_PARAM = "
            f"{ACV_LARGE_N_ROWS_PER_PARAM} per parameter"
        )
    return "exact", (
        f"{name} has {n_params} parameters, more than ACV_MAX_PARAMS = "
        f"{ACV_MAX_PARAMS} (dense fold Hessians)"
        + ("" if n_params > ACV_LARGE_N_MAX_PARAMS else
           f", and {n_rows} rows, fewer than ACV_LARGE_N_ROWS_PER_PARAM = "
           f"{ACV_LARGE_N_ROWS_PER_PARAM} per parameter")
    )


def held_and_ranged(specs, hyperparams, tune_ranges) -> dict:
    """``name -> fixed value or range`` for :class:`HyperSpace`, from the two parameters.

    ``hyperparams`` sets the policy: ``"tune"``, every hyperparameter tuned
    within its declared bounds; ``"fixed"``, none; a dict, the named ones
    fixed or ranged and the rest tuned. ``tune_ranges`` (``None`` or a dict
    of ranges) then tunes each hyperparameter it names within its range,
    whatever ``hyperparams`` said of that one, and leaves every other one
    to ``hyperparams``.
    """
    init = {s.name: s.init for s in specs}
    given = dict(hyperparams) if isinstance(hyperparams, dict) else {}
    ranges = {} if tune_ranges is None else dict(tune_ranges)
    known = set(init)
    unknown = sorted(set(ranges) - known)
    if unknown:
        raise ValueError(
            f"tune_ranges names {unknown} that the aggregator does not have; its "
            f"hyperparameters are {sorted(known)}."
        )
    for name, value in ranges.items():
        if parse_range(value) is None:
            raise ValueError(
                f"tune_ranges[{name!r}] must be a range, (low, high, 'log'|'linear'), "
                f"scipy.stats.loguniform or scipy.stats.uniform; got {value!r}. Fix a "
                "hyperparameter's value through hyperparams instead."
            )
    policy = init if hyperparams == "fixed" else given
    return {**policy, **ranges}


def _history_frame(history, space: HyperSpace, n_folds: int) -> pd.DataFrame:
    names = space.entry_names()
    if not history:  # no evaluation: the empty frame as it always was (object columns)
        return pd.DataFrame(
            [], columns=["step", "validation_loss", "hypergrad_norm", "inner_iter", "seconds",
                         *names],
        )
    H = torch.as_tensor(np.stack([e["h"] for e in history]), dtype=space.dtype,
                        device=space.device)
    values = space.flat_values(H.reshape(len(history), -1))
    # Built by columns: a frame from one dict per row costs several times more.
    columns = {
        "step": np.arange(len(history)),
        "validation_loss": np.array([e["outer_loss"] / n_folds for e in history], dtype=float),
        "hypergrad_norm": np.array([e["hypergrad_norm"] for e in history], dtype=float),
        "inner_iter": np.array([e["inner_iter"] for e in history], dtype=np.int64),
        "seconds": np.array([e["seconds"] for e in history], dtype=float),
    }
    columns.update({name: values[:, j] for j, name in enumerate(names)})
    return pd.DataFrame(columns)


def _record_hessian(history: pd.DataFrame, decision) -> None:
    """Say in ``history.attrs`` whether the engine formed exact Hessian blocks, and why.

    Warns when they were wanted (small blocks, nothing declared against
    them) but the loss lacks the second derivatives they need.
    """
    if decision is None:
        return
    history.attrs["exact_hessian"] = decision.exact
    history.attrs["exact_hessian_reason"] = decision.reason
    if decision.unavailable:
        warnings.warn(
            f"the aggregator is fitted with first-order methods (L-BFGS, conjugate "
            f"gradient) instead of Newton steps: {decision.reason}. Declare "
            "second_order = False on the aggregation function to choose them "
            "without this warning.",
            HypergradientWarning,
            stacklevel=4,
        )


def _refit(
    agg_spec, ctx, full, space, specs, h, theta0, max_iter: int, warm_is_fit=False,
    analytic_checked=False,
):
    """The aggregation function fitted on all rows at hyperparameters ``h``.

    ``warm_is_fit``: ``theta0`` is that fit already (in closed form); it is
    kept without an inner solve where its gradient meets the tolerance, as
    the solve would return it unchanged. ``analytic_checked``: the folds'
    problem got closed-form derivatives, checked against autograd there
    (the same aggregation function and context): not checked again.

    Returns the fitted aggregator and the problem (whose Hessian decision
    the history records, where the solve ran).
    """
    # A closed-form fit is kept after one gradient, which autograd gives for
    # less than checking the closed-form derivatives against it would cost;
    # they are attached only where an inner solve follows.
    final, packer, buffers = make_problem(
        agg_spec, ctx, full, None, space, analytic=not warm_is_fit,
        analytic_checked=analytic_checked,
    )
    if theta0 is None:
        theta0 = final.theta0
    tol = 1e-6  # predictions do not move below this; 1e-7 is for hypergradients
    kept = False
    if warm_is_fit:
        g = final.inner_grad(theta0, h.detach())
        kept = bool(torch.isfinite(g).all()) and bool(g.abs().max() <= tol)
        if not kept:
            final, packer, buffers = make_problem(
                agg_spec, ctx, full, None, space, analytic_checked=analytic_checked
            )
    _declare_first_order(agg_spec, final)
    try:
        if kept:
            theta, n_iter, converged = theta0, 0, True
        else:
            theta, n_iter, converged = solve_inner(
                final, h, theta0, max_iter=max_iter, tol=tol, solver=_inner_solver(agg_spec),
            )
    except InnerDivergenceError as e:
        raise ValueError(f"refitting the aggregator on all rows diverged: {e}") from e
    out_of_iterations = n_iter >= max_iter
    if not converged and (out_of_iterations or getattr(agg_spec, "smooth", True)):
        warnings.warn(
            "the final fit of the aggregator did not reach its tolerance "
            + (f"in {max_iter} iterations; raise max_inner_iter."
               if out_of_iterations else
               f"(it stopped making progress after {n_iter} iterations)."),
            ConvergenceWarning,
            stacklevel=4,
        )
    hyper = {k: v.detach().cpu().numpy() for k, v in space.values(h).items()}
    agg = clone(agg_spec)
    agg._set_fitted(ctx, packer.unflatten(theta), buffers, hyper, specs)
    return agg, final


def fit_aggregated(
    params: Mapping[str, Any],
    X: np.ndarray,
    Xb,
    y: np.ndarray,
    y_model: np.ndarray,
    *,
    task: str,
    classes: np.ndarray | None = None,
    n_outputs: int,
    standardize: tuple | None = None,
    sample_weight: np.ndarray | None = None,
    pool: PoolFit | None = None,
) -> FitResult:
    """Fit the pool and the tuned aggregation function.

    Parameters
    ----------
    params : mapping
        The estimator's parameters (``get_params(deep=False)``), validated.
    X : ndarray of shape (n_samples, n_features)
        The validated features (what an aggregator with ``uses_X`` sees).
    Xb : array-like or DataFrame
        The rows as the base models take them (the user's DataFrame as is).
    y : ndarray
        The target as given (base estimators fitted inside are fitted on it).
    y_model : ndarray
        What the aggregation function is trained on: encoded classes, or the
        standardised target of shape (n_samples, n_outputs).
    task : {"classification", "regression"}
    classes : ndarray, default=None
        The classes, for classification.
    n_outputs : int
        Classes (classification) or targets (regression).
    standardize : (mean, scale), default=None
        Applied to the base outputs of a regressor, as to its target.
    sample_weight : ndarray, default=None
        Validated row weights, or ``None`` for equal weights.
    pool : PoolFit, default=None
        The base models' outputs on these rows, collected already by
        :func:`~base_models.fit_pool` (``aggregator="auto"`` collects them
        once for all its fits); ``None`` collects them here. When given, no
        base model is called and ``Xb`` is not read.

    Returns
    -------
    FitResult
    """
    n = X.shape[0]
    if n < 2:
        raise ValueError(
            f"an aggregator needs at least 2 samples to fit; got n_samples = {n}."
        )
    seed = int(check_random_state(params["random_state"]).randint(np.iinfo(np.int32).max))
    device = resolve_device(params["device"])
    dtype = resolve_dtype(params["dtype"])
    classify = task == "classification"
    y_strat = y_model if classify else None
    max_outer_iter = params["max_outer_iter"]

    # Everything that can be checked without the base models' outputs is
    # checked before fitting any of them.
    agg_spec = resolve_aggregator(params["aggregator"])
    if pool is None:
        estimators = check_pool(params["estimators"], reserved=params)
        names = [name for name, _ in estimators]
    else:
        if pool.outputs.shape[0] != n:
            raise ValueError(
                f"the pool's outputs hold {pool.outputs.shape[0]} rows; the fit has {n}."
            )
        names = list(pool.base_models)
    gen = torch.Generator(device=device).manual_seed(seed)
    # Tuning on a subsample of a large set: the splits are the subsample's.
    sub = (
        tuning_rows(params.get("max_tuning_rows"), params["cv"], n, y_strat, seed)
        if max_outer_iter > 0 else None
    )

    def splits_of(sub):
        if max_outer_iter == 0:
            return [(np.arange(n), None)]
        strat = y_strat if sub is None or y_strat is None else y_strat[sub]
        return make_splits(n if sub is None else len(sub), strat, seed, params["cv"],
                           params["validation_fraction"])

    splits = splits_of(sub)
    n_tune = n if sub is None else len(sub)
    ctx = AggregationContext(
        task=task, n_models=len(names), n_outputs=n_outputs, n_features=X.shape[1],
        model_names=names, classes=classes, device=device, dtype=dtype, generator=gen,
        # In rows of the whole set: the penalties are tuned in its units.
        n_train=int(round(np.mean([len(tr) for tr, _ in splits]) * n / n_tune)),
    )
    agg_spec.check_task(ctx)
    specs = agg_spec.hyperparameters(ctx)
    fixed = held_and_ranged(specs, params["hyperparams"], params["tune_ranges"])
    space = HyperSpace(specs, fixed, device, dtype, owner=type(agg_spec).__name__)
    if sub is not None and not space.tuned:
        # Nothing to tune: the cross-fitting only validates, on all rows.
        sub, n_tune = None, n
        splits = splits_of(None)

    if pool is None:
        pool = fit_pool(
            estimators, Xb, y, task=task, classes=classes, n_outputs=n_outputs,
            prefit=params["prefit"], base_cv=params["base_cv"], sample_weight=sample_weight,
        )
    Z = pool.outputs
    if standardize is not None:
        Z = (Z - standardize[0]) / standardize[1]  # broadcast over the outputs axis
    # The one host-to-device copy of the data for this fit.
    full = Split(
        to_tensor(Z, device, dtype),
        torch.as_tensor(y_model, device=device, dtype=torch.long if classify else dtype),
        to_tensor(X, device, dtype) if agg_spec.uses_X else None,
        None if sample_weight is None else to_tensor(sample_weight, device, dtype),
    )
    refit_iter = 10 * params["max_inner_iter"]
    if max_outer_iter > 0 and not specs and not agg_spec.init_params(ctx, full.Z, full.y, full.X):
        # Neither hyperparameters nor parameters (greedy selection): there is
        # nothing to tune, and no problem for the engine to validate.
        max_outer_iter = 0

    with small_problem_threads(Z.size, device):
        if max_outer_iter == 0:
            # Nothing to tune and nothing to validate: straight to the refit.
            aggregator, final = _refit(
                agg_spec, ctx, full, space, specs, space.initial(), None, refit_iter
            )
            history = _history_frame([], space, 1)
            _record_hessian(history, final.hessian)
            history.attrs["cv_mode"] = None  # nothing is validated
            history.attrs["cv_mode_reason"] = "max_outer_iter=0"
            history.attrs["cv_solver"] = None
            history.attrs["tuning_rows"] = 0  # nothing is tuned
            tuning_time, validation_loss, n_iter, fold_aggregators = 0.0, float("nan"), 0, []
        else:
            # The tuning's rows and space: with a subsample, its problems see
            # the penalty weights scaled by n / n_tune (the same prior per row
            # as the fit on all rows), while the tuned vector and its record
            # stay in the units of all rows.
            if sub is None:
                rows, tune_space = full, space
            else:
                rows = full.take(torch.as_tensor(sub, device=device))
                tune_space = space.rescaled(n / n_tune)
            requested = params.get("cv_mode", "exact")
            linear, linear_solutions = None, None
            if requested != "approx" and LINEAR_CLOSED_FORM:
                # A quadratic training loss: the splits' exact fits in closed form,
                # so "auto" needs no approximation either.
                linear, linear_solutions, linear_parts, linear_reason = (
                    make_linear_cv_problem(agg_spec, ctx, rows, splits, tune_space)
                )
            if linear is not None:
                cv_mode, cv_mode_reason, cv_solver = "exact", linear_reason, "closed-form"
                joint, split_theta, fold_parts = linear, None, linear_parts
            else:
                cv_mode, cv_mode_reason = _cv_mode(
                    requested, agg_spec, ctx, rows, tune_space, splits
                )
                cv_solver = "newton-step" if cv_mode == "approx" else "iterative"
            if cv_solver == "newton-step":
                # One full-data inner solve per outer step stands in for the K
                # fold solves; the folds' parameters are Newton steps from it.
                fold_ids = torch.as_tensor(acv_fold_ids(splits, n_tune), device=device)
                joint, acv_packer, acv_buffers, acv_fold_thetas = make_acv_problem(
                    agg_spec, ctx, rows, fold_ids, tune_space
                )
                split_theta = None
                fold_parts = [(acv_packer, acv_buffers)] * len(splits)
            elif cv_solver == "iterative":
                # The folds' problems share h and nothing else: one joint solve
                # (same optimum and hypergradient, a fraction of the solver overhead).
                joint, split_theta, fold_parts = make_fold_problems(
                    agg_spec, ctx,
                    [(rows.take(torch.as_tensor(tr, device=device)),
                      rows.take(torch.as_tensor(va, device=device))) for tr, va in splits],
                    tune_space,
                )
            _declare_first_order(agg_spec, joint)
            lower, upper = space.bounds()
            t0 = time.perf_counter()
            try:
                result = tune(
                    [joint], space.initial(), lower=lower, upper=upper,
                    method=params["tuner"], method_options=_tuner_options(
                        agg_spec, params["tuner"], params["tuner_options"], cv_solver),
                    optimizer=params["optimizer"], max_outer_iter=max_outer_iter,
                    tol=params["tol"], max_inner_iter=params["max_inner_iter"],
                    callback=_Progress(len(splits)) if params["verbose"] else None,
                    inner_solver=_inner_solver(agg_spec), scale=space.scales(),
                    shared_stage=getattr(agg_spec, "shared_stage", False),
                    max_evals=getattr(agg_spec, "outer_budget", None),
                )
            except InnerDivergenceError as e:
                raise ValueError(
                    f"fitting the aggregator diverged at its initial hyperparameters ({e}); "
                    "check the base models' outputs or give other hyperparams."
                ) from e
            if result.diverged:
                warnings.warn(
                    f"hypergradient tuning stopped early: {result.message}. The last "
                    "hyperparameters with a finite validation loss are kept.",
                    HypergradientWarning,
                    stacklevel=3,
                )
            tuning_time = time.perf_counter() - t0
            history = _history_frame(result.history, space, len(splits))
            history.attrs["cv_mode"] = cv_mode
            history.attrs["cv_mode_reason"] = cv_mode_reason
            history.attrs["cv_solver"] = cv_solver
            history.attrs["tuning_rows"] = n_tune
            _record_hessian(history, joint.hessian)
            if linear_solutions is not None:  # closed form: every fit is one solve
                fold_thetas = list(linear_solutions(result.h).detach())
                # (With a subsample, the splits' penalty terms are scaled.)
                warm = linear_full_fit(
                    agg_spec, ctx, full, space, result.h,
                    like=linear_solutions if sub is None else None,
                )
            elif split_theta is None:  # approximate CV: the fit on the tuning's rows
                warm = result.thetas[0]
                fold_thetas = list(acv_fold_thetas(warm, result.h).detach())
            else:
                fold_thetas = split_theta(result.thetas[0])
                warm = fold_thetas[0]
                # Convex (a linear design, or weights' mixture): the folds' mean
                # starts nearer. (Choquet's closed form is not a convex problem.)
                if joint.inner_value_grad is not None and (
                    getattr(agg_spec, "convex_mixture", False)
                    or type(agg_spec).linear_design is not Aggregator.linear_design
                ):
                    warm = torch.stack(fold_thetas).mean(0)
            aggregator, _ = _refit(
                agg_spec, ctx, full, space, specs, result.h, warm, refit_iter,
                warm_is_fit=linear_solutions is not None,
                # The iterative folds' closed form passed its check in this fit.
                analytic_checked=cv_solver == "iterative" and joint.inner_value_grad is not None,
            )
            # Each fold's solution at the tuned hyperparameters: the aggregator
            # fitted on that fold's training rows (what cross-validated scores need),
            # or with approximate CV the Newton step that stood in for that fit.
            hyper = {
                k: v.detach().cpu().numpy() for k, v in tune_space.values(result.h).items()
            }
            fold_aggregators = []
            # One clone; the folds get deep copies of it (the same unfitted
            # object, several times cheaper than cloning each).
            unfitted = clone(agg_spec)
            for (packer_k, buffers_k), theta_k in zip(fold_parts, fold_thetas):
                agg_k = copy.deepcopy(unfitted)
                agg_k._set_fitted(ctx, packer_k.unflatten(theta_k), buffers_k, hyper, specs)
                fold_aggregators.append(agg_k)
            validation_loss = result.value / len(splits)
            n_iter = len(result.history)

    return FitResult(
        device=device,
        base_models=pool.base_models,
        estimators=pool.estimators,
        named_estimators=pool.named_estimators,
        fitted_inside=pool.fitted_inside,
        aggregator=aggregator,
        hyperparams=aggregator.hyperparams_,
        tuning_history=history,
        tuning_time=tuning_time,
        validation_loss=validation_loss,
        n_iter=n_iter,
        # Updated in place by every prediction (so that predicting does not
        # change the estimator's attributes, as scikit-learn's checks require).
        last_routing=pd.Series(0, index=names, name="rows", dtype=np.int64),
        fold_aggregators=fold_aggregators,
    )
