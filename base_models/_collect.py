"""The pool: naming, fitting what must be fitted, collecting base outputs.

An aggregator asks the pool for its base models' outputs, a
``(n_rows, n_models, n_outputs)`` array: once on the training rows in
``fit`` (where unfitted scikit-learn estimators are fitted, with out-of-fold
outputs), and on new rows at predict time, each model on all rows or only on
the rows an aggregation function routes to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import clone
from sklearn.model_selection import check_cv, cross_val_predict
from sklearn.utils import Bunch
from sklearn.utils.validation import has_fit_parameter

from ._base import (
    BaseModel,
    IncompatibleBaseModelError,
    UnfittedBaseModelError,
    calling,
)
from ._pool import (
    as_base_model,
    check_class_order,
    class_probabilities,
    regression_outputs,
)
from ._sklearn import SklearnModel, is_fitted_estimator

__all__ = [
    "PoolFit",
    "check_pool",
    "collect_outputs",
    "fit_pool",
    "pool_outputs",
    "take_rows",
]


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
    except Exception:  # noqa: BLE001 - a duck-typed estimator clone cannot handle: not frozen
        return False


def check_pool(estimators, reserved=()) -> list[tuple[str, Any]]:
    """Check a list of ``(name, model)`` pairs; return it.

    Parameters
    ----------
    estimators : list of (str, model)
    reserved : collection of str, default=()
        Names a model may not take (the owner's own parameter names, which
        nested parameters ``<name>__<param>`` would clash with).

    Returns
    -------
    list of (str, model)
    """
    if not all(isinstance(e, tuple) and len(e) == 2 for e in estimators):
        raise TypeError(
            "estimators must be a list of (name, model) tuples; got "
            f"{[type(e).__name__ for e in estimators]}."
        )
    if len(estimators) < 2:
        raise ValueError(
            f"an aggregator needs at least 2 base models; got {len(estimators)}. "
            "With a single model there is nothing to combine."
        )
    names = [n for n, _ in estimators]
    if len(set(names)) != len(names):
        raise ValueError(f"names of estimators must be unique; got {names}.")
    for n in names:
        if not isinstance(n, str) or "__" in n or n in reserved:
            raise ValueError(
                f"estimator name {n!r} is not allowed: names are strings without "
                "'__' that do not clash with the estimator's own parameters."
            )
    return estimators


def _check_model_task(name: str, model_task: str | None, task: str) -> None:
    """A regressor in a classifier's pool (or the reverse) is an error naming it."""
    if task == "classification" and model_task == "regression":
        raise IncompatibleBaseModelError(
            f"base model {name!r} is a regressor; a classifier's pool needs "
            "classifiers (or models giving class probabilities)."
        )
    if task == "regression" and model_task == "classification":
        raise IncompatibleBaseModelError(
            f"base model {name!r} is a classifier; a regressor's pool needs "
            "regression models."
        )


def _outputs(name, model, Xb, task, classes, n_outputs, raw=None, checked=False) -> np.ndarray:
    """One model's outputs on ``Xb``, checked; ``checked``: the caller has just
    checked that the model is fitted, which a scikit-learn model then skips."""
    _check_model_task(name, model.task, task)
    if raw is None and checked and isinstance(model, SklearnModel):
        with calling(name, model.method_called):
            raw = model._predict_checked(Xb)
    # Both name the model in whatever they raise, the model's own errors included.
    if task == "classification":
        out = class_probabilities(name, model, Xb, classes, raw=raw)
    else:
        out = regression_outputs(name, model, Xb, n_outputs, raw=raw)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"base model {name!r} returned NaN or infinite predictions.")
    return out


def _fit_inside(name, obj, Xb, y, base_cv, sample_weight=None) -> tuple[BaseModel, np.ndarray]:
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
        raw = np.asarray(cross_val_predict(est, Xb, y, cv=base_cv, method=method, params=params))
        model = SklearnModel(clone(obj).fit(Xb, y, **params))
    if raw.ndim == 1 and (method != "predict" or model.output == "value"):
        raw = raw[:, None]  # binary decision function, single-target regression
    return model, raw


@dataclass
class PoolFit:
    """What :func:`fit_pool` learns about a pool.

    Attributes
    ----------
    outputs : ndarray of shape (n_rows, n_models, n_outputs)
        Each model's outputs on the training rows (out-of-fold for the
        models fitted inside); class probabilities aligned to ``classes``
        for classification.
    base_models : dict of str to BaseModel
        The frozen wrappers used for prediction, bound to the training rows.
    estimators : list
        The fitted models themselves (as given when pretrained).
    named_estimators : Bunch
    fitted_inside : list of str
        Names of the models fitted here.
    """

    outputs: np.ndarray
    base_models: dict
    estimators: list
    named_estimators: Bunch
    fitted_inside: list = field(default_factory=list)


