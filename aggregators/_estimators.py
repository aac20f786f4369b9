"""AggregatedClassifier and AggregatedRegressor: the scikit-learn surface.

Parameters, their validation, ``fit`` handing validated data to the fit
pipeline (:func:`aggregators._fit.fit_aggregated`, whose result becomes the
learned attributes), and prediction, which asks the pool for the base
models' outputs on the rows the aggregation function routes to each.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.metaestimators import _BaseComposition
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    validate_data,
)

from base_models import pool_outputs, resolve_dtype, to_tensor

from ._base import cached_param_names
from ._fit import HypergradientWarning
from .auto import fit_estimator
from .hypergrad import METHODS

__all__ = ["AggregatedClassifier", "AggregatedRegressor", "HypergradientWarning"]


def _check_weights(sample_weight, X_arr) -> np.ndarray | None:
    """Validated sample weights; ``None`` for none or all equal (the same fit)."""
    if sample_weight is None:
        return None
    sw = _check_sample_weight(sample_weight, X_arr, dtype=np.float64)
    if (sw < 0).any():
        raise ValueError("sample_weight has negative values; weights must be >= 0.")
    if not sw.sum() > 0:
        raise ValueError("sample_weight sums to 0: no row would count.")
    return None if np.all(sw == sw[0]) else sw


def _base_rows(X, X_arr):
    """What the base models are called on: the user's DataFrame (column names,
    index keys) as is, otherwise the validated array."""
    return X if isinstance(X, (pd.DataFrame, pd.Series)) else X_arr


class _BaseAggregated(_BaseComposition):
    """Shared machinery of the two estimators (not public)."""

    _task: str = ""

    _parameter_constraints: dict = {
        "estimators": [list],
        "aggregator": [str, HasMethods(["hyperparameters", "init_params", "forward"])],
        "hyperparams": [StrOptions({"tune", "fixed"}), dict],
        "tune_ranges": [None, dict],
        "tuner": [StrOptions(set(METHODS))],
        "tuner_options": [None, dict],
        "optimizer": [StrOptions({"lbfgs", "adam"})],
        "cv": [None, Interval(Integral, 2, None, closed="left"), "cv_object"],
        "cv_mode": [StrOptions({"exact", "approx", "auto"})],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "max_tuning_rows": [StrOptions({"auto"}), None, Interval(Integral, 1, None, closed="left")],
        "max_outer_iter": [Interval(Integral, 0, None, closed="left")],
        "max_inner_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "prefit": [StrOptions({"auto"}), "boolean"],
        "base_cv": ["cv_object"],
        "device": [str, torch.device],
        "dtype": [StrOptions({"float32", "float64"})],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        estimators,
        *,
        aggregator="auto",
        hyperparams="tune",
        tune_ranges=None,
        tuner="hoag",
        tuner_options=None,
        optimizer="lbfgs",
        cv=5,
        cv_mode="exact",
        validation_fraction=0.25,
        max_tuning_rows="auto",
        max_outer_iter=30,
        max_inner_iter=100,
        tol=1e-4,
        prefit="auto",
        base_cv=5,
        device="auto",
        dtype="float64",
        random_state=None,
        verbose=0,
    ):
        self.estimators = estimators
        self.aggregator = aggregator
        self.hyperparams = hyperparams
        self.tune_ranges = tune_ranges
        self.tuner = tuner
        self.tuner_options = tuner_options
        self.optimizer = optimizer
        self.cv = cv
        self.cv_mode = cv_mode
        self.validation_fraction = validation_fraction
        self.max_tuning_rows = max_tuning_rows
        self.max_outer_iter = max_outer_iter
        self.max_inner_iter = max_inner_iter
        self.tol = tol
        self.prefit = prefit
        self.base_cv = base_cv
        self.device = device
        self.dtype = dtype
        self.random_state = random_state
        self.verbose = verbose

    @classmethod
    def _get_param_names(cls):
        # scikit-learn reads the constructor's signature on every get_params
        # (fit asks twice): read once per constructor.
        return cached_param_names(cls, super()._get_param_names)

    # -- nested parameters: ``rf__max_depth`` as well as ``aggregator__l2`` ---------
    def get_params(self, deep=True):
        """Parameters of this estimator.

        With ``deep=True``, also each base model by its name and, for those
        with ``get_params`` (scikit-learn estimators), their parameters as
        ``<name>__<param>``; an :class:`Aggregator` instance's parameters
        are ``aggregator__<param>``. Torch modules, arrays, callables and
        :mod:`base_models` wrappers have no parameters of their own.

        Parameters
        ----------
        deep : bool, default=True

        Returns
        -------
        dict
        """
        return self._get_params("estimators", deep=deep)

    def set_params(self, **params):
        """Set parameters, base models' (``rf__max_depth``, ``rf``) and the aggregator's included.

        Parameters
        ----------
        **params
            As :meth:`get_params` names them.

        Returns
        -------
        self
        """
        # Checked before anything is changed, so a failing call changes nothing.
        agg = params.get("aggregator", self.aggregator)
        nested_agg = sorted(k for k in params if k.startswith("aggregator__"))
        if nested_agg and isinstance(agg, str):
            # A short name has no parameters; BaseEstimator would fail with an
            # AttributeError on ``str.set_params``.
            raise ValueError(
                f"cannot set {nested_agg} while aggregator is the short name {agg!r}: "
                "pass an Aggregator instance (e.g. aggregator=Stacking()) to reach "
                "its parameters as aggregator__<name>."
            )
        return self._set_params("estimators", **params)

    # -- fit ---------------------------------------------------------------------
    def _fit(self, X, Xb, y, y_model, *, n_outputs, standardize=None, sample_weight=None):
        """Run the fit pipeline on validated data; store what it learned.

        ``X``: the validated array; ``Xb``: the rows as base models take them;
        ``y``: the target as given; ``y_model``: what the aggregation function
        is trained on (encoded classes, or the standardised target).
        """
        result, candidates = fit_estimator(
            self.get_params(deep=False), X, Xb, y, y_model,
            task=self._task, classes=getattr(self, "classes_", None), n_outputs=n_outputs,
            standardize=standardize, sample_weight=sample_weight,
        )
        for name, value in result.items():
            setattr(self, f"{name}_", value)
        if candidates is not None:
            self.candidates_ = candidates
        elif hasattr(self, "candidates_"):
            del self.candidates_  # left by an earlier fit with "auto"
        return self

    def _transform_outputs(self, Z):
        return Z

    def _n_outputs(self) -> int:
        return len(self.classes_) if self._task == "classification" else self.n_outputs_

    # -- predict -----------------------------------------------------------------
    def _aggregate(self, X, dense: bool = False) -> torch.Tensor:
        check_is_fitted(self, "aggregator_")
        X_arr = validate_data(self, X, reset=False, ensure_all_finite=True)
        device = self.device_
        if device.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(
                "this estimator was fitted on CUDA, which is not available here; "
                "predicting on the CPU.",
                UserWarning,
                stacklevel=3,
            )
            device = torch.device("cpu")
        dtype = resolve_dtype(self.dtype)
        params, hyper = self.aggregator_._fitted_tensors(device, dtype)
        Xt = to_tensor(X_arr, device, dtype) if self.aggregator_.uses_X else None
        mask = None
        if not dense:
            with torch.no_grad():
                mask = self.aggregator_.route(params, hyper, Xt)
        n_out = self._n_outputs()
        Z, counts = pool_outputs(
            self.base_models_, _base_rows(X, X_arr), X_arr.shape[0], task=self._task,
            classes=getattr(self, "classes_", None), n_outputs=n_out,
            mask=None if mask is None else mask.cpu().numpy(),
        )
        Z = self._transform_outputs(Z)
        if mask is not None:
            # A finite placeholder where a model was not called; the
            # aggregation function ignores those entries.
            Z = np.where(np.isnan(Z), 1.0 / n_out if self._task == "classification" else 0.0, Z)
        try:
            self.last_routing_.iloc[:] = counts
        except (AttributeError, ValueError):
            # Absent (pickled by an older version) or read-only (a pickle
            # loaded from a memory map): a new Series then.
            names = list(self.base_models_)
            self.last_routing_ = pd.Series(counts, index=names, name="rows", dtype=np.int64)
        with torch.no_grad():
            return self.aggregator_.forward(params, hyper, to_tensor(Z, device, dtype), Xt)


class AggregatedClassifier(ClassifierMixin, _BaseAggregated):
    """Combine pretrained classifiers with a learnable, hypergradient-tuned function.

    ``fit`` computes each base model's class probabilities once (fitting,
    with out-of-fold predictions, any base estimator that is not fitted yet),
    splits the rows into inner-train / inner-validation (or ``cv`` folds),
    fits the aggregation function's parameters on inner-train while tuning
    its continuous hyperparameters by hypergradient descent on the
    inner-validation log-loss, and finally refits the parameters on all rows
    with the tuned hyperparameters.

    Parameters
    ----------
    estimators : list of (str, model)
        Base models: fitted scikit-learn classifiers (kept frozen), unfitted
        ones (fitted inside, see ``prefit``), ``torch.nn.Module`` s,
        callables, arrays of stored predictions, or :mod:`base_models`
        wrappers. Use ``sklearn.frozen.FrozenEstimator`` or
        :func:`base_models.as_base_model` to keep a fitted model frozen
        through :func:`sklearn.base.clone`.
    aggregator : str or Aggregator, default="auto"
        The aggregation function: ``"auto"``, a short name (``"stacking"``,
        ``"weights"``, ``"choquet"``, ``"greedy"``, ... see
        :func:`aggregators.available_aggregators`) or an :class:`Aggregator`
        instance (its parameters are reachable as ``aggregator__<name>``).
        ``"auto"`` fits the candidates of :data:`aggregators.auto.CANDIDATES`
        (the best single model, stacking, greedy ensemble selection, convex
        weights, a Choquet integral; those that cannot serve the task are
        skipped) on 2 outer folds of the rows, each with one inner split and at
        most 2 outer steps, scores each row with the fits that did not see it,
        keeps the first candidate in that order whose mean held-out loss is
        within two standard errors (of the paired difference) of the
        lowest, and fits it on all rows as the other parameters say.
        ``candidates_`` reports the race. It cannot be combined with a
        ``hyperparams`` dict or ``tune_ranges``, which name one function's
        hyperparameters.
    hyperparams : "tune", "fixed" or dict, default="tune"
        ``"tune"`` tunes every hyperparameter from the aggregator's initial
        values; ``"fixed"`` tunes none; a dict fixes the named ones (to the
        given values) and tunes the rest. A dict value may instead be a range,
        ``(low, high, "log")``, ``(low, high, "linear")``,
        ``scipy.stats.loguniform(low, high)`` or ``scipy.stats.uniform(loc,
        scale)``: that hyperparameter is tuned within it. A value (or a
        range's end) outside the hyperparameter's declared limits, here or on
        the aggregator, is a ``ValueError`` at ``fit``, never clipped.
    tune_ranges : dict or None, default=None
        Ranges for some hyperparameters, on top of ``hyperparams``: a dict
        maps hyperparameter names to ranges, in the forms ``hyperparams``
        accepts (``(low, high, "log")``, ``(low, high, "linear")``,
        ``scipy.stats.loguniform``, ``scipy.stats.uniform``); each one named
        is tuned within its range, starting from the aggregator's own value
        moved into it, whatever ``hyperparams`` says of it. Every
        hyperparameter not named follows ``hyperparams`` (under the default
        ``"tune"``, tuned within the aggregator's declared bounds; held where
        ``hyperparams`` fixes it, or under ``"fixed"``). ``None`` or an empty
        dict: ``hyperparams`` alone decides. :class:`HypergradSearchCV` sets
        it to the continuous dimensions of its ``param_space``.
    tuner : str, default="hoag"
        Hypergradient method, a key of ``aggregators.hypergrad.METHODS``
        (listed in :func:`aggregators.hypergrad.hypergradient`). The default,
        implicit differentiation with tolerances that tighten over the outer
        steps (HOAG; exact linear solves on small Hessian blocks), reaches
        the validation loss of ``"implicit-cg"`` in less time: the first
        outer steps, far from the optimum, need neither exact inner solves
        nor exact linear solves.
    tuner_options : dict, default=None
        Options of the method (e.g. ``{"n_steps": 200}`` for ``"reverse"``).
        An aggregation function may declare its own defaults for ``"hoag"``
        (``hoag_eps0``, ``hoag_decay``, ``hoag_min_tol``, as ``Stacking``
        does for exact cross-fitting); options given here override them.
    optimizer : {"lbfgs", "adam"}, default="lbfgs"
        Outer optimizer over the (log-scaled, bounded) hyperparameters.
    cv : int, cross-validation generator or None, default=5
        Folds of the cross-fitted validation loss; ``None`` uses one split
        with ``validation_fraction`` of the rows for validation.
    cv_mode : {"exact", "approx", "auto"}, default="exact"
        How the cross-fitted validation loss is computed while tuning.
        ``"exact"``: the aggregation function is fitted on each fold's
        training rows (``cv`` inner solves per outer step; for a regressor
        whose function is linear in its parameters with a quadratic penalty,
        such as single-target stacking, the same fits in closed form, one
        batched Cholesky factorisation per outer step). ``"approx"``:
        approximate cross-validation, one fit on all rows per outer step and
        one Newton step from it per fold (:func:`aggregators.hypergrad.acv_problem`);
        it needs folds that partition the rows and a smooth training loss
        without ``data_penalty`` (otherwise ``fit`` raises ``ValueError``),
        forms dense Hessians of the aggregation parameters (from the
        predictions' Hessians for functions linear in their parameters,
        :meth:`Aggregator.linear_design`, such as stacking; otherwise by
        differentiating the forward pass twice, practical up to a few
        hundred parameters), and computes any buffers on all rows rather
        than on each fold's. ``"auto"``: ``"approx"`` for aggregation functions that
        are ``smooth`` and ``second_order``, have no ``data_penalty`` and no
        buffers, are linear in their parameters (``linear_design``: stacking
        without passthrough) and have at most
        ``aggregators._fit.ACV_MAX_PARAMS`` parameters, or at most
        ``ACV_LARGE_N_MAX_PARAMS`` with ``ACV_LARGE_N_ROWS_PER_PARAM`` rows per
        parameter, except where the exact folds have the closed form above;
        ``"exact"`` otherwise.
        ``cv=None`` (one split) is always exact.
        ``tuning_history_.attrs["cv_mode"]`` records the mode used and
        ``attrs["cv_solver"]`` how the folds were solved (``"closed-form"``,
        ``"iterative"`` or ``"newton-step"``).
    validation_fraction : float, default=0.25
        Validation share when ``cv=None``.
    max_tuning_rows : "auto", int or None, default="auto"
        Most rows the hyperparameters are tuned on. A larger set is tuned
        on a random subsample of this many rows (stratified by class, every
        class keeping at least as many rows as there are folds), then the
        aggregation function is fitted on all rows at the tuned
        hyperparameters, warm-started from the subsample's fit. Penalty
        weights on the mean training loss (L2 weights, :attr:`Hyperparameter.penalty`)
        are tuned as the same prior per row: the subsample's problems see
        them multiplied by ``n_samples / max_tuning_rows``, and
        ``hyperparams_`` holds the values the fit on all rows uses. The
        tuning then costs about as much at a million rows as at this many,
        and the tuned fit little more than an untuned one.
        ``"auto"``: ``aggregators._fit.AUTO_TUNING_ROWS`` (10 000) rows.
        ``None``: all rows. Only with an int ``cv`` or ``cv=None``: with a
        splitter or explicit splits (which refer to all rows), ``"auto"``
        tunes on all rows and an int is a ``ValueError``. The cross-fitting
        splits, ``validation_loss_``, ``tuning_history_``'s losses and
        ``fold_aggregators_`` are the subsample's;
        ``tuning_history_.attrs["tuning_rows"]`` says how many rows it had.
        With ``aggregator="auto"`` the candidates are also compared on at
        most ``3 * max_tuning_rows`` rows (see ``candidates_``).
    max_outer_iter : int, default=30
        Bound on outer (hyperparameter) iterations. With ``optimizer="lbfgs"``
        the line search may evaluate up to twice as many points, each a row
        of ``tuning_history_``; an aggregation function that declares
        ``shared_stage = True`` is tuned in at most 8 evaluations (its
        weights moved together first, then L-BFGS-B), ``Stacking`` in at
        most 6 (its ``outer_budget``).
        ``0`` neither tunes nor validates: the parameters are fitted on all
        rows at the initial (or fixed) hyperparameters, and
        ``validation_loss_`` is NaN (as for a function with neither
        hyperparameters nor parameters, such as ``GreedySelection``).
    max_inner_iter : int, default=100
        Bound on L-BFGS iterations of each inner solve while tuning. Solves
        are warm-started from the previous outer step, so the bound limits the
        work per step, not the accuracy reached over the run (as in HOAG); the
        final refit on all rows may use up to ten times as many.
    tol : float, default=1e-4
        Decrease of the validation loss over one outer iteration, relative
        to its value at the start, below which tuning stops: a small loss (a
        near-perfect regressor's standardised error) is tuned as far as a
        large one.
    prefit : "auto" or bool, default="auto"
        ``"auto"``: fitted estimators are used as they are, unfitted ones are
        fitted inside; ``True``: every estimator must be fitted already;
        ``False``: every scikit-learn estimator is refit (on clones).
    base_cv : int or cross-validation generator, default=5
        Folds for the out-of-fold predictions of estimators fitted inside.
    device : str, default="auto"
        ``"auto"`` uses CUDA when available, else the CPU.
    dtype : {"float64", "float32"}, default="float64"
    random_state : int, RandomState instance or None, default=None
        Seeds the splits and any random initialisation.
    verbose : int, default=0
        Print one line per outer step when positive.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    estimators_ : list
        The fitted base models (as given when pretrained).
    named_estimators_ : Bunch
    fitted_inside_ : list of str
        Names of the base models this ``fit`` fitted (with out-of-fold
        predictions); the others were used as given.
    base_models_ : dict of str to BaseModel
        The frozen wrappers used for prediction.
    aggregator_ : Aggregator
        The fitted aggregation function (with ``"auto"``, the chosen one).
    candidates_ : DataFrame
        Only with ``aggregator="auto"``: one row per candidate, simplest
        first, indexed by name: ``estimate`` (mean held-out loss over the
        outer folds it ran, each row charged ``1 / (n + 1)`` of the loss of
        an error at the candidate's confidence: log-loss, or a regressor's
        squared error in standardised units), ``held_out_loss`` (the same
        without the charge), ``se_diff`` (standard error of its row-by-row
        difference to the lowest estimate; NaN for a candidate that failed or
        was raced out), ``folds`` (outer folds it was fitted on: fewer than
        ``attrs["n_outer"]`` means it was raced out), ``fit_seconds`` (its
        outer-fold fits, plus the final fit for the winner), ``chosen`` and
        ``error`` (why a candidate could not be fitted, else empty).
        ``attrs`` holds ``n_outer``, ``n_se``, the ``skipped`` candidates
        with the reason, the held-out ``row_losses`` and ``error_losses``
        (candidates x compared rows; NaN where not fitted) and
        ``compared_rows``, the rows they were compared on: all of them, or
        on more than ``2 * max_tuning_rows`` rows (``N_OUTER`` outer folds)
        a stratified subsample of that many, each outer fold's training part
        then holding the rows a fit tunes on (the winner is fitted on all).
    hyperparams_ : dict
        Tuned hyperparameters: ``name -> float``, or a Series by base model.
    tuning_history_ : DataFrame
        One row per outer evaluation: ``validation_loss``,
        ``hypergrad_norm``, ``inner_iter``, ``seconds`` and every
        hyperparameter entry. ``attrs["exact_hessian"]`` says whether the
        inner problems were solved with exact Hessian blocks (Newton, direct
        linear solves) or first-order methods, ``attrs["exact_hessian_reason"]``
        why; ``attrs["cv_mode"]`` is the cross-fitting used, ``"exact"`` or
        ``"approx"`` (``None`` when ``max_outer_iter=0``), and
        ``attrs["cv_mode_reason"]`` why.
    validation_loss_ : float
        Best mean validation log-loss found.
    fold_aggregators_ : list of Aggregator
        One per validation split (``cv`` folds, or the one split when
        ``cv=None``): the aggregation function fitted on that split's
        training rows at the tuned hyperparameters (with
        ``cv_mode="approx"``, the Newton step from the fit on all rows that
        stands in for it). Empty when ``max_outer_iter=0``.
    n_iter_ : int
        Outer evaluations made.
    tuning_time_ : float
        Seconds spent tuning.
    last_routing_ : Series of int
        Rows each base model was called on by the last prediction (zeros
        before any): ``n_samples`` each on the dense path, fewer when the
        aggregation function routes rows (:meth:`Aggregator.route`).
    n_features_in_ : int
    feature_names_in_ : ndarray
        Defined when ``X`` has string column names.

    See Also
    --------
    AggregatedRegressor : the same for regression.
    sklearn.ensemble.StackingClassifier : stacking with a fixed meta-learner.

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.naive_bayes import GaussianNB
    >>> from sklearn.tree import DecisionTreeClassifier
    >>> from aggregators import AggregatedClassifier
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> clf = AggregatedClassifier(
    ...     [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=3))],
    ...     aggregator="weights", random_state=0).fit(X, y)
    >>> clf.predict_proba(X[:2]).shape
    (2, 2)
    """

    _task = "classification"

    def fit(self, X, y, sample_weight=None):
        """Fit the base models that need it, then the tuned aggregation function.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Class labels.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights. The aggregator's training and
            validation losses become weighted means, and base estimators
            fitted inside get the weights in their ``fit`` (one that takes no
            ``sample_weight`` is an error). The cross-fitting folds are drawn
            from all rows, weights aside.

        Returns
        -------
        self
        """
        self._validate_params()
        X_arr, y = validate_data(self, X, y, ensure_all_finite=True)
        sample_weight = _check_weights(sample_weight, X_arr)
        check_classification_targets(y)
        enc = LabelEncoder().fit(y)
        self.classes_ = enc.classes_
        if len(self.classes_) < 2:
            raise ValueError(
                f"the target has only one class ({self.classes_[0]!r}); a classifier "
                "needs at least 2 classes."
            )
        return self._fit(
            X_arr, _base_rows(X, X_arr), y, enc.transform(y),
            n_outputs=len(self.classes_), sample_weight=sample_weight,
        )

    def predict_proba(self, X, *, dense=False) -> np.ndarray:
        """Class probabilities of the aggregated ensemble.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
        dense : bool, default=False
            Call every base model on every row even when the aggregation
            function routes rows to a few of them (for comparison; the
            predictions are the same). ``last_routing_`` counts the calls.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        return torch.softmax(self._aggregate(X, dense), dim=1).cpu().numpy()

    def predict_log_proba(self, X, *, dense=False) -> np.ndarray:
        """Log of :meth:`predict_proba`."""
        return torch.log_softmax(self._aggregate(X, dense), dim=1).cpu().numpy()

    def predict(self, X, *, dense=False) -> np.ndarray:
        """Most probable class of each row (``dense`` as in :meth:`predict_proba`)."""
        scores = self._aggregate(X, dense)  # checks fittedness first
        return self.classes_[scores.argmax(1).cpu().numpy()]


