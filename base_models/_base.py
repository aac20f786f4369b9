"""The frozen base-model interface shared by every wrapper."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager

import numpy as np
from sklearn.exceptions import NotFittedError

__all__ = [
    "BaseModel",
    "BaseModelError",
    "BaseModelTypeError",
    "BaseModelValueError",
    "BaseModelWarning",
    "IncompatibleBaseModelError",
    "UnfittedBaseModelError",
    "calling",
]


#: The scikit-learn method that gives each kind of output.
OUTPUT_METHODS = {
    "proba": "predict_proba",
    "decision": "decision_function",
    "label": "predict",
    "value": "predict",
}


def task_of_output(output: str) -> str:
    """The task a model's output serves: regression for values, else classification."""
    return "regression" if output == "value" else "classification"


class UnfittedBaseModelError(NotFittedError):
    """A base model was used for prediction before it was trained."""


class IncompatibleBaseModelError(ValueError):
    """A base model's outputs cannot be combined with the others."""


class BaseModelError(RuntimeError):
    """A base model raised when it was called; the original is the ``__cause__``.

    The message names the model and the method that failed. A ``ValueError``
    or ``TypeError`` of the model comes as :class:`BaseModelValueError` or
    :class:`BaseModelTypeError`, which are also of those types.
    """


class BaseModelValueError(BaseModelError, ValueError):
    """A base model raised a ``ValueError`` (e.g. input of the wrong shape)."""


class BaseModelTypeError(BaseModelError, TypeError):
    """A base model raised a ``TypeError``."""


class BaseModelWarning(UserWarning):
    """A base model's outputs look wrong, or part of them is dropped."""


def _wrapped(name: str, method: str, exc: Exception) -> Exception:
    """The exception that says base model ``name`` failed in ``method`` with ``exc``."""
    if isinstance(exc, (IncompatibleBaseModelError, UnfittedBaseModelError)) and (
        repr(name) in str(exc)
    ):
        return exc  # ours, and it names the model already
    message = f"base model {name!r} failed in {method}: {type(exc).__name__}: {exc}"
    if isinstance(exc, NotFittedError):
        return UnfittedBaseModelError(message)
    if isinstance(exc, IncompatibleBaseModelError):
        return IncompatibleBaseModelError(message)
    if isinstance(exc, ValueError):
        return BaseModelValueError(message)
    if isinstance(exc, TypeError):
        return BaseModelTypeError(message)
    return BaseModelError(message)


@contextmanager
def calling(name: str, method: str):
    """Re-raise whatever a base model raises with its name and the method called.

    The original exception is chained (``raise ... from``); its kind is kept
    where callers rely on it (``NotFittedError``, ``ValueError``,
    ``TypeError``); anything else becomes a :class:`BaseModelError`. A
    ``MemoryError`` passes through unchanged.

    Parameters
    ----------
    name : str
        The model's name in the pool.
    method : str
        What was called (``"predict_proba"``, ``"forward"``, ``"fit"``, ...).

    Examples
    --------
    >>> from base_models import calling
    >>> with calling("f", "predict_proba"):
    ...     {}["x"]
    Traceback (most recent call last):
    ...
    base_models._base.BaseModelError: base model 'f' failed in predict_proba: KeyError: 'x'
    """
    try:
        yield
    except MemoryError:
        raise
    except Exception as e:
        wrapped = _wrapped(name, method, e)
        if wrapped is e:
            raise
        raise wrapped from e


class BaseModel(ABC):
    """A frozen, pretrained model that an aggregator may call but never trains.

    Subclasses wrap one kind of model and implement :meth:`predict_raw`.

    Attributes
    ----------
    task : {"classification", "regression"} or None
        What the wrapped model predicts; ``None`` when it can only be told by
        the data the aggregator is fitted on (plain callables, arrays).
    classes_ : ndarray or None
        Class labels in the order of the columns :meth:`predict_raw` returns,
        for classifiers.
    output : {"proba", "logits", "decision", "label", "value"}
        What the columns of :meth:`predict_raw` hold.
    """

    task: str | None = None
    classes_: np.ndarray | None = None
    output: str = "value"

    def __sklearn_clone__(self):
        # A frozen model is shared, never copied or refit (as FrozenEstimator).
        return self

    def check_fitted(self) -> None:
        """Raise :class:`UnfittedBaseModelError` if the model cannot predict yet."""

    @abstractmethod
    def predict_raw(self, X) -> np.ndarray:
        """Return the model's outputs on ``X`` as a 2-D float array.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
            Rows to predict.

        Returns
        -------
        out : ndarray of shape (n_samples, n_outputs)
        """

    def bind(self, X) -> "BaseModel":
        """The model as an aggregator fitted on the rows ``X`` keeps it.

        ``self`` for most models. A model whose answers depend on which rows
        it was fitted on (:class:`PrecomputedModel` with keys that are only
        row positions) returns a copy that remembers them, never changing
        ``self``, which other aggregators may share.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
            The rows the aggregator is fitted on.

        Returns
        -------
        BaseModel
        """
        return self

    def fit(self, X=None, y=None, **fit_params):
        """No-op: a base model is frozen. Checks it is fitted and returns self."""
        self.check_fitted()
        return self

    @property
    def method_called(self) -> str:
        """What :meth:`predict_raw` calls, as error messages name it."""
        return "predict_raw"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return ""
