"""HypergradSearchCV: ``GridSearchCV``'s interface, continuous dimensions solved by gradient.

A grid costs ``points ** dimensions * folds`` fits; here each discrete grid
point costs one cross-fitted hypergradient solve (the folds' inner problems
share the hyperparameters and their validation losses are summed) whose
final refit on all rows is the candidate's estimator, and one refit per split
at the solved hyperparameters (held fixed, nothing tuned) for the split
scores. The search gives the estimator the continuous dimensions' ranges
through its ``tune_ranges`` parameter, on clones built with ``set_params``;
the hyperparameters it does not name follow the estimator's ``hyperparams``. The continuous
dimensions are hyperparameters that the aggregation function of an
:class:`AggregatedClassifier` / :class:`AggregatedRegressor` declares, so the
estimator (alone or at the end of a :class:`~sklearn.pipeline.Pipeline`)
must be one of those.
"""

from __future__ import annotations

import numbers
import time
import warnings
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, MetaEstimatorMixin, clone, is_classifier
from sklearn.exceptions import FitFailedWarning
from sklearn.metrics import check_scoring
from sklearn.model_selection import ParameterGrid, check_cv
from sklearn.pipeline import Pipeline
from sklearn.utils import get_tags
from sklearn.utils._param_validation import HasMethods, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils import _safe_indexing, indexable
from sklearn.utils.validation import _check_method_params, check_is_fitted
from tqdm.auto import tqdm

from ._bilevel import parse_range
from ._estimators import _BaseAggregated
from .hypergrad import METHODS

__all__ = ["HypergradSearchCV"]


def _final_step(est) -> tuple[str, Any]:
    """The prefix of parameter names that reaches the last step, and that step."""
    prefix = ""
    while isinstance(est, Pipeline):
        name, est = est.steps[-1]
        prefix += f"{name}__"
    return prefix, est


def _estimator_has(attr: str):
    def check(self):
        if hasattr(self, "best_estimator_"):
            return hasattr(self.best_estimator_, attr)
        return hasattr(self.estimator, attr)

    return check


