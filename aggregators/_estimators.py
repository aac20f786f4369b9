"""AggregatedClassifier and AggregatedRegressor: scikit-learn estimators.

The estimator validates input, collects each base model's predictions once,
splits the rows, hands the engine a bilevel problem per split, and refits the
aggregation parameters on all rows with the tuned hyperparameters.
"""

from __future__ import annotations

import time
import warnings
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import KFold, StratifiedKFold, check_cv, cross_val_predict
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import Bunch
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    check_random_state,
    has_fit_parameter,
    validate_data,
)

from base_models import (
    BaseModel,
    IncompatibleBaseModelError,
    SklearnModel,
    UnfittedBaseModelError,
    as_base_model,
    calling,
    check_class_order,
    class_probabilities,
    is_fitted_estimator,
    regression_outputs,
    resolve_device,
    resolve_dtype,
    small_problem_threads,
    to_tensor,
)

from ._base import AggregationContext
from ._bilevel import HyperSpace, Split, make_fold_problems, make_problem, parse_range
from ._registry import resolve_aggregator
from .hypergrad import METHODS, HessianDecision, InnerDivergenceError, solve_inner, tune

__all__ = ["AggregatedClassifier", "AggregatedRegressor", "HypergradientWarning"]


class HypergradientWarning(ConvergenceWarning):
    """Tuning did not go as asked: it stopped early (an inner solve diverged; the
    last good point is kept), or the engine had to fall back to first-order
    methods (the loss lacks the second derivatives Newton steps need)."""


def _is_sklearn_estimator(obj) -> bool:
    return (
        not isinstance(obj, (BaseModel, type, torch.nn.Module))
        and hasattr(obj, "fit")
        and hasattr(obj, "predict")
        and hasattr(obj, "get_params")
    )


def _is_frozen(obj) -> bool:
    """Whether ``clone`` returns ``obj`` itself (``FrozenEstimator`` and the like).

    Such a model cannot be refit on clones, so it is used as it is.
    """
    try:
        return clone(obj) is obj
    except Exception:  # a duck-typed estimator clone cannot handle: not frozen
        return False


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


