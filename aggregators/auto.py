"""``aggregator="auto"``: choose the aggregation function on an honest estimate.

The tuned validation loss is what the tuning minimised: it is optimistic,
and the more so the more hyperparameters and the fewer rows (on 171 rows the
split's noise dominates it). ``"auto"`` instead fits every candidate on the
training rows of ``N_OUTER`` outer folds of the aggregation rows and scores
it on the held-out fold: each row's loss comes from a fit (tuning included)
that never saw it. Each held-out row's loss is charged ``1 / (n + 1)`` of
the loss the candidate would pay there on an error (see :func:`_charged`):
``n`` rows cannot show an error rate below about ``1 / (n + 1)``, and a
candidate that turned error-free rows into near-certainty would otherwise
look perfect. The candidates are compared on those losses row by row
(paired), and the first candidate in the order of preference whose mean
is within ``N_STANDARD_ERRORS`` (two) standard errors of the best one's
is kept (see :data:`CANDIDATES` for the order). The winner is then fitted on all rows as
the estimator's own parameters say.

The base models' outputs are computed once; every candidate fit reuses them.
Candidate fits on the outer folds use one inner split (``cv=None``) and at most
``OUTER_STEPS`` outer steps (``FOLD_OUTER_STEPS`` where it names one), and the
candidates race: after each fold, one clearly worse than the best so far, or
clearly beaten by one the rule prefers to it, is not fitted on the next
folds, so that the whole choice costs a few fits of ``stacking`` (see
``benchmarks/bench_regret.py`` and ``bench_auto_cost.py``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.utils import check_random_state

from base_models import PoolFit, check_pool, fit_pool

from ._base import AggregationContext
from ._bilevel import row_losses
from ._fit import FitResult, fit_aggregated, tuning_row_limit, tuning_rows
from ._registry import resolve_aggregator
from .greedy import GreedySelection

__all__ = ["CANDIDATES", "choose", "dominated", "fit_estimator"]

#: The candidates of ``aggregator="auto"``, in the order the rule prefers
#: them: the best single model, stacking, greedy selection (Caruana, 50
#: rounds), convex weights, a Choquet integral. The single model comes first
#: because it tunes and blends nothing: where a blend's gain is within the
#: noise, the rule keeps the model it mostly picks. Stacking comes next, before
#: the blends that are simpler than it: it is the ensemble a user would
#: otherwise tune by a grid: where greedy selection's or the weights'
#: estimate is within the noise of stacking's, the rule keeps the ensemble
#: the user would otherwise have built (``benchmarks/bench_regret.py`` compares
#: orders). One that cannot serve the task (its ``check_task`` raises) is
#: skipped.
CANDIDATES: tuple[tuple[str, Any], ...] = (
    ("single", lambda: GreedySelection(n_rounds=1)),
    ("stacking", lambda: resolve_aggregator("stacking")),
    ("greedy", lambda: GreedySelection(n_rounds=50)),
    ("weights", lambda: resolve_aggregator("weights")),
    ("choquet", lambda: resolve_aggregator("choquet")),
)

#: Outer folds of the honest estimate. Two: each candidate's fold fits then
#: see half the rows, a handicap for the candidates that fit more parameters
#: on small sets, which the smaller margin that goes with two folds
#: (``N_STANDARD_ERRORS``) offsets, at two thirds of the fold fits of three
#: (``benchmarks/bench_regret.py --n-outer`` compares counts of folds).
N_OUTER = 2
#: Bound on the outer (hyperparameter) steps of a candidate fitted on an outer
#: fold: the estimate needs a good fit, not the last digit of the tuning.
#: More steps tune a fold fit further to its one inner split, which the
#: held-out rows then pay for (``benchmarks/bench_regret.py --outer-steps``).
OUTER_STEPS = 2
#: Outer steps of the fold fits of the candidates named here, instead of
#: ``OUTER_STEPS`` (none by default). Fewer steps make a dear candidate's
#: fold fits cheaper, but leave its estimate that of a barely tuned fit,
#: which moves the reference the rule measures the simpler candidates
#: against (the trade-off: ``benchmarks/bench_regret.py --fold-steps NAME=K``).
FOLD_OUTER_STEPS: dict[str, int] = {}
#: Standard errors of the paired difference within which a simpler candidate
#: is preferred to the one with the lowest estimate. Chosen by
#: leave-one-dataset-out over 0 to 5 on the out-of-fold losses of
#: ``benchmarks/bench_regret.py``'s and ``bench_unseen.py``'s datasets and the
#: quickstart's splits (5 seeds each), judged as the default is: first by the
#: datasets where it is no worse than the best single model and greedy
#: selection, then by its mean regret. Smaller margins gain more on average
#: where blends help and lose on small sets where the estimate favours blends
#: that the test rows do not. The margin goes with ``N_OUTER`` (the share of
#: the rows each fold fit sees): change them together.
N_STANDARD_ERRORS = 2.0
#: Racing: after each outer fold but the last, a candidate whose estimate on
#: the rows scored so far is more than this many standard errors (of its
#: paired difference) above the best one's is dropped (one that tunes no
#: hyperparameter never is); ``inf`` disables it.
#: The margin does not depend on the fits' measured times: a fit with a
#: ``random_state`` must not depend on the machine's load.
RACE_STANDARD_ERRORS = 2.0
#: Racing, second rule: after each outer fold but the last, a candidate that
#: a candidate before it in the order of preference beats by more than this
#: many standard errors (of their paired difference) on the rows scored so
#: far is dropped too (again only one that tunes hyperparameters). The rule
#: keeps it only if that preferred one ends more than ``N_STANDARD_ERRORS``
#: behind the best while it stays within them: the estimates would have to
#: turn over. A margin rather than 0: after one fold, a candidate barely
#: behind a preferred one may still end ahead of it (``bench_regret.py
#: --race-dominated-se`` compares margins). ``inf`` disables it.
RACE_DOMINATED_STANDARD_ERRORS = 1.0


def _charged(raw: np.ndarray, unseen: np.ndarray, n: int) -> np.ndarray:
    """Held-out row losses charged with one unseen error per ``n + 1`` rows.

    ``n`` held-out rows bound a candidate's error rate no better than about
    ``1 / (n + 1)`` (Laplace's rule of succession): a candidate that turned
    error-free rows into near-certain predictions looks perfect on every
    held-out fold, yet pays ``-log`` of its tiny probability on the first
    error it meets. Each row is charged ``1 / (n + 1)`` of the loss the
    candidate would pay there on an error (``unseen``; zero for regression),
    which vanishes on large sets and costs a calibrated candidate little.
    """
    return raw + unseen / (n + 1)


def _fit_on_outputs(params, agg, pool: PoolFit, X, y, y_model, rows, *, task, classes,
                    n_outputs, standardize, sample_weight, **overrides) -> FitResult:
    """Fit ``agg`` on ``rows`` from the pool's stored outputs (no base model is called)."""
    p = {**params, **overrides, "aggregator": agg, "verbose": 0}
    return fit_aggregated(
        p, X[rows], X[rows], y[rows], y_model[rows],
        task=task, classes=classes, n_outputs=n_outputs, standardize=standardize,
        sample_weight=None if sample_weight is None else sample_weight[rows],
        pool=replace(pool, outputs=pool.outputs[rows]),
    )


def _held_out_losses(fitted: FitResult, Z, X, y_model, task, standardize,
                      dtype) -> tuple[np.ndarray, np.ndarray]:
    """Each held-out row's loss under a fitted aggregation function, and the
    loss it would pay there were the label its most probable wrong class
    (classification; zeros for regression): the cost of one error at its
    confidence, which :func:`fit_estimator` charges for the errors the
    held-out rows are too few to show."""
    if standardize is not None:
        Z = (Z - standardize[0]) / standardize[1]
    aggregator, device = fitted.aggregator, fitted.device
    params, hyper = aggregator._fitted_tensors(device, dtype)
    Zt = torch.as_tensor(Z, device=device, dtype=dtype)
    Xt = torch.as_tensor(X, device=device, dtype=dtype) if aggregator.uses_X else None
    y_t = torch.as_tensor(y_model, device=device,
                          dtype=torch.long if task == "classification" else dtype)
    with torch.no_grad():
        out = aggregator.forward(params, hyper, Zt, Xt)
        loss = row_losses(task, out, y_t)
        if task == "classification" and out.shape[-1] > 1:
            logp = torch.log_softmax(out, -1).scatter(-1, y_t[:, None], -torch.inf)
            error = -logp.max(-1).values
        else:
            error = torch.zeros_like(loss)
        return (loss.cpu().numpy().astype(np.float64),
                error.cpu().numpy().astype(np.float64))


def comparison_rows(max_tuning_rows, n: int, y_strat, seed: int) -> np.ndarray:
    """The rows the candidates are compared on: all ``n``, or with more than
    ``N_OUTER * max_tuning_rows`` rows a (stratified, seeded) subsample of that
    many, so that each outer fold's training part still holds the rows a fit
    tunes on (``"auto"``: :data:`~aggregators._fit.AUTO_TUNING_ROWS`)."""
    m = tuning_row_limit(max_tuning_rows)
    # (Below 2 rows a fold, the fits themselves say max_tuning_rows is too small.)
    sub = tuning_rows(N_OUTER * m, N_OUTER, n, y_strat, seed) if m and m >= 2 else None
    return np.arange(n) if sub is None else sub


def outer_folds(n: int, y_strat, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The outer folds: ``N_OUTER`` (stratified where every class allows it), fewer on tiny sets."""
    k = min(N_OUTER, n)
    if y_strat is not None and np.bincount(y_strat).min() >= k:
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros((n, 1)), y_strat))


def choose(losses: np.ndarray, n_se: float = N_STANDARD_ERRORS, weights=None) -> tuple:
    """The one-standard-error rule on paired out-of-fold losses.

    Parameters
    ----------
    losses : ndarray of shape (n_candidates, n_rows)
        Each candidate's held-out loss on each row, candidates in order of
        preference (most preferred first); a row of NaN for a candidate that failed.
    n_se : float, default=N_STANDARD_ERRORS
        ``0`` keeps the lowest mean.
    weights : ndarray of shape (n_rows,), default=None

    Returns
    -------
    winner : int
        The first candidate whose mean is within ``n_se`` standard errors
        of the paired difference of the best mean.
    means, se_diff : ndarray of shape (n_candidates,)
        The means, and the standard error of each candidate's difference to
        the best one (0 for the best itself; NaN for a failed one).
    """
    w = np.ones(losses.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    w = w / w.sum()
    ok = np.all(np.isfinite(losses), axis=1)
    L = np.where(ok[:, None], losses, 0.0)
    means = np.where(ok, L @ w, np.inf)
    best = int(np.argmin(means))
    gap = means - means[best]
    # Weighted variance of the paired differences; n_eff rows (n without weights).
    n_eff = 1.0 / np.sum(w**2)
    var = ((L - L[best] - np.where(ok, gap, 0.0)[:, None]) ** 2) @ w
    se = np.where(ok, np.sqrt(var / max(n_eff - 1.0, 1.0)), np.nan)
    within = ok & (gap <= n_se * np.where(ok, se, 0.0))
    winner = int(np.flatnonzero(within)[0])
    return winner, means, se


def dominated(losses: np.ndarray, alive: np.ndarray, n_se: float, weights=None) -> np.ndarray:
    """Candidates that an alive candidate before them beats by more than ``n_se``
    standard errors of the paired difference (the racing rule of
    :data:`RACE_DOMINATED_STANDARD_ERRORS`).

    Parameters
    ----------
    losses : ndarray of shape (n_candidates, n_rows)
        Row losses so far, candidates in order of preference; dead ones may hold NaN.
    alive : ndarray of bool, shape (n_candidates,)
    n_se : float
        ``inf`` marks none.
    weights : ndarray of shape (n_rows,), default=None

    Returns
    -------
    ndarray of bool, shape (n_candidates,)
    """
    out = np.zeros(len(losses), dtype=bool)
    if not np.isfinite(n_se):
        return out
    for i in np.flatnonzero(alive)[1:]:
        for k in np.flatnonzero(alive[:i]):
            # The pair's means and the standard error of their difference, as the rule reads them.
            _, means, se = choose(losses[[k, i]], weights=weights)
            if means[1] - means[0] > n_se * se[1]:
                out[i] = True
                break
    return out


def fit_estimator(
    params: Mapping[str, Any], X, Xb, y, y_model, *, task: str, classes=None,
    n_outputs: int, standardize=None, sample_weight=None,
) -> tuple[FitResult, pd.DataFrame | None]:
    """The fit behind both estimators: ``"auto"`` chooses, any other aggregator is fitted.

    Returns
    -------
    result : FitResult
    candidates : DataFrame or None
        With ``"auto"``, one row per candidate (``candidates_``, as the
        estimators document it); ``None`` otherwise.
    """
    kw = dict(task=task, classes=classes, n_outputs=n_outputs, standardize=standardize,
              sample_weight=sample_weight)
    if not (isinstance(params["aggregator"], str) and params["aggregator"] == "auto"):
        return fit_aggregated(params, X, Xb, y, y_model, **kw), None

    if isinstance(params["hyperparams"], dict) or params["tune_ranges"]:
        given = "hyperparams" if isinstance(params["hyperparams"], dict) else "tune_ranges"
        raise ValueError(
            f"{given} names hyperparameters of one aggregation function, but "
            "aggregator='auto' chooses among several: pass the aggregator they belong "
            "to (e.g. aggregator='stacking')."
        )
    n = X.shape[0]
    if n < 2:
        raise ValueError(
            f"an aggregator needs at least 2 samples to fit; got n_samples = {n}."
        )
    # What can be checked before a base model runs is checked first.
    estimators = check_pool(params["estimators"], reserved=params)
    names = [name for name, _ in estimators]
    ctx = AggregationContext(
        task=task, n_models=len(names), n_outputs=n_outputs, n_features=X.shape[1],
        model_names=names, classes=classes,
    )
    specs, skipped = [], {}
    for name, make in CANDIDATES:
        agg = make()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                agg.check_task(ctx)
        except ValueError as e:
            skipped[name] = str(e)
            continue
        specs.append((name, agg))

    pool = fit_pool(
        estimators, Xb, y, task=task, classes=classes, n_outputs=n_outputs,
        prefit=params["prefit"], base_cv=params["base_cv"], sample_weight=sample_weight,
    )
    Z = pool.outputs
    seed = int(check_random_state(params["random_state"]).randint(np.iinfo(np.int32).max))
    y_strat = y_model if task == "classification" else None
    # The rows the candidates are compared on: all of them, or on a large set
    # a subsample of N_OUTER * max_tuning_rows (each outer fold's training part
    # then still holds the rows a fit tunes on). Held-out losses of that many
    # rows resolve the candidates far below the margin; the winner is fitted
    # on every row.
    cmp = comparison_rows(params.get("max_tuning_rows"), n, y_strat, seed)
    n_cmp = len(cmp)
    w_cmp = None if sample_weight is None else sample_weight[cmp]
    folds = [(cmp[tr], va) for tr, va in
             outer_folds(n_cmp, None if y_strat is None else y_strat[cmp], seed)]
    dtype = torch.float64 if params["dtype"] == "float64" else torch.float32
    fast = [dict(cv=None, random_state=seed, max_outer_iter=min(
        FOLD_OUTER_STEPS.get(name, OUTER_STEPS), params["max_outer_iter"])) for name, _ in specs]

    # Fold by fold, every candidate still in the race (racing): after a fold,
    # one clearly worse than the best on the rows scored so far is dropped.
    n_cand = len(specs)
    # Candidates that tune nothing (the single model, greedy selection) cost
    # next to nothing and always run every fold: a dear candidate that led
    # on the first fold and faltered later then still meets them at the end.
    racing = np.array([bool(agg.hyperparameters(ctx)) for _, agg in specs])
    raw, unseen = np.full((n_cand, n_cmp), np.nan), np.full((n_cand, n_cmp), np.nan)
    seconds, errors = np.zeros(n_cand), [""] * n_cand
    alive, n_folds = np.ones(n_cand, dtype=bool), np.zeros(n_cand, dtype=int)
    seen = np.zeros(n_cmp, dtype=bool)
    for j, (tr, va) in enumerate(folds):
        rows = cmp[va]
        for i in np.flatnonzero(alive):
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    # A short tuning on a fold may stop early; the estimate says how it fared.
                    warnings.simplefilter("ignore")
                    fitted = _fit_on_outputs(params, specs[i][1], pool, X, y, y_model, tr,
                                             **kw, **fast[i])
                    raw[i, va], unseen[i, va] = _held_out_losses(
                        fitted, Z[rows], X[rows], y_model[rows], task, standardize, dtype
                    )
                n_folds[i] += 1
            except (ValueError, RuntimeError, FloatingPointError) as e:
                # A candidate that cannot be fitted on these rows is out of the race.
                raw[i], alive[i] = np.nan, False
                errors[i] = f"{type(e).__name__}: {e}"
            seconds[i] += time.perf_counter() - t0
        seen[va] = True
        if j < len(folds) - 1 and alive.sum() > 1 and np.isfinite(RACE_STANDARD_ERRORS):
            w_seen = None if w_cmp is None else w_cmp[seen]
            L = _charged(raw, unseen, n_cmp)[:, seen]
            L[~alive] = np.nan
            _, means, se = choose(L, n_se=RACE_STANDARD_ERRORS, weights=w_seen)
            worse = means - means[alive].min() > RACE_STANDARD_ERRORS * np.nan_to_num(se)
            worse |= dominated(L, alive, RACE_DOMINATED_STANDARD_ERRORS, w_seen)
            alive &= ~(worse & racing)
    charged = _charged(raw, unseen, n_cmp)
    losses = np.where((n_folds < len(folds))[:, None], np.nan, charged)
    if not np.isfinite(losses).all(axis=1).any():
        raise RuntimeError(
            "aggregator='auto': no candidate could be fitted on the outer folds of "
            f"these {n_cmp} rows: " + "; ".join(f"{s}: {e}" for (s, _), e in zip(specs, errors))
        )
    winner, _, se = choose(losses, n_se=N_STANDARD_ERRORS, weights=w_cmp)
    w = np.ones(n_cmp) if w_cmp is None else np.asarray(w_cmp, dtype=float)

    def mean_over_scored(L):
        ok = np.isfinite(L)
        return np.array([np.average(r[k], weights=w[k]) if k.any() else np.nan
                         for r, k in zip(L, ok)])

    name, agg = specs[winner]
    t0 = time.perf_counter()
    result = _fit_on_outputs(params, agg, pool, X, y, y_model, np.arange(n), **kw)
    final_seconds = time.perf_counter() - t0

    table = pd.DataFrame({
        "estimate": mean_over_scored(charged),
        "held_out_loss": mean_over_scored(raw),
        "se_diff": se,
        "folds": n_folds,
        "fit_seconds": seconds,
        "chosen": np.arange(len(specs)) == winner,
        "error": errors,
    }, index=pd.Index([s for s, _ in specs], name="candidate"))
    table.loc[name, "fit_seconds"] += final_seconds
    table.attrs.update(n_outer=len(folds), n_se=N_STANDARD_ERRORS, skipped=skipped,
                       row_losses=raw, error_losses=unseen, compared_rows=cmp)
    return result, table
