"""Fitted scikit-learn classifiers and regressors as frozen base models."""

from __future__ import annotations

import numpy as np
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.utils import get_tags
from sklearn.utils.validation import check_is_fitted

from ._base import OUTPUT_METHODS, BaseModel, UnfittedBaseModelError

__all__ = ["SklearnModel", "is_fitted_estimator"]

_METHODS = ("auto", "predict_proba", "decision_function", "predict")


def _unwrapped(estimator):
    """The model inside a ``FrozenEstimator`` (the class itself, not a subclass),
    else ``estimator``. Its tags are a deep copy of the model's and it is fitted
    when the model is: read from the model, both skip the copy, which every
    fit and every check would otherwise pay per model."""
    return estimator.estimator if type(estimator) is FrozenEstimator else estimator


def is_fitted_estimator(estimator) -> bool:
    """Whether a scikit-learn estimator has been fitted (``check_is_fitted``)."""
    estimator = _unwrapped(estimator)
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        return False
    except TypeError:
        return False
    except AttributeError:
        # Not a BaseEstimator (no __sklearn_tags__): apply scikit-learn's own
        # rule by hand, as third-party models that follow the protocol expect.
        if hasattr(estimator, "__sklearn_is_fitted__"):
            return bool(estimator.__sklearn_is_fitted__())
        return any(
            v.endswith("_") and not v.startswith("__") for v in vars(estimator)
        )
    return True


def _estimator_task(estimator) -> str | None:
    """"classification", "regression" or None, also for duck-typed estimators."""
    try:
        # What is_classifier / is_regressor read, from one get_tags call
        # (a FrozenEstimator's tags deep-copy those of the model inside).
        kind = get_tags(_unwrapped(estimator)).estimator_type
    except (AttributeError, TypeError):
        # Not a BaseEstimator (no __sklearn_tags__): fall back to the old
        # ``_estimator_type`` convention that third-party models still follow.
        kind = getattr(estimator, "_estimator_type", None)
    return {"classifier": "classification", "regressor": "regression"}.get(kind)


class SklearnModel(BaseModel):
    """A fitted scikit-learn estimator used as a frozen base model.

    Classifiers give probabilities when they have ``predict_proba``, else
    their decision function, else one-hot predicted labels; regressors give
    ``predict``.

    Parameters
    ----------
    estimator : fitted scikit-learn estimator
        A classifier or regressor that has already been trained.
    method : {"auto", "predict_proba", "decision_function", "predict"}, default="auto"
        Which output to use; ``"auto"`` takes the first available in that order.

    Attributes
    ----------
    task : {"classification", "regression"} or None
        From the estimator's scikit-learn tags (or ``_estimator_type``).
    output : {"proba", "decision", "label", "value"}
        What :meth:`predict_raw` returns.
    classes_ : ndarray or None
        The estimator's ``classes_``.

    Raises
    ------
    ValueError
        If ``method`` is unknown or the estimator does not offer it.

    Notes
    -----
    The wrapper is frozen: ``sklearn.base.clone`` returns it unchanged and
    :meth:`fit` only checks that the estimator is fitted, as
    ``sklearn.frozen.FrozenEstimator`` does. Predicting with an unfitted
    estimator raises :class:`UnfittedBaseModelError`.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from base_models import SklearnModel
    >>> X, y = load_iris(return_X_y=True)
    >>> m = SklearnModel(LogisticRegression(max_iter=500).fit(X, y))
    >>> m.predict_raw(X[:2]).shape
    (2, 3)
    """

    def __init__(self, estimator, method: str = "auto"):
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}; got {method!r}.")
        self.estimator = estimator
        self.method = method
        self.task = _estimator_task(estimator)
        self.output = self._resolve_method()
        if method != "auto" and not hasattr(estimator, method):
            raise ValueError(
                f"method={method!r} was asked for but {type(estimator).__name__} "
                f"has no {method}; use method='auto' to take the first available."
            )

    def _resolve_method(self) -> str:
        if self.task == "regression":
            return "value"
        predict = "label" if self.task == "classification" else "value"
        if self.method == "predict":
            return predict
        for out in ("proba", "decision"):
            name = OUTPUT_METHODS[out]
            # hasattr honours available_if (e.g. SVC(probability=False)).
            if self.method == name or (self.method == "auto" and hasattr(self.estimator, name)):
                return out
        return predict

    @property
    def output_method(self) -> str:
        """The estimator's method :meth:`predict_raw` calls (``predict_proba``, ...)."""
        return OUTPUT_METHODS[self.output]

    @property
    def classes_(self):  # type: ignore[override]
        return getattr(self.estimator, "classes_", None)

    def check_fitted(self) -> None:
        if not is_fitted_estimator(self.estimator):
            raise UnfittedBaseModelError(
                f"{type(self.estimator).__name__} is not fitted: fit it (or the model "
                "inside a FrozenEstimator) first, or pass the bare unfitted estimator "
                "to an Aggregated* estimator with prefit='auto' so that it is fitted "
                "inside with out-of-fold predictions."
            )

    @property
    def method_called(self) -> str:
        """The estimator's method :meth:`predict_raw` calls (``"predict_proba"``, ...)."""
        return self.output_method

    def predict_raw(self, X) -> np.ndarray:
        self.check_fitted()
        return self._predict_checked(X)

    def _predict_checked(self, X) -> np.ndarray:
        """:meth:`predict_raw` for a caller that has just checked the model is fitted
        (the check reads the estimator's tags, a deep copy for a ``FrozenEstimator``)."""
        out = np.asarray(getattr(self.estimator, self.output_method)(X))
        if self.output == "label":
            return out  # labels; one-hot encoding happens at alignment
        out = out.astype(np.float64, copy=False)
        return out.reshape(len(out), -1) if out.ndim == 1 else out

    def _describe(self) -> str:
        return f"{type(self.estimator).__name__}, output={self.output!r}"