class _BaseAggregated(BaseEstimator):
    """Shared machinery of the two estimators (not public)."""

    _task: str = ""

    _parameter_constraints: dict = {
        "estimators": [list],
        "aggregator": [str, HasMethods(["hyperparameters", "init_params", "forward"])],
        "hyperparams": [StrOptions({"tune", "fixed"}), dict],
        "tuner": [StrOptions(set(METHODS))],
        "tuner_options": [None, dict],
        "optimizer": [StrOptions({"lbfgs", "adam"})],
        "cv": [None, Interval(Integral, 2, None, closed="left"), "cv_object"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
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
        aggregator="stacking",
        hyperparams="tune",
        tuner="hoag",
        tuner_options=None,
        optimizer="lbfgs",
        cv=5,
        validation_fraction=0.25,
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
        self.tuner = tuner
        self.tuner_options = tuner_options
        self.optimizer = optimizer
        self.cv = cv
        self.validation_fraction = validation_fraction
        self.max_outer_iter = max_outer_iter
        self.max_inner_iter = max_inner_iter
        self.tol = tol
        self.prefit = prefit
        self.base_cv = base_cv
        self.device = device
        self.dtype = dtype
        self.random_state = random_state
        self.verbose = verbose

    # -- nested parameters: ``rf__max_depth`` as well as ``aggregator__l2`` ---------
    def get_params(self, deep=True):
        out = super().get_params(deep=deep)
        if not deep or not isinstance(self.estimators, list):
            return out
        for item in self.estimators:
            if not (isinstance(item, tuple) and len(item) == 2):
                continue
            name, est = item
            out[name] = est
            if hasattr(est, "get_params") and not isinstance(est, type):
                for key, value in est.get_params(deep=True).items():
                    out[f"{name}__{key}"] = value
        return out

    def set_params(self, **params):
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
        if "estimators" in params:
            self.estimators = params.pop("estimators")
        ests = self.estimators
        named = isinstance(ests, list) and all(
            isinstance(e, tuple) and len(e) == 2 for e in ests
        )
        names = [n for n, _ in ests] if named else []
        replaced = False
        estimators = list(ests) if named else ests
        for name in list(params):
            if name in names:
                estimators[names.index(name)] = (name, params.pop(name))
                replaced = True
        nested: dict = {}
        for key in list(params):
            head, _, rest = key.partition("__")
            if rest and head in names:
                nested.setdefault(head, {})[rest] = params.pop(key)
        for head, sub in nested.items():
            estimators[names.index(head)][1].set_params(**sub)
        if replaced:  # keep the very list object the user gave unless it changed
            self.estimators = estimators
        return super().set_params(**params)

    # -- fit ---------------------------------------------------------------------
    def _check_estimators(self) -> list[tuple[str, object]]:
        ests = self.estimators
        if not all(isinstance(e, tuple) and len(e) == 2 for e in ests):
            raise TypeError(
                "estimators must be a list of (name, model) tuples; got "
                f"{[type(e).__name__ for e in ests]}."
            )
        if len(ests) < 2:
            raise ValueError(
                f"an aggregator needs at least 2 base models; got {len(ests)}. "
                "With a single model there is nothing to combine."
            )
        names = [n for n, _ in ests]
        if len(set(names)) != len(names):
            raise ValueError(f"names of estimators must be unique; got {names}.")
        for n in names:
            if not isinstance(n, str) or "__" in n or n in self.get_params(deep=False):
                raise ValueError(
                    f"estimator name {n!r} is not allowed: names are strings without "
                    "'__' that do not clash with the estimator's own parameters."
                )
        return ests

    def _validate_X(self, X, reset: bool):
        arr = validate_data(self, X, reset=reset, ensure_all_finite=True)
        # Base models get the user's DataFrame (column names, index keys) as is.
        return arr, (X if isinstance(X, (pd.DataFrame, pd.Series)) else arr)

    def _check_model_task(self, name, task) -> None:
        """A regressor in a classifier's pool (or the reverse) is an error naming it."""
        if self._task == "classification" and task == "regression":
            raise IncompatibleBaseModelError(
                f"base model {name!r} is a regressor; a classifier's pool needs "
                "classifiers (or models giving class probabilities)."
            )
        if self._task == "regression" and task == "classification":
            raise IncompatibleBaseModelError(
                f"base model {name!r} is a classifier; a regressor's pool needs "
                "regression models."
            )

    def _base_outputs(self, name, model, Xb, raw=None) -> np.ndarray:
        self._check_model_task(name, model.task)
        # Both name the model in whatever they raise, the model's own errors included.
        if self._task == "classification":
            out = class_probabilities(name, model, Xb, self.classes_, raw=raw)
        else:
            out = regression_outputs(name, model, Xb, self.n_outputs_, raw=raw)
        if not np.all(np.isfinite(out)):
            raise ValueError(f"base model {name!r} returned NaN or infinite predictions.")
        return out

    def _fit_inside(
        self, name, obj, Xb, y_orig, base_cv, sample_weight=None
    ) -> tuple[BaseModel, np.ndarray]:
        """Fit a clone of ``obj`` on all rows; return it and out-of-fold outputs."""
        est = clone(obj)
        method = SklearnModel(est).output_method
        params = {}
        if sample_weight is not None:
            if not has_fit_parameter(est, "sample_weight"):
                raise ValueError(
                    f"base estimator {name!r} ({type(est).__name__}) takes no sample_weight "
                    "in fit, so it cannot be fitted with the weights given: fit it "
                    "yourself and pass it fitted."
                )
            params = {"sample_weight": sample_weight}
        with calling(name, "fit"):
            # Out-of-fold outputs for the aggregator, as scikit-learn's stacking
            # does; the model kept for predict time is fitted on all rows.
            raw = np.asarray(
                cross_val_predict(est, Xb, y_orig, cv=base_cv, method=method, params=params)
            )
            model = SklearnModel(clone(obj).fit(Xb, y_orig, **params))
        if raw.ndim == 1 and (method != "predict" or model.output == "value"):
            raw = raw[:, None]  # binary decision function, single-target regression
        return model, raw

    def _collect(self, Xb, y_orig, sample_weight=None) -> np.ndarray:
        """Fit what must be fitted, and stack every base model's outputs once."""
        base_cv = check_cv(self.base_cv, y_orig, classifier=self._task == "classification")
        models, given, outs = {}, {}, []
        self.fitted_inside_ = []
        for name, obj in self._check_estimators():
            raw = None
            if _is_sklearn_estimator(obj) and not _is_frozen(obj):
                # Before fitting anything: a classifier cannot be fitted on a
                # continuous target, and its error would not say why.
                self._check_model_task(name, SklearnModel(obj).task)
                fitted = is_fitted_estimator(obj)
                if self.prefit is True and not fitted:
                    raise UnfittedBaseModelError(
                        f"base estimator {name!r} ({type(obj).__name__}) is not fitted "
                        "but prefit=True: fit it first, or use prefit='auto'."
                    )
                if self.prefit is False or not fitted:
                    model, raw = self._fit_inside(
                        name, obj, Xb, y_orig, base_cv, sample_weight
                    )
                    self.fitted_inside_.append(name)
                else:
                    model = SklearnModel(obj)
            else:
                # Wrapped / frozen models, torch modules, callables, arrays:
                # used as they are, whatever ``prefit`` says.
                try:
                    model = as_base_model(obj)
                except TypeError as e:
                    raise TypeError(f"base model {name!r}: {e}") from e
                try:
                    model.check_fitted()
                except UnfittedBaseModelError as e:
                    raise UnfittedBaseModelError(
                        f"base model {name!r} is frozen but not fitted: {e}"
                    ) from e
            given[name] = model
            # A copy that remembers these rows where its answers depend on them.
            with calling(name, "bind"):
                models[name] = model = model.bind(Xb)
            outs.append(self._base_outputs(name, model, Xb, raw))
            if self._task == "classification" and model.classes_ is None and (
                model.output != "label"
            ):
                # Its columns were taken to be the classes in sorted order.
                y_enc = np.searchsorted(self.classes_, y_orig)
                check_class_order(name, outs[-1], y_enc, self.classes_, sample_weight)
        self.base_models_ = models
        self.estimators_ = [
            getattr(m, "estimator", getattr(m, "module", m)) for m in given.values()
        ]
        self.named_estimators_ = Bunch(**dict(zip(models, self.estimators_)))
        return np.stack(outs, axis=1)

    def _splits(self, n, y_strat, seed) -> list[tuple[np.ndarray, np.ndarray]]:
        idx = np.arange(n)
        if self.cv is None:
            try:
                tr, va = train_test_split(
                    idx, test_size=self.validation_fraction, random_state=seed,
                    stratify=y_strat,
                )
            except ValueError:  # a class too rare to stratify on
                tr, va = train_test_split(
                    idx, test_size=self.validation_fraction, random_state=seed
                )
            return [(tr, va)]
        if isinstance(self.cv, Integral):
            if y_strat is not None and np.bincount(y_strat).min() >= self.cv:
                splitter = StratifiedKFold(self.cv, shuffle=True, random_state=seed)
            else:
                splitter = KFold(self.cv, shuffle=True, random_state=seed)
        else:
            splitter = check_cv(self.cv, y_strat, classifier=y_strat is not None)
        return list(splitter.split(np.zeros((n, 1)), y_strat))

    def _resolve_hyperparams(self) -> dict:
        if isinstance(self.hyperparams, dict):
            out = dict(self.hyperparams)
        else:
            out = {"__all__": True} if self.hyperparams == "fixed" else {}
        # Set (and removed again) by HypergradSearchCV around its solve: only
        # the searched ranges are tuned, every other hyperparameter stays at
        # its given or initial value, as in a grid search.
        search = getattr(self, "_search_ranges", None)
        if search is not None:
            out = {k: v for k, v in out.items() if k != "__all__" and parse_range(v) is None}
            out.update(search, __others__=True)
        return out

    @staticmethod
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

    def _fit(self, X, y, y_model, y_orig, y_strat, sample_weight=None):
        """``y_model``: what the aggregator is trained on (encoded / standardised)."""
        X_arr, Xb = X
        if X_arr.shape[0] < 2:
            raise ValueError(
                f"an aggregator needs at least 2 samples to fit; got n_samples = "
                f"{X_arr.shape[0]}."
            )
        rs = check_random_state(self.random_state)
        seed = int(rs.randint(np.iinfo(np.int32).max))
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype)
        self.device_ = device

        # Everything that can be checked without the base models' outputs is
        # checked before fitting any of them.
        agg_spec = resolve_aggregator(self.aggregator)
        names = [name for name, _ in self._check_estimators()]
        gen = torch.Generator(device=device).manual_seed(seed)
        n = X_arr.shape[0]
        splits = self._splits(n, y_strat, seed) if self.max_outer_iter > 0 else [(np.arange(n), None)]
        ctx = AggregationContext(
            task=self._task, n_models=len(names),
            n_outputs=len(self.classes_) if self._task == "classification" else self.n_outputs_,
            n_features=X_arr.shape[1], model_names=names,
            classes=getattr(self, "classes_", None), device=device, dtype=dtype, generator=gen,
            n_train=int(round(np.mean([len(tr) for tr, _ in splits]))),
        )
        agg_spec.check_task(ctx)
        specs = agg_spec.hyperparameters(ctx)
        fixed = self._resolve_hyperparams()
        # Held at the aggregator's own values, as given (checked, never clipped).
        if fixed.pop("__all__", False):
            fixed = {s.name: s.init for s in specs}
        if fixed.pop("__others__", False):
            fixed = {**{s.name: s.init for s in specs}, **fixed}
        space = HyperSpace(specs, fixed, device, dtype, owner=type(agg_spec).__name__)

        Z = self._transform_outputs(self._collect(Xb, y_orig, sample_weight))
        # The one host-to-device copy of the data for this fit.
        y_dtype = torch.long if self._task == "classification" else dtype
        full = Split(
            to_tensor(Z, device, dtype),
            torch.as_tensor(y_model, device=device, dtype=y_dtype),
            to_tensor(X_arr, device, dtype) if agg_spec.uses_X else None,
            None if sample_weight is None else to_tensor(sample_weight, device, dtype),
        )

        with small_problem_threads(Z.size, device):
            if self.max_outer_iter == 0:
                # Nothing to tune and nothing to validate: straight to the refit.
                return self._refit_only(agg_spec, ctx, full, space, specs)
            # The folds' problems share h and nothing else: one joint solve
            # (same optimum and hypergradient, a fraction of the solver overhead).
            joint, split_theta, fold_parts = make_fold_problems(
                agg_spec, ctx,
                [(full.take(torch.as_tensor(tr, device=device)),
                  full.take(torch.as_tensor(va, device=device))) for tr, va in splits],
                space,
            )
            _declare_first_order(agg_spec, joint)
            lower, upper = space.bounds()
            callback = _Progress(len(splits)) if self.verbose else None
            t0 = time.perf_counter()
            try:
                result = tune(
                    [joint], space.initial(), lower=lower, upper=upper,
                    method=self.tuner, method_options=self.tuner_options,
                    optimizer=self.optimizer, max_outer_iter=self.max_outer_iter,
                    tol=self.tol, max_inner_iter=self.max_inner_iter, callback=callback,
                    inner_solver=_inner_solver(agg_spec), scale=space.scales(),
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
            self.tuning_time_ = time.perf_counter() - t0
            self.tuning_history_ = self._history_frame(result.history, space, len(splits))
            self._record_hessian(joint.hessian)
            fold_thetas = split_theta(result.thetas[0])

            # Refit the parameters on all rows with the tuned hyperparameters.
            final, packer, buffers = make_problem(agg_spec, ctx, full, None, space)
            self._finish(
                agg_spec, ctx, final, packer, buffers, space, specs, result.h, fold_thetas[0]
            )
            # Each fold's solution at the tuned hyperparameters: the aggregator
            # fitted on that fold's training rows (what cross-validated scores need).
            hyper = {k: v.detach().cpu().numpy() for k, v in space.values(result.h).items()}
            self.fold_aggregators_ = []
            for (packer_k, buffers_k), theta_k in zip(fold_parts, fold_thetas):
                agg_k = clone(agg_spec)
                agg_k._set_fitted(ctx, packer_k.unflatten(theta_k), buffers_k, hyper, specs)
                self.fold_aggregators_.append(agg_k)
        self.validation_loss_ = result.value / len(splits)
        self.n_iter_ = len(result.history)
        return self

    def _refit_only(self, agg_spec, ctx, full, space, specs):
        """``max_outer_iter=0``: fit the parameters on all rows at the initial hyperparameters."""
        final, packer, buffers = make_problem(agg_spec, ctx, full, None, space)
        h = space.initial()
        self.tuning_time_ = 0.0
        self.tuning_history_ = self._history_frame([], space, 1)
        self.validation_loss_ = float("nan")
        self.n_iter_ = 0
        self.fold_aggregators_ = []
        self._finish(agg_spec, ctx, final, packer, buffers, space, specs, h, final.theta0)
        self._record_hessian(final.hessian)
        return self

    def _record_hessian(self, decision) -> None:
        """Say in ``tuning_history_.attrs`` whether the engine formed exact Hessian blocks, and why.

        Warns when they were wanted (small blocks, nothing declared against
        them) but the loss lacks the second derivatives they need.
        """
        if decision is None:
            return
        self.tuning_history_.attrs["exact_hessian"] = decision.exact
        self.tuning_history_.attrs["exact_hessian_reason"] = decision.reason
        if decision.unavailable:
            warnings.warn(
                f"the aggregator is fitted with first-order methods (L-BFGS, conjugate "
                f"gradient) instead of Newton steps: {decision.reason}. Declare "
                "second_order = False on the aggregation function to choose them "
                "without this warning.",
                HypergradientWarning,
                stacklevel=4,
            )

    def _finish(self, agg_spec, ctx, final, packer, buffers, space, specs, h, theta0):
        _declare_first_order(agg_spec, final)
        try:
            theta, n_iter, converged = solve_inner(
                final, h, theta0, max_iter=10 * self.max_inner_iter,
                tol=1e-6,  # predictions do not move below this; 1e-7 is for hypergradients
                solver=_inner_solver(agg_spec),
            )
        except InnerDivergenceError as e:
            raise ValueError(f"refitting the aggregator on all rows diverged: {e}") from e
        out_of_iterations = n_iter >= 10 * self.max_inner_iter
        if not converged and (out_of_iterations or getattr(agg_spec, "smooth", True)):
            warnings.warn(
                "the final fit of the aggregator did not reach its tolerance "
                + (f"in {10 * self.max_inner_iter} iterations; raise max_inner_iter."
                   if out_of_iterations else
                   f"(it stopped making progress after {n_iter} iterations)."),
                ConvergenceWarning,
                stacklevel=4,
            )
        hyper = {k: v.detach().cpu().numpy() for k, v in space.values(h).items()}
        # Updated in place by every prediction (so that predicting does not
        # change the estimator's attributes, as scikit-learn's checks require).
        self.last_routing_ = pd.Series(0, index=list(ctx.model_names), name="rows", dtype=np.int64)
        self.aggregator_ = clone(agg_spec)
        self.aggregator_._set_fitted(ctx, packer.unflatten(theta), buffers, hyper, specs)
        self.hyperparams_ = self.aggregator_.hyperparams_

    @staticmethod
    def _history_frame(history, space: HyperSpace, n_folds: int) -> pd.DataFrame:
        names = space.entry_names()
        rows = []
        for step, e in enumerate(history):
            vals = space.flat_values(torch.as_tensor(e["h"], dtype=space.dtype, device=space.device))
            row = {
                "step": step,
                "validation_loss": e["outer_loss"] / n_folds,
                "hypergrad_norm": e["hypergrad_norm"],
                "inner_iter": e["inner_iter"],
                "seconds": e["seconds"],
            }
            row.update(dict(zip(names, vals)))
            rows.append(row)
        columns = ["step", "validation_loss", "hypergrad_norm", "inner_iter", "seconds", *names]
        return pd.DataFrame(rows, columns=columns)

    def _transform_outputs(self, Z):
        return Z

    # -- predict -----------------------------------------------------------------
    @staticmethod
    def _take_rows(Xb, rows: np.ndarray):
        return Xb.iloc[rows] if isinstance(Xb, (pd.DataFrame, pd.Series)) else Xb[rows]

    def _aggregate(self, X, dense: bool = False) -> torch.Tensor:
        check_is_fitted(self, "aggregator_")
        X_arr, Xb = self._validate_X(X, reset=False)
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
        n, names = X_arr.shape[0], list(self.base_models_)
        if mask is None:
            outs = [self._base_outputs(name, model, Xb) for name, model in self.base_models_.items()]
            counts = np.full(len(names), n)
            Z = self._transform_outputs(np.stack(outs, axis=1))
        else:
            # Each model sees only its routed rows, in one batch; the outputs
            # are scattered back and the other entries get a finite placeholder
            # the aggregation function ignores.
            mask = np.broadcast_to(mask.cpu().numpy().astype(bool), (n, len(names)))
            n_out = len(self.classes_) if self._task == "classification" else self.n_outputs_
            Z = np.full((n, len(names), n_out), np.nan)
            for j, (name, model) in enumerate(self.base_models_.items()):
                rows = np.flatnonzero(mask[:, j])
                if rows.size:
                    Z[rows, j] = self._base_outputs(name, model, self._take_rows(Xb, rows))
            counts = mask.sum(0)
            Z = self._transform_outputs(Z)
            Z = np.where(np.isnan(Z), 1.0 / n_out if self._task == "classification" else 0.0, Z)
        try:
            self.last_routing_.iloc[:] = counts
        except (AttributeError, ValueError):
            # Absent (pickled by an older version) or read-only (a pickle
            # loaded from a memory map): a new Series then.
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
    aggregator : str or Aggregator, default="stacking"
        The aggregation function: ``"stacking"``, ``"weights"`` or an
        :class:`Aggregator` instance (its parameters are reachable as
        ``aggregator__<name>``).
    hyperparams : "tune", "fixed" or dict, default="tune"
        ``"tune"`` tunes every hyperparameter from the aggregator's initial
        values; ``"fixed"`` tunes none; a dict fixes the named ones (to the
        given values) and tunes the rest. A dict value may instead be a range,
        ``(low, high, "log")``, ``(low, high, "linear")``,
        ``scipy.stats.loguniform(low, high)`` or ``scipy.stats.uniform(loc,
        scale)``: that hyperparameter is tuned within it. A value (or a
        range's end) outside the hyperparameter's declared limits, here or on
        the aggregator, is a ``ValueError`` at ``fit``, never clipped.
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
    optimizer : {"lbfgs", "adam"}, default="lbfgs"
        Outer optimizer over the (log-scaled, bounded) hyperparameters.
    cv : int, cross-validation generator or None, default=5
        Folds of the cross-fitted validation loss; ``None`` uses one split
        with ``validation_fraction`` of the rows for validation.
    validation_fraction : float, default=0.25
        Validation share when ``cv=None``.
    max_outer_iter : int, default=30
        Bound on outer (hyperparameter) iterations. With ``optimizer="lbfgs"``
        the line search may evaluate up to twice as many points, each a row
        of ``tuning_history_``. ``0`` neither tunes nor validates: the
        parameters are fitted on all rows at the initial (or fixed)
        hyperparameters, and ``validation_loss_`` is NaN.
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
        The fitted aggregation function.
    hyperparams_ : dict
        Tuned hyperparameters: ``name -> float``, or a Series by base model.
    tuning_history_ : DataFrame
        One row per outer evaluation: ``validation_loss``,
        ``hypergrad_norm``, ``inner_iter``, ``seconds`` and every
        hyperparameter entry. ``attrs["exact_hessian"]`` says whether the
        inner problems were solved with exact Hessian blocks (Newton, direct
        linear solves) or first-order methods, ``attrs["exact_hessian_reason"]``
        why.
    validation_loss_ : float
        Best mean validation log-loss found.
    fold_aggregators_ : list of Aggregator
        One per validation split (``cv`` folds, or the one split when
        ``cv=None``): the aggregation function fitted on that split's
        training rows at the tuned hyperparameters. Empty when
        ``max_outer_iter=0``.
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
        sample_weight = self._check_weights(sample_weight, X_arr)
        check_classification_targets(y)
        enc = LabelEncoder().fit(y)
        self.classes_ = enc.classes_
        if len(self.classes_) < 2:
            raise ValueError(
                f"the target has only one class ({self.classes_[0]!r}); a classifier "
                "needs at least 2 classes."
            )
        y_enc = enc.transform(y)
        Xb = X if isinstance(X, (pd.DataFrame, pd.Series)) else X_arr
        return self._fit((X_arr, Xb), y, y_enc, y, y_enc, sample_weight)

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
    aggregator : str or Aggregator, default="stacking"
    hyperparams, tuner, tuner_options, optimizer, cv, validation_fraction, \
max_outer_iter, max_inner_iter, tol, prefit, base_cv, device, dtype, \
random_state, verbose
        As for :class:`AggregatedClassifier`.

    Attributes
    ----------
    estimators_, named_estimators_, base_models_, aggregator_, hyperparams_, \
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
        sample_weight = self._check_weights(sample_weight, X_arr)
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
        Xb = X if isinstance(X, (pd.DataFrame, pd.Series)) else X_arr
        y_std = (y2 - self.y_mean_) / self.y_scale_
        return self._fit((X_arr, Xb), y, y_std, y, None, sample_weight)

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