class HypergradSearchCV(MetaEstimatorMixin, BaseEstimator):
    """Search over hyperparameters with ``GridSearchCV``'s interface, continuous ones by gradient.

    Each continuous dimension of ``param_space`` is a hyperparameter of the
    aggregation function inside an ``AggregatedClassifier`` /
    ``AggregatedRegressor``; all of them are solved together by hypergradient
    descent on the cross-validated loss (the sum over the ``cv`` folds of the
    validation log-loss for classifiers, squared error for regressors), so
    their number hardly changes the cost. Discrete dimensions are enumerated
    as a grid, one solve per grid point. Every candidate is then scored with
    ``scoring`` on each fold by the model fitted on that fold's training rows
    at the solved hyperparameters, which fills ``cv_results_`` exactly as
    :class:`~sklearn.model_selection.GridSearchCV` does.

    Which hyperparameters a solve tunes: each solve is a clone of
    ``estimator`` (with the grid point's discrete values set) whose
    ``tune_ranges`` parameter is set to the continuous dimensions (and
    ``cv`` to the search's splits); the estimator's own ``tune_ranges``, if
    any, gives way. So

    * every hyperparameter named as a continuous dimension is tuned within
      its range, whatever the estimator's ``hyperparams`` says of it;
    * every other hyperparameter of the aggregation function follows the
      estimator's ``hyperparams``: under the default ``"tune"`` it is tuned
      too, within the aggregator's declared bounds, in the same solve (as
      the estimator alone would tune it; e.g. Stacking's ``l2_scale`` in a
      search over ``aggregator__l2``); it is held where the user fixes it,
      by a value in the ``hyperparams`` dict (which may itself be a
      discrete dimension, ``{"hyperparams": [{"l2_scale": 0.1}, ...]}``)
      or by ``hyperparams="fixed"``, which tunes the named dimensions only,
      as a grid search would.

    The best estimator and the split refits then hold every hyperparameter
    at its solved value.

    Parameters
    ----------
    estimator : AggregatedClassifier, AggregatedRegressor or Pipeline ending in one
        The estimator to tune.
    param_space : dict or list of dict
        Parameter name (as ``estimator.set_params`` takes it, e.g.
        ``"aggregator__l2"`` or ``"agg__aggregator__l2"`` in a pipeline) to
        either a continuous range — ``scipy.stats.loguniform(low, high)``,
        ``scipy.stats.uniform(loc, scale)``, ``(low, high, "log")`` or
        ``(low, high, "linear")`` — or a list of values. A continuous name must
        end in ``aggregator__<h>`` (or ``hyperparams__<h>``) where ``<h>`` is a
        hyperparameter the aggregation function declares; a vector
        hyperparameter (such as Stacking's one L2 weight per base model) is
        solved entry by entry within the range. Hyperparameters not named
        follow the estimator's ``hyperparams`` (tuned by default; see above).
        A list of dicts searches each space in turn.
    cv : int, cross-validation generator or iterable, default=5
        As in ``GridSearchCV`` (stratified for classifiers).
    scoring : str, callable, list, tuple, dict or None, default=None
        How split scores are computed and discrete candidates ranked, as in
        ``GridSearchCV``; ``None`` uses the estimator's ``score``. The
        continuous dimensions minimise the differentiable loss above whatever
        ``scoring`` is.
    method : str, default="implicit-cg"
        Hypergradient method (any name in
        :data:`aggregators.hypergrad.METHODS`).
    refit : bool, str or callable, default=True
        Keep the solved estimator of the best candidate (already refitted on
        all rows by its solve) as ``best_estimator_``. With several metrics,
        the name of the one that chooses the best; a callable takes
        ``cv_results_`` and returns ``best_index_``.
    n_jobs : int, default=None
        Jobs for the grid points' solves and for the per-fold refits (joblib).
    verbose : int, default=0
        ``>= 1``: progress bars; ``>= 2``: also each outer step of the solves.
    random_state : int, RandomState or None, default=None
        Seeds the estimator's own ``random_state`` where that is ``None``.
    error_score : "raise" or float, default=np.nan
        Score of a candidate whose fit fails; ``"raise"`` re-raises.
    return_train_score : bool, default=False
        Also score each split's refit on its training rows.

    Attributes
    ----------
    cv_results_ : dict of ndarray
        Same keys as ``GridSearchCV.cv_results_``. ``mean_fit_time`` of a
        candidate is the mean over splits of the split's refit time plus an
        equal share of the candidate's hypergradient solve.
    best_estimator_ : estimator
    best_score_ : float
    best_params_ : dict
        Discrete values and solved continuous values (a float, or an array for
        a vector hyperparameter).
    best_index_ : int
    scorer_ : callable or dict
    n_splits_ : int
    refit_time_ : float
        Seconds of the best candidate's solve, which ends with its refit on
        all rows.
    multimetric_ : bool
    solve_histories_ : list of DataFrame
        Each candidate's ``tuning_history_`` (outer steps of its solve).

    See Also
    --------
    sklearn.model_selection.GridSearchCV : for estimators with no
        differentiable inner problem.

    Examples
    --------
    >>> from scipy.stats import loguniform
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.naive_bayes import GaussianNB
    >>> from aggregators import AggregatedClassifier, HypergradSearchCV, Stacking
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> est = AggregatedClassifier(
    ...     [("lr", LogisticRegression(max_iter=5000)), ("nb", GaussianNB())],
    ...     aggregator=Stacking(), random_state=0)
    >>> search = HypergradSearchCV(
    ...     est, {"aggregator__l2": loguniform(1e-3, 1e2)}, cv=3).fit(X, y)
    >>> sorted(search.best_params_)
    ['aggregator__l2']
    >>> search.best_params_["aggregator__l2"].shape   # one L2 weight per base model
    (2,)
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit"])],
        "param_space": [dict, list],
        "cv": ["cv_object"],
        "scoring": [None, str, callable, list, tuple, set, dict],
        "method": [StrOptions(set(METHODS))],
        "refit": ["boolean", str, callable],
        "n_jobs": [None, numbers.Integral],
        "verbose": ["verbose"],
        "random_state": ["random_state"],
        "error_score": [StrOptions({"raise"}), numbers.Real],
        "return_train_score": ["boolean"],
    }

    def __init__(
        self,
        estimator,
        param_space,
        *,
        cv=5,
        scoring=None,
        method="implicit-cg",
        refit=True,
        n_jobs=None,
        verbose=0,
        random_state=None,
        error_score=np.nan,
        return_train_score=False,
    ):
        self.estimator = estimator
        self.param_space = param_space
        self.cv = cv
        self.scoring = scoring
        self.method = method
        self.refit = refit
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.random_state = random_state
        self.error_score = error_score
        self.return_train_score = return_train_score

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        sub = get_tags(self.estimator)
        tags.estimator_type = sub.estimator_type
        tags.classifier_tags = sub.classifier_tags
        tags.regressor_tags = sub.regressor_tags
        tags.input_tags.pairwise = sub.input_tags.pairwise
        return tags

    # -- the space -----------------------------------------------------------
    def _candidates(self, prefix: str) -> list[tuple[dict, dict]]:
        """``[(discrete params, {key: (hyperparameter name, range)})]``."""
        spaces = self.param_space if isinstance(self.param_space, list) else [self.param_space]
        if not spaces or not all(isinstance(s, dict) and s for s in spaces):
            raise ValueError(
                "param_space must be a non-empty dict (or a list of them) of parameter "
                f"name -> range or list of values; got {self.param_space!r}."
            )
        out = []
        for space in spaces:
            continuous, discrete = {}, {}
            for key, value in space.items():
                rng = parse_range(value)
                if rng is not None:
                    continuous[key] = (self._hyper_name(key, prefix), rng)
                elif isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
                    discrete[key] = list(value)
                else:
                    raise ValueError(
                        f"param_space[{key!r}] must be a continuous range "
                        "(scipy.stats.loguniform / uniform, or (low, high, 'log'|'linear')) "
                        f"or a non-empty list of values; got {value!r}."
                    )
            for point in ParameterGrid(discrete):
                out.append((point, continuous))
        return out

    @staticmethod
    def _hyper_name(key: str, prefix: str) -> str:
        for head in ("aggregator__", "hyperparams__"):
            if key.startswith(prefix + head):
                name = key[len(prefix + head):]
                if name and "__" not in name:
                    return name
        raise ValueError(
            f"the continuous dimension {key!r} is not a hyperparameter of the "
            f"aggregation function: name it {prefix}aggregator__<hyperparameter>. "
            "Other parameters have no hypergradient: give them a list of values "
            "(enumerated as a grid), or search them with "
            "sklearn.model_selection.RandomizedSearchCV."
        )

    # -- fit ------------------------------------------------------------------
    def fit(self, X, y=None, *, groups=None, **fit_params):
        """Solve every candidate, score it on each split, keep the best.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
        groups : array-like of shape (n_samples,), default=None
            Group labels for group-aware splitters.
        **fit_params
            Passed to the estimator's ``fit``.

        Returns
        -------
        self
        """
        self._validate_params()
        prefix, final = _final_step(self.estimator)
        if not isinstance(final, _BaseAggregated):
            raise TypeError(
                f"HypergradSearchCV needs an estimator with a differentiable inner "
                f"problem (AggregatedClassifier or AggregatedRegressor, alone or at the "
                f"end of a Pipeline); got {type(final).__name__}. Use "
                "sklearn.model_selection.GridSearchCV or RandomizedSearchCV for it."
            )
        candidates = self._candidates(prefix)
        X, y, groups = indexable(X, y, groups)
        cv = check_cv(self.cv, y, classifier=is_classifier(self.estimator))
        splits = list(cv.split(X, y, groups))
        self.n_splits_ = len(splits)
        self.multimetric_ = isinstance(self.scoring, (list, tuple, set, dict))
        self.scorer_ = check_scoring(self.estimator, scoring=self.scoring)
        refit_metric = self._refit_metric()
        seed = None
        if self.random_state is not None:
            seed = int(np.random.RandomState(self.random_state).randint(np.iinfo(np.int32).max))

        parallel = Parallel(n_jobs=self.n_jobs, return_as="generator")
        solves = list(self._progress(
            parallel(
                delayed(self._solve)(X, y, prefix, point, cont, splits, seed, fit_params)
                for point, cont in candidates
            ),
            len(candidates), "solving",
        ))
        if all(s["error"] is not None for s in solves):
            raise ValueError(
                f"all {len(solves)} candidates of HypergradSearchCV failed to fit; the "
                f"first error: {solves[0]['error']}"
            )
        jobs = [
            (c, k) for c, s in enumerate(solves) for k in range(len(splits))
            if s["error"] is None
        ]
        fold_out = list(self._progress(
            parallel(
                delayed(self._score_split)(
                    X, y, prefix, solves[c], splits[k], seed, fit_params
                )
                for c, k in jobs
            ),
            len(jobs), "scoring splits",
        ))
        per_split = dict(zip(jobs, fold_out))
        self.cv_results_ = self._results(solves, per_split, len(splits))
        self.solve_histories_ = [s["history"] for s in solves]

        for stale in ("best_index_", "best_score_", "best_params_", "best_estimator_",
                      "refit_time_"):  # from an earlier fit
            self.__dict__.pop(stale, None)
        if callable(self.refit):
            self.best_index_ = int(self.refit(self.cv_results_))
        elif self.refit or not self.multimetric_:
            self.best_index_ = int(np.argmin(self.cv_results_[f"rank_test_{refit_metric}"]))
            self.best_score_ = float(self.cv_results_[f"mean_test_{refit_metric}"][self.best_index_])
        if hasattr(self, "best_index_"):
            self.best_params_ = self.cv_results_["params"][self.best_index_]
        if self.refit:
            best = solves[self.best_index_]
            if best["error"] is not None:
                raise ValueError(
                    f"the best candidate failed to fit: {best['error']}"
                )
            self.best_estimator_ = best["estimator"]
            self.refit_time_ = best["solve_time"]
        return self

    def _refit_metric(self) -> str:
        if not self.multimetric_:
            return "score"
        names = list(self.scoring)  # metric names: the list itself, or the dict's keys
        if self.refit is not False and not callable(self.refit) and self.refit not in names:
            raise ValueError(
                f"with several metrics, refit must be one of their names {names}, a "
                f"callable or False; got {self.refit!r}."
            )
        return self.refit if isinstance(self.refit, str) else names[0]

    def _progress(self, it, total, what):
        if self.verbose:
            return tqdm(it, total=total, desc=f"HypergradSearchCV {what}")
        return it

    def _configure(self, prefix, point, seed, **settings):
        """A clone of the estimator with the candidate's discrete values, then
        ``settings`` (and those shared by the solve and the split refits) on
        its final step."""
        est = clone(self.estimator).set_params(**point)
        _, final = _final_step(est)
        settings["tuner"] = self.method
        if seed is not None and final.random_state is None:
            settings["random_state"] = seed
        if self.verbose >= 2:
            settings["verbose"] = 1
        est.set_params(**{prefix + key: value for key, value in settings.items()})
        return est, final

    def _solve(self, X, y, prefix, point, continuous, splits, seed, fit_params) -> dict:
        ranges = {name: (lo, hi, "log" if log else "linear")
                  for name, (lo, hi, log) in continuous.values()}
        est, final = self._configure(prefix, point, seed, tune_ranges=ranges, cv=splits)
        t0 = time.perf_counter()
        try:
            est.fit(X, y, **fit_params)
        except Exception as e:  # noqa: BLE001 - reported as error_score, as GridSearchCV does
            if self.error_score == "raise":
                raise
            warnings.warn(
                f"a candidate of HypergradSearchCV failed to fit ({point}): "
                f"{type(e).__name__}: {e}",
                FitFailedWarning,
                stacklevel=2,
            )
            params = {**point, **{key: np.nan for key in continuous}}
            return {"params": params, "point": point, "error": repr(e), "solve_time": time.perf_counter() - t0,
                    "history": None, "estimator": None, "hyper": None}
        solve_time = time.perf_counter() - t0
        readable = final.hyperparams_  # floats, and Series by label for vectors
        hyper = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in readable.items()}
        solved = {
            key: (readable[name].copy() if hasattr(readable[name], "copy") else float(readable[name]))
            for key, (name, _) in continuous.items()
        }
        # Parameters that describe the fitted state: every hyperparameter fixed
        # at its solved value, nothing left to tune (a refit reproduces it).
        user_cv = point.get(prefix + "cv", _final_step(self.estimator)[1].cv)
        final.set_params(cv=user_cv, tune_ranges=None, hyperparams={
            k: (float(v[0]) if v.size == 1 else v.copy()) for k, v in hyper.items()
        })
        return {"params": {**point, **solved}, "point": point, "error": None, "solve_time": solve_time,
                "history": final.tuning_history_, "estimator": est, "hyper": hyper}

    def _score_split(self, X, y, prefix, solve, split, seed, fit_params) -> dict:
        train, test = split
        # Solved values held fixed; no validation split is needed to refit.
        est, _ = self._configure(
            prefix, solve["point"], seed, tune_ranges=None, max_outer_iter=0,
            hyperparams={k: v.copy() for k, v in solve["hyper"].items()},
        )
        X_tr, y_tr = _safe_indexing(X, train), _safe_indexing(y, train)
        X_te, y_te = _safe_indexing(X, test), _safe_indexing(y, test)
        t0 = time.perf_counter()
        # Row-aligned fit parameters (sample_weight) follow the split's rows.
        est.fit(X_tr, y_tr, **_check_method_params(X, fit_params, indices=train))
        fit_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        test_scores = self._score(est, X_te, y_te)
        score_time = time.perf_counter() - t0
        out = {"test": test_scores, "fit_time": fit_time, "score_time": score_time}
        if self.return_train_score:
            out["train"] = self._score(est, X_tr, y_tr)
        return out

    def _score(self, est, X, y) -> dict:
        res = self.scorer_(est, X, y)
        return dict(res) if isinstance(res, dict) else {"score": float(res)}

    def _results(self, solves, per_split, n_splits) -> dict:
        n = len(solves)
        results: dict[str, Any] = {}
        metrics = None
        for res in per_split.values():
            metrics = list(res["test"])
            break
        if metrics is None:  # every candidate failed
            metrics = list(self.scoring) if self.multimetric_ else ["score"]
        fit_t = np.full((n, n_splits), np.nan)
        score_t = np.full((n, n_splits), np.nan)
        scores = {(s, m): np.full((n, n_splits), np.nan) for s in ("test", "train") for m in metrics}
        for c, s in enumerate(solves):
            for k in range(n_splits):
                res = per_split.get((c, k))
                share = s["solve_time"] / n_splits
                if res is None:
                    fit_t[c, k] = share
                    score_t[c, k] = 0.0
                    for key in scores:
                        scores[key][c, k] = self.error_score
                    continue
                fit_t[c, k] = res["fit_time"] + share
                score_t[c, k] = res["score_time"]
                for m in metrics:
                    scores["test", m][c, k] = res["test"][m]
                    if self.return_train_score:
                        scores["train", m][c, k] = res["train"][m]
        for what, arr in (("fit_time", fit_t), ("score_time", score_t)):
            results[f"mean_{what}"] = arr.mean(1)
            results[f"std_{what}"] = arr.std(1)

        params = [s["params"] for s in solves]
        names = sorted({k for p in params for k in p})
        for name in names:
            col = np.ma.MaskedArray(np.empty(n, dtype=object), mask=True)
            for c, p in enumerate(params):
                if name in p:
                    col[c] = p[name]
            results[f"param_{name}"] = col
        results["params"] = params

        sets = ("test", "train") if self.return_train_score else ("test",)
        for what in sets:
            for m in metrics:
                arr = scores[what, m]
                for k in range(n_splits):
                    results[f"split{k}_{what}_{m}"] = arr[:, k]
                results[f"mean_{what}_{m}"] = arr.mean(1)
                results[f"std_{what}_{m}"] = arr.std(1)
                if what == "test":
                    means = results[f"mean_test_{m}"]
                    # As in GridSearchCV: NaN means rank last, ties share the best rank.
                    key = np.where(np.isnan(means), np.inf, -means)
                    results[f"rank_test_{m}"] = rankdata(key, method="min").astype(np.int32)
        return results

    # -- delegation ---------------------------------------------------------
    @available_if(_estimator_has("predict"))
    def predict(self, X):
        """Predict with the best estimator."""
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.predict(X)

    @available_if(_estimator_has("predict_proba"))
    def predict_proba(self, X):
        """Class probabilities of the best estimator."""
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.predict_proba(X)

    @available_if(_estimator_has("predict_log_proba"))
    def predict_log_proba(self, X):
        """Class log-probabilities of the best estimator."""
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.predict_log_proba(X)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X):
        """Decision function of the best estimator."""
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.decision_function(X)

    @available_if(_estimator_has("transform"))
    def transform(self, X):
        """Transform with the best estimator."""
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.transform(X)

    def score(self, X, y=None):
        """Score of the best estimator with ``scorer_`` (the refit metric)."""
        check_is_fitted(self, "best_estimator_")
        res = self.scorer_(self.best_estimator_, X, y)
        return res[self._refit_metric()] if self.multimetric_ else res

    @property
    def classes_(self):
        """Classes of the best estimator."""
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.classes_

    @property
    def n_features_in_(self):
        """Features seen by the best estimator."""
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.n_features_in_