def fit_pool(
    estimators,
    Xb,
    y,
    *,
    task: str,
    classes=None,
    n_outputs: int | None = None,
    prefit="auto",
    base_cv=5,
    sample_weight=None,
) -> PoolFit:
    """Fit what must be fitted, and stack every base model's outputs once.

    Parameters
    ----------
    estimators : list of (str, model)
        Checked with :func:`check_pool` beforehand.
    Xb : array-like or DataFrame
        The rows, as the base models take them.
    y : ndarray
        The target as given (base estimators fitted inside are fitted on it).
    task : {"classification", "regression"}
    classes : ndarray, default=None
        The classes, for classification.
    n_outputs : int, default=None
        The number of targets, for regression.
    prefit : "auto" or bool, default="auto"
        ``"auto"``: fitted estimators are used as they are, unfitted ones
        are fitted; ``True``: an unfitted one is an error; ``False``: every
        scikit-learn estimator is refit (on clones). Frozen and wrapped
        models, torch modules, callables and arrays are used as they are.
    base_cv : int or cross-validation generator, default=5
        Folds for the out-of-fold outputs of the models fitted here.
    sample_weight : ndarray, default=None
        Row weights for the models fitted here.

    Returns
    -------
    PoolFit
    """
    base_cv = check_cv(base_cv, y, classifier=task == "classification")
    models, given, outs, inside = {}, {}, [], []
    for name, obj in estimators:
        raw = None
        if _is_sklearn_estimator(obj) and not _is_frozen(obj):
            # Before fitting anything: a classifier cannot be fitted on a
            # continuous target, and its error would not say why.
            wrapped = SklearnModel(obj)  # its tags read once, kept if it is used as given
            _check_model_task(name, wrapped.task, task)
            fitted = is_fitted_estimator(obj)
            if prefit is True and not fitted:
                raise UnfittedBaseModelError(
                    f"base estimator {name!r} ({type(obj).__name__}) is not fitted "
                    "but prefit=True: fit it first, or use prefit='auto'."
                )
            if prefit is False or not fitted:
                model, raw = _fit_inside(name, obj, Xb, y, base_cv, sample_weight)
                inside.append(name)
            else:
                model = wrapped
        else:
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
        outs.append(_outputs(name, model, Xb, task, classes, n_outputs, raw, checked=True))
        if task == "classification" and model.classes_ is None and model.output != "label":
            # Its columns were taken to be the classes in sorted order.
            y_enc = np.searchsorted(classes, y)
            check_class_order(name, outs[-1], y_enc, classes, sample_weight)
    fitted_models = [getattr(m, "estimator", getattr(m, "module", m)) for m in given.values()]
    return PoolFit(
        outputs=np.stack(outs, axis=1),
        base_models=models,
        estimators=fitted_models,
        named_estimators=Bunch(**dict(zip(models, fitted_models))),
        fitted_inside=inside,
    )


def take_rows(Xb, rows: np.ndarray):
    """``Xb[rows]`` for arrays and DataFrames alike."""
    return Xb.iloc[rows] if isinstance(Xb, (pd.DataFrame, pd.Series)) else Xb[rows]


def collect_outputs(
    base_models: dict, Xb, *, task: str, classes=None, n_outputs: int | None = None
) -> np.ndarray:
    """Every base model's outputs on every row, ``(n_rows, n_models, n_outputs)``."""
    outs = [
        _outputs(name, model, Xb, task, classes, n_outputs)
        for name, model in base_models.items()
    ]
    return np.stack(outs, axis=1)


def pool_outputs(
    base_models: dict,
    Xb,
    n_rows: int,
    *,
    task: str,
    classes=None,
    n_outputs: int | None = None,
    mask=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Base outputs on new rows, each model called only on its routed rows.

    Parameters
    ----------
    base_models : dict of str to BaseModel
    Xb : array-like or DataFrame
    n_rows : int
    task, classes, n_outputs
        As for :func:`fit_pool`.
    mask : ndarray of bool, broadcastable to (n_rows, n_models), default=None
        Which rows each model is called on; ``None`` calls every model on
        every row.

    Returns
    -------
    outputs : ndarray of shape (n_rows, n_models, n_outputs)
        NaN where a model was not called.
    counts : ndarray of shape (n_models,)
        Rows each model was called on.
    """
    n_models = len(base_models)
    if mask is None:
        out = collect_outputs(base_models, Xb, task=task, classes=classes, n_outputs=n_outputs)
        return out, np.full(n_models, n_rows)
    # Each model sees only its routed rows, in one batch; the outputs are
    # scattered back into place.
    mask = np.broadcast_to(np.asarray(mask, dtype=bool), (n_rows, n_models))
    width = len(classes) if task == "classification" else n_outputs
    Z = np.full((n_rows, n_models, width), np.nan)
    for j, (name, model) in enumerate(base_models.items()):
        rows = np.flatnonzero(mask[:, j])
        if rows.size:
            Z[rows, j] = _outputs(name, model, take_rows(Xb, rows), task, classes, n_outputs)
    return Z, mask.sum(0)