class AggregatedRegressor(RegressorMixin, _BaseAggregated):
    """Combine pretrained regressors with a learnable, hypergradient-tuned function.

    Works as :class:`AggregatedClassifier` with the mean squared error as
    the loss. Base predictions and the target are standardised with the
    target's mean and scale before the aggregation function sees them, so
    hyperparameter ranges do not depend on the target's units.

    Parameters
    ----------
    estimators : list of (str, model)
        Base regressors (see :class:`AggregatedClassifier`).
    aggregator : str or Aggregator, default="auto"
        As for :class:`AggregatedClassifier`; ``"auto"`` compares the
        candidates on their held-out mean squared error.
    hyperparams, tune_ranges, tuner, tuner_options, optimizer, cv, cv_mode, \
validation_fraction, max_tuning_rows, max_outer_iter, max_inner_iter, tol, prefit, base_cv, device, dtype, \
random_state, verbose
        As for :class:`AggregatedClassifier`.

    Attributes
    ----------
    estimators_, named_estimators_, base_models_, aggregator_, candidates_, hyperparams_, \
tuning_history_, validation_loss_, n_iter_, tuning_time_, last_routing_, \
n_features_in_, feature_names_in_
        As for :class:`AggregatedClassifier` (the validation loss is the mean
        squared error in standardised units).
    n_outputs_ : int
        Number of targets.
    y_mean_, y_scale_ : float or ndarray of shape (n_outputs,)
        Mean and standard deviation (1 where it is 0) of the training target
        that base predictions and the target are standardised with; scalars
        when ``y`` was 1-d, in which case :meth:`predict` returns a 1-d array.

    See Also
    --------
    AggregatedClassifier
    sklearn.ensemble.StackingRegressor

    Examples
    --------
    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn.linear_model import Ridge
    >>> from sklearn.tree import DecisionTreeRegressor
    >>> from aggregators import AggregatedRegressor
    >>> X, y = load_diabetes(return_X_y=True)
    >>> reg = AggregatedRegressor(
    ...     [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=3))],
    ...     random_state=0).fit(X, y)
    >>> reg.predict(X[:3]).shape
    (3,)
    """

    _task = "regression"

    def fit(self, X, y, sample_weight=None):
        """Fit the base models that need it, then the tuned aggregation function.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights (see :meth:`AggregatedClassifier.fit`).

        Returns
        -------
        self
        """
        self._validate_params()
        X_arr, y = validate_data(
            self, X, y, ensure_all_finite=True, multi_output=True, y_numeric=True
        )
        sample_weight = _check_weights(sample_weight, X_arr)
        y = np.asarray(y, dtype=np.float64)
        y2 = y.reshape(len(y), -1)
        self.n_outputs_ = y2.shape[1]
        # Same shape as one row of y: a scalar for 1-d y, which is also how
        # predict knows to return 1-d predictions.
        # Weighted statistics with sample weights: those of the data with each
        # row repeated by its weight.
        self.y_mean_ = np.average(y, axis=0, weights=sample_weight)
        scale = np.sqrt(np.average((y - self.y_mean_) ** 2, axis=0, weights=sample_weight))
        self.y_scale_ = np.where(scale > 0, scale, 1.0)
        return self._fit(
            X_arr, _base_rows(X, X_arr), y, (y2 - self.y_mean_) / self.y_scale_,
            n_outputs=self.n_outputs_, standardize=(self.y_mean_, self.y_scale_),
            sample_weight=sample_weight,
        )

    def _transform_outputs(self, Z):
        # Z: (n, n_models, n_outputs); the statistics broadcast over the last axis.
        return (Z - self.y_mean_) / self.y_scale_

    def predict(self, X, *, dense=False) -> np.ndarray:
        """Aggregated prediction of each row.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
        dense : bool, default=False
            Call every base model on every row even when the aggregation
            function routes rows (see :meth:`AggregatedClassifier.predict_proba`).

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_targets)
        """
        out = self._aggregate(X, dense).cpu().numpy() * self.y_scale_ + self.y_mean_
        return out.ravel() if np.ndim(self.y_mean_) == 0 else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
