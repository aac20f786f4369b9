"""Turning any model into a base model, and aligning outputs across a pool."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator

from ._base import BaseModel, IncompatibleBaseModelError
from ._callable import CallableModel, PrecomputedModel
from ._sklearn import SklearnModel
from ._torch import TorchModel

__all__ = ["as_base_model", "class_probabilities", "regression_outputs"]


def as_base_model(obj, **kwargs) -> BaseModel:
    """Wrap any supported model as a frozen :class:`BaseModel`.

    Parameters
    ----------
    obj : object
        A :class:`BaseModel` (returned as is), a fitted scikit-learn
        estimator, a ``torch.nn.Module``, a numpy array or DataFrame of stored
        predictions, or a callable ``f(X)``.
    **kwargs
        Passed to the wrapper (e.g. ``output="proba"`` for a torch module).

    Returns
    -------
    BaseModel

    Examples
    --------
    >>> import numpy as np
    >>> from base_models import as_base_model
    >>> as_base_model(lambda X: np.zeros(len(X)), output="value")
    CallableModel(<lambda>, output='value')
    """
    if isinstance(obj, BaseModel):
        if kwargs:
            raise TypeError("options cannot be given for an object already wrapped.")
        return obj
    if isinstance(obj, BaseEstimator) or (
        hasattr(obj, "fit") and hasattr(obj, "predict")
    ):
        return SklearnModel(obj, **kwargs)
    try:
        import torch

        if isinstance(obj, torch.nn.Module) or (
            isinstance(obj, type) and issubclass(obj, torch.nn.Module)
        ):
            return TorchModel(obj, **kwargs)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if hasattr(obj, "__array__") or hasattr(obj, "to_numpy"):
        return PrecomputedModel(obj, **kwargs)
    if callable(obj):
        return CallableModel(obj, **kwargs)
    raise TypeError(
        f"cannot use an object of type {type(obj).__name__} as a base model: pass a "
        "fitted scikit-learn estimator, a torch.nn.Module, a callable or an array "
        "of predictions."
    )


def _to_proba(raw: np.ndarray, output: str, n_cols: int) -> np.ndarray:
    """Map a model's raw columns to probabilities over its own columns."""
    if output == "proba":
        if raw.shape[1] == 1 and n_cols == 2:
            p = raw[:, 0]
            return np.column_stack([1.0 - p, p])
        return raw
    if output in ("logits", "decision"):
        if raw.shape[1] == 1 and n_cols == 2:
            p = expit(raw[:, 0])
            return np.column_stack([1.0 - p, p])
        return softmax(raw, axis=1)
    raise AssertionError(output)  # labels are handled by the caller


def class_probabilities(
    name: str, model: BaseModel, X, classes, raw: np.ndarray | None = None
) -> np.ndarray:
    """Predict with ``model`` and return probabilities aligned to ``classes``.

    Columns of a model that knows only some of ``classes`` are placed by
    label and the missing ones are zero; a model whose labels share nothing
    with ``classes`` is an error naming it.

    Parameters
    ----------
    name : str
        The model's name in the pool (for messages).
    model : BaseModel
    X : array-like
        Rows to predict.
    classes : ndarray
        The target's class labels, sorted.
    raw : ndarray, default=None
        Outputs already computed (e.g. out-of-fold); ``model`` is then not called.

    Returns
    -------
    proba : ndarray of shape (n_samples, n_classes)
    """
    raw = model.predict_raw(X) if raw is None else raw
    n = len(raw)
    if model.output == "label":
        labels = np.asarray(raw).ravel()
        unknown = ~np.isin(labels, classes)
        if unknown.any():
            raise IncompatibleBaseModelError(
                f"base model {name!r} predicts labels {np.unique(labels[unknown])[:5]}"
                f" that are not among the target classes {list(classes)}."
            )
        out = (labels[:, None] == np.asarray(classes)[None, :]).astype(np.float64)
        return out
    model_classes = model.classes_
    if model_classes is None:
        n_cols = raw.shape[1] if raw.shape[1] > 1 else 2
        if n_cols != len(classes):
            raise IncompatibleBaseModelError(
                f"base model {name!r} returns {n_cols} class columns but the target "
                f"has {len(classes)} classes; give its class labels (classes=...)."
            )
        model_classes = np.asarray(classes)
    model_classes = np.asarray(model_classes)
    proba = _to_proba(raw, model.output, len(model_classes))
    if proba.shape != (n, len(model_classes)):
        raise IncompatibleBaseModelError(
            f"base model {name!r} returned shape {raw.shape} for "
            f"{len(model_classes)} classes."
        )
    try:
        where = {label: j for j, label in enumerate(classes)}
        pos = np.array([where.get(label, -1) for label in model_classes])
    except TypeError as e:  # unhashable labels
        raise IncompatibleBaseModelError(
            f"base model {name!r} has class labels that cannot be matched."
        ) from e
    if (pos < 0).all():
        raise IncompatibleBaseModelError(
            f"base model {name!r} knows classes {list(model_classes)[:10]}, none of "
            f"which is among the target classes {list(classes)[:10]}: its label set "
            "is incompatible (check label types and encoding)."
        )
    if (pos < 0).any():
        warnings.warn(
            f"base model {name!r} knows classes {list(model_classes[pos < 0])} that "
            "are absent from the target; their probability is dropped and the rest "
            "renormalised.",
            UserWarning,
            stacklevel=3,
        )
    out = np.zeros((n, len(classes)))
    out[:, pos[pos >= 0]] = proba[:, pos >= 0]
    total = out.sum(axis=1, keepdims=True)
    # Renormalise only where mass was dropped; zero rows stay for the clip later.
    np.divide(out, total, out=out, where=total > 0)
    return out


def regression_outputs(
    name: str, model: BaseModel, X, n_targets: int, raw: np.ndarray | None = None
) -> np.ndarray:
    """Predict with a regression base model (unless ``raw`` is given); check its shape."""
    if model.task == "classification":
        raise IncompatibleBaseModelError(
            f"base model {name!r} is a classifier; a regressor's pool needs "
            "regression models."
        )
    raw = np.asarray(model.predict_raw(X) if raw is None else raw, dtype=np.float64)
    raw = raw.reshape(len(raw), -1)
    if raw.shape[1] != n_targets:
        raise IncompatibleBaseModelError(
            f"base model {name!r} returns {raw.shape[1]} outputs per row but the "
            f"target has {n_targets}."
        )
    return raw
