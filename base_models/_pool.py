"""Turning any model into a base model, and aligning outputs across a pool."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator

from ._base import BaseModel, BaseModelWarning, IncompatibleBaseModelError, calling
from ._callable import CallableModel, PrecomputedModel
from ._sklearn import SklearnModel
from ._torch import TorchModel

__all__ = [
    "as_base_model",
    "check_class_order",
    "check_probabilities",
    "class_probabilities",
    "regression_outputs",
]

# Rows of probabilities may miss [0, 1] or a sum of 1 by this much: float32
# models miss by about 1e-7 per class; scores or logits taken for
# probabilities miss by far more.
PROBA_TOL = 1e-3


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
    if isinstance(obj, type):
        # A class is callable and has ``fit``/``predict`` as attributes, so it
        # would otherwise be taken for a model; say what is expected instead.
        kind = (
            "torch module" if issubclass(obj, torch.nn.Module) else "model"
        )
        raise TypeError(
            f"got the class {obj.__name__}, not a trained instance of it: build "
            f"and train the {kind} first, then pass the instance "
            f"(e.g. {obj.__name__}(...) after training)."
        )
    # Checked before the duck-typed scikit-learn test: a module that also has
    # ``fit``/``predict`` methods is still called as a module.
    if isinstance(obj, torch.nn.Module):
        return TorchModel(obj, **kwargs)
    if isinstance(obj, BaseEstimator) or (
        hasattr(obj, "fit") and hasattr(obj, "predict")
    ):
        return SklearnModel(obj, **kwargs)
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


def check_probabilities(name: str, raw: np.ndarray) -> None:
    """Raise unless the rows of ``raw`` are probabilities, within ``PROBA_TOL``.

    Every value must lie in ``[0, 1]`` and, with more than one column, every
    row must sum to 1 (a single column is the positive class's probability).
    Non-finite values are left to the caller's own check.

    Parameters
    ----------
    name : str
        The model's name in the pool (for messages).
    raw : ndarray of shape (n_samples, n_columns)
        What a model that declares ``output="proba"`` returned.

    Raises
    ------
    IncompatibleBaseModelError
        Naming the model, how many rows are off and by how much.

    Examples
    --------
    >>> import numpy as np
    >>> from base_models import check_probabilities
    >>> check_probabilities("ok", np.array([[0.2, 0.8]]))
    >>> check_probabilities("scaled", np.array([[0.6, 2.4]]))
    Traceback (most recent call last):
    ...
    base_models._base.IncompatibleBaseModelError: base model 'scaled' ...
    """
    raw = np.asarray(raw, dtype=np.float64)
    finite = np.isfinite(raw).all(axis=1)
    vals = raw[finite]
    if vals.size == 0:
        return
    problems = []
    out_of_range = ((vals < -PROBA_TOL) | (vals > 1 + PROBA_TOL)).any(axis=1)
    if out_of_range.any():
        problems.append(
            f"{int(out_of_range.sum())} of {len(vals)} rows hold values outside [0, 1] "
            f"(from {vals.min():.4g} to {vals.max():.4g})"
        )
    if vals.shape[1] > 1:
        sums = vals.sum(axis=1)
        off = np.abs(sums - 1.0) > PROBA_TOL
        if off.any():
            problems.append(
                f"{int(off.sum())} of {len(vals)} rows do not sum to 1 (sums from "
                f"{sums.min():.4g} to {sums.max():.4g})"
            )
    if problems:
        raise IncompatibleBaseModelError(
            f"base model {name!r} declares probabilities (output='proba') but "
            f"{' and '.join(problems)}. If it returns scores or logits, say so: "
            "output='logits' for a TorchModel, CallableModel or PrecomputedModel, "
            "SklearnModel(estimator, method='decision_function') for a scikit-learn "
            "model; otherwise fix the model's outputs."
        )


def check_class_order(
    name: str, proba: np.ndarray, y: np.ndarray, classes, sample_weight=None
) -> None:
    """Warn when a model's columns match the target better in another order.

    For a model without class labels, whose columns are taken to be the
    target's classes in sorted order: ``M[a, b]`` is the mean probability
    the model gives column ``b`` on the rows of class ``a``; the permutation
    of columns with the largest ``sum_a M[a, perm(a)]`` is found by linear
    assignment. When it is not the identity, and beats it by at least 0.1 in
    both the mean probability of the true class and the accuracy of the
    most probable class, a :class:`BaseModelWarning` names the model and
    the better order.

    Parameters
    ----------
    name : str
        The model's name in the pool.
    proba : ndarray of shape (n_samples, n_classes)
        Its probabilities, columns in the order of ``classes``.
    y : ndarray of shape (n_samples,)
        The target, encoded as ``0 .. n_classes-1``.
    classes : array-like of shape (n_classes,)
        The target's class labels (for the message).
    sample_weight : ndarray of shape (n_samples,), default=None
        Row weights.
    """
    k = proba.shape[1]
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, float)
    M = np.zeros((k, k))
    for a in range(k):
        rows = y == a
        if w[rows].sum() > 0:
            M[a] = np.average(proba[rows], axis=0, weights=w[rows])
    _, perm = linear_sum_assignment(M, maximize=True)  # perm[a]: the column for class a
    if np.array_equal(perm, np.arange(k)):
        return
    as_class = np.argsort(perm)  # as_class[b]: the class column b stands for
    top = proba.argmax(axis=1)
    acc_id = np.average(top == y, weights=w)
    acc_perm = np.average(as_class[top] == y, weights=w)
    true_id = np.average(proba[np.arange(len(y)), y], weights=w)
    true_perm = np.average(proba[np.arange(len(y)), perm[y]], weights=w)
    if true_perm - true_id >= 0.1 and acc_perm - acc_id >= 0.1:
        order = [np.asarray(classes)[c].item() for c in as_class]
        warnings.warn(
            f"base model {name!r} has no class labels, so its columns were taken as "
            f"the classes {list(np.asarray(classes).tolist())} in that order, but they "
            f"match the target far better as {order}: mean probability of the true "
            f"class {true_perm:.2f} against {true_id:.2f}, accuracy {acc_perm:.2f} "
            f"against {acc_id:.2f}. If that is its order, give its labels "
            f"(classes={order}).",
            BaseModelWarning,
            stacklevel=3,
        )


def _class_positions(name: str, model_classes, classes) -> np.ndarray:
    """Column of ``classes`` for each of the model's labels (-1: not a target class)."""
    try:
        where = {label: j for j, label in enumerate(classes)}
        pos = np.array([where.get(label, -1) for label in model_classes], dtype=int)
        if (pos < 0).all():
            # Labels read from a CSV / Parquet header are strings even when the
            # target's are integers; match on the text only if that is unambiguous.
            by_text = {str(label): j for j, label in enumerate(classes)}
            if len(by_text) == len(classes):
                pos = np.array(
                    [by_text.get(str(label), -1) for label in model_classes], dtype=int
                )
    except TypeError as e:  # unhashable labels
        raise IncompatibleBaseModelError(
            f"base model {name!r} has class labels that cannot be matched."
        ) from e
    if len(set(pos[pos >= 0].tolist())) != int((pos >= 0).sum()):
        raise IncompatibleBaseModelError(
            f"base model {name!r} has class labels {list(model_classes)[:10]} that "
            "map more than one column onto the same target class."
        )
    return pos


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

    Raises
    ------
    IncompatibleBaseModelError
        If the model's labels share nothing with ``classes``, it predicts a
        label outside them, its column count cannot be matched, or it
        declares probabilities that are not (:func:`check_probabilities`).
    BaseModelError
        If the model itself raises (chained; :func:`calling`).

    Notes
    -----
    Labels are matched by value. Only when no label matches by value are they
    matched by their text (``"1"`` to ``1``), as class labels read back from
    a CSV or Parquet header are strings. Probability given to labels absent
    from ``classes`` is dropped with a warning and each row renormalised.

    Examples
    --------
    >>> import numpy as np
    >>> from base_models import PrecomputedModel, class_probabilities
    >>> m = PrecomputedModel(np.array([[0.3, 0.7]]), classes=["c", "a"])
    >>> class_probabilities("m", m, None, np.array(["a", "b", "c"]), raw=m.predictions)
    array([[0.7, 0. , 0.3]])
    """
    if raw is None:
        with calling(name, model.method_called):
            raw = model.predict_raw(X)
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
    if model.output == "proba":
        check_probabilities(name, raw)
    proba = _to_proba(raw, model.output, len(model_classes))
    if proba.shape != (n, len(model_classes)):
        raise IncompatibleBaseModelError(
            f"base model {name!r} returned shape {raw.shape} for "
            f"{len(model_classes)} classes."
        )
    pos = _class_positions(name, model_classes, classes)
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
            BaseModelWarning,
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
    """Predict with a regression base model (unless ``raw`` is given); check shape."""
    if model.task == "classification":
        raise IncompatibleBaseModelError(
            f"base model {name!r} is a classifier; a regressor's pool needs "
            "regression models."
        )
    if raw is None:
        with calling(name, model.method_called):
            raw = model.predict_raw(X)
    raw = np.asarray(raw, dtype=np.float64)
    raw = raw.reshape(len(raw), -1)
    if raw.shape[1] != n_targets:
        raise IncompatibleBaseModelError(
            f"base model {name!r} returns {raw.shape[1]} outputs per row but the "
            f"target has {n_targets}."
        )
    return raw
