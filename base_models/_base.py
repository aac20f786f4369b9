"""The frozen base-model interface shared by every wrapper."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from sklearn.exceptions import NotFittedError

__all__ = [
    "BaseModel",
    "IncompatibleBaseModelError",
    "UnfittedBaseModelError",
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

    def fit(self, X=None, y=None, **fit_params):
        """No-op: a base model is frozen. Checks it is fitted and returns self."""
        self.check_fitted()
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return ""
