"""Plain functions and precomputed prediction arrays as frozen base models."""

from __future__ import annotations

import os
from numbers import Integral

import numpy as np
import pandas as pd

from ._base import BaseModel, task_of_output

__all__ = ["CallableModel", "PrecomputedModel"]

_OUTPUTS = ("proba", "logits", "decision", "label", "value")


def _check_output(output):
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}; got {output!r}.")
    return output


class CallableModel(BaseModel):
    """A plain function ``f(X) -> outputs`` used as a frozen base model.

    Parameters
    ----------
    func : callable
        Maps ``X`` (as given to the aggregator) to an array of shape
        ``(n_samples,)`` or ``(n_samples, n_outputs)``.
    output : {"proba", "logits", "decision", "label", "value"}, default="proba"
        What ``func`` returns.
    classes : array-like, default=None
        Class labels of the output columns (classifiers). When omitted the
        columns are taken to be the sorted labels of the training target.

    Examples
    --------
    >>> import numpy as np
    >>> from base_models import CallableModel
    >>> m = CallableModel(lambda X: np.asarray(X)[:, 0], output="value")
    >>> m.predict_raw(np.ones((3, 2))).ravel()
    array([1., 1., 1.])
    """

    def __init__(self, func, *, output: str = "proba", classes=None):
        if not callable(func):
            raise TypeError(f"CallableModel needs a callable; got {type(func)}.")
        self.func = func
        self.output = _check_output(output)
        self.task = task_of_output(output)
        self.classes_ = None if classes is None else np.asarray(classes)

    def predict_raw(self, X) -> np.ndarray:
        out = np.asarray(self.func(X))
        if self.output == "label":
            return out
        out = out.astype(np.float64, copy=False)
        return out.reshape(len(out), -1) if out.ndim == 1 else out

    def _describe(self) -> str:
        return f"{getattr(self.func, '__name__', 'callable')}, output={self.output!r}"


class PrecomputedModel(BaseModel):
    """Predictions computed earlier (or saved to disk), looked up by row key.

    The rows the aggregator sees are matched to stored predictions by a key:
    the index of a pandas ``X`` (default), or a column of ``X`` named by
    ``key_column``. A row whose key is not stored is an error, never a guess.

    Parameters
    ----------
    predictions : array-like or DataFrame of shape (n_rows, n_outputs)
        Stored outputs. A DataFrame brings its index as keys and, for
        probabilities, its columns as class labels.
    keys : array-like of shape (n_rows,), default=None
        Row keys; the DataFrame index, else ``0 .. n_rows-1``.
    key_column : str or int, default=None
        Column of ``X`` that holds the keys; when ``None`` the index of a
        DataFrame ``X`` is used (a numpy ``X`` then needs ``key_column``).
    output : {"proba", "logits", "decision", "label", "value"}, default="proba"
        What the stored columns hold.
    classes : array-like, default=None
        Class labels of the columns.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from base_models import PrecomputedModel
    >>> m = PrecomputedModel(np.array([[0.2, 0.8], [0.6, 0.4]]), keys=["a", "b"])
    >>> m.predict_raw(pd.DataFrame({"x": [1, 2]}, index=["b", "a"]))
    array([[0.6, 0.4],
           [0.2, 0.8]])
    """

    def __init__(
        self, predictions, *, keys=None, key_column=None, output="proba", classes=None
    ):
        self.output = _check_output(output)
        self.task = task_of_output(output)
        if isinstance(predictions, pd.Series):
            predictions = predictions.to_frame()
        if isinstance(predictions, pd.DataFrame):
            if keys is None:
                keys = predictions.index.to_numpy()
            if classes is None and self.output in ("proba", "logits", "decision"):
                if predictions.shape[1] > 1:
                    classes = predictions.columns.to_numpy()
            predictions = predictions.to_numpy()
        values = np.asarray(predictions)
        if self.output != "label":
            values = values.astype(np.float64)
            if values.ndim == 1:
                values = values[:, None]
        if values.ndim not in (1, 2):
            raise ValueError(
                f"predictions must be 1-D or 2-D; got shape {values.shape}."
            )
        keys = np.arange(len(values)) if keys is None else np.asarray(keys)
        if len(keys) != len(values):
            raise ValueError(
                f"{len(keys)} keys were given for {len(values)} rows of predictions."
            )
        index = pd.Index(keys)
        if not index.is_unique:
            raise ValueError("keys of a PrecomputedModel must be unique.")
        self.predictions = values
        self.keys = keys
        self._index = index
        self.key_column = key_column
        self.classes_ = None if classes is None else np.asarray(classes)

    @classmethod
    def from_file(cls, path, **kwargs) -> "PrecomputedModel":
        """Load stored predictions from ``.npy``, ``.csv`` or ``.parquet``.

        Parameters
        ----------
        path : str or os.PathLike
            File to read; the extension picks the reader.
        index_col : str or int, default=None
            For CSV and Parquet, the column that holds the row keys; all other
            columns are outputs (their header gives the class labels, as
            strings, which :func:`class_probabilities` matches to the target's
            labels by text). Without it the keys are ``0 .. n_rows-1``.
        **kwargs
            Passed to :class:`PrecomputedModel` (``output``, ``key_column``,
            ``classes``, ...).

        Returns
        -------
        PrecomputedModel
        """
        index_col = kwargs.pop("index_col", None)
        ext = os.path.splitext(str(path))[1].lower()
        if ext == ".npy":
            data = np.load(path, allow_pickle=False)
        elif ext == ".csv":
            data = pd.read_csv(path, index_col=index_col)
        elif ext in (".parquet", ".pq"):
            data = pd.read_parquet(path)
            if index_col is not None:
                data = data.set_index(index_col)
        else:
            raise ValueError(
                f"cannot read predictions from {path!r}: use .npy, .csv or .parquet."
            )
        return cls(data, **kwargs)

    def _row_keys(self, X) -> np.ndarray:
        col = self.key_column
        if col is not None:
            if isinstance(X, pd.DataFrame):
                if col in X.columns:
                    return X[col].to_numpy()
                if isinstance(col, Integral) and -X.shape[1] <= col < X.shape[1]:
                    return X.iloc[:, col].to_numpy()
                raise ValueError(
                    f"key_column={col!r} is neither a column name nor a column "
                    f"position of X (columns: {list(X.columns)[:10]})."
                )
            arr = np.asarray(X)
            if arr.ndim != 2:
                raise ValueError(
                    f"X must be 2-D to read keys from it; got shape {arr.shape}."
                )
            if not isinstance(col, Integral) or not -arr.shape[1] <= col < arr.shape[1]:
                raise ValueError(
                    f"key_column={col!r} must be a column position below "
                    f"{arr.shape[1]} when X is an array (names need a DataFrame X)."
                )
            return arr[:, col]
        if isinstance(X, (pd.DataFrame, pd.Series)):
            return X.index.to_numpy()
        raise ValueError(
            "PrecomputedModel cannot tell which stored rows a numpy X refers to: "
            "pass X as a DataFrame whose index holds the keys, or set key_column."
        )

    def predict_raw(self, X) -> np.ndarray:
        keys = self._row_keys(X)
        pos = self._index.get_indexer(keys)
        if (pos < 0).any():
            missing = keys[pos < 0][:5]
            raise ValueError(
                f"PrecomputedModel has no stored prediction for keys {list(missing)}"
                f" ({int((pos < 0).sum())} rows missing)."
            )
        return self.predictions[pos]

    def _describe(self) -> str:
        return f"{self.predictions.shape[0]} rows, output={self.output!r}"
