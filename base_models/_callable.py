"""Plain functions and precomputed prediction arrays as frozen base models."""

from __future__ import annotations

import copy
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


def _row_hashes(X) -> np.ndarray:
    """One 64-bit hash of each row's values (numbers compared as float64)."""
    try:
        frame = pd.DataFrame(np.asarray(X, dtype=np.float64).reshape(len(X), -1))
    except (TypeError, ValueError):  # columns that are not numbers
        frame = pd.DataFrame(X).reset_index(drop=True)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


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

    @property
    def method_called(self) -> str:
        """``"<function name>(X)"``, as error messages name it."""
        return f"{getattr(self.func, '__name__', 'callable')}(X)"

    def _describe(self) -> str:
        return f"{getattr(self.func, '__name__', 'callable')}, output={self.output!r}"


class PrecomputedModel(BaseModel):
    """Predictions computed earlier (or saved to disk), looked up by row key.

    The rows the aggregator sees are matched to stored predictions by a key:
    the index of a pandas ``X`` (default), or a column of ``X`` named by
    ``key_column``. A row whose key is not stored is an error, never a guess,
    and so is a row it cannot tell apart from another (see Notes).

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

    Notes
    -----
    Without ``keys`` (and without a DataFrame index other than the default
    ``0 .. n_rows-1``) the keys are only **row positions**, and looked up in
    the index of ``X`` they tell rows apart only as long as every row keeps
    one number. A new DataFrame gets the default index ``0 .. n-1`` again:
    its rows would receive the stored predictions of other rows that had
    those numbers. So, with positional keys and no ``key_column``, rows are
    compared by their feature values (a hash of each row):

    * rows of one ``X`` under the same key must be equal;
    * once an aggregator is fitted on rows ``X_fit`` (it keeps the copy
      :meth:`bind` returns), a row predicted later under a key that a row of
      ``X_fit`` had must equal that row. The same rows again (``predict``
      on the training rows) are fine, and so are keys the fit rows did not
      have (other rows of the frame the predictions were stored for, such
      as ``df.iloc[n:]``).

    Anything else is a ``ValueError`` that asks for explicit keys: ``keys``
    (with ``X`` indexed by them), or ``key_column``. With either, keys are
    taken as given and never compared.

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
        # Keys that are only row positions (see Notes).
        positional = keys is None
        if isinstance(predictions, pd.Series):
            predictions = predictions.to_frame()
        if isinstance(predictions, pd.DataFrame):
            if keys is None:
                positional = predictions.index.equals(pd.RangeIndex(len(predictions)))
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
        self._positional = positional
        self._fit_rows = None  # (keys, row hashes) of the rows bound at fit (bind)

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
            labels by text). Without it the keys are ``0 .. n_rows-1``, row
            positions (see Notes of :class:`PrecomputedModel`).
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

    @property
    def method_called(self) -> str:
        """``"the lookup of stored predictions"``, as error messages name it."""
        return "the lookup of stored predictions"

    def _compares_rows(self) -> bool:
        return getattr(self, "_positional", False) and self.key_column is None

    def bind(self, X) -> "PrecomputedModel":
        """A copy that remembers the rows ``X`` by key, when keys are positions.

        See Notes: rows predicted later under a key of ``X`` must equal that
        row of ``X``. ``self`` when keys were given or ``key_column`` is set.
        """
        if not self._compares_rows() or not isinstance(X, (pd.DataFrame, pd.Series)):
            return self  # (a numpy X without key_column is refused at predict_raw)
        keys = self._row_keys(X)
        hashes = _row_hashes(X)
        self._check_same_key_same_row(keys, hashes)
        first = ~pd.Index(keys).duplicated()
        bound = copy.copy(self)
        # Plain arrays (any persistence format takes them): unique keys, row hashes.
        bound._fit_rows = (np.asarray(keys)[first], hashes[first])
        return bound

    def _check_same_key_same_row(self, keys, hashes) -> None:
        """Raise if rows under one key differ, within ``X`` or from the fit rows."""
        rows = pd.Series(hashes, index=keys)
        clash = rows.index.duplicated(keep=False)
        if clash.any():
            clash &= rows.groupby(level=0).transform("nunique").to_numpy() > 1
        if clash.any():
            shown = pd.unique(keys[clash])[:5].tolist()
            raise ValueError(
                "PrecomputedModel cannot tell rows apart: its keys are row positions "
                "(none were given), read from X's index, and rows of X that differ "
                f"share the keys {shown}. Give explicit keys: PrecomputedModel(..., "
                "keys=...) with X indexed by them, or key_column=<the column of X "
                "holding them>."
            )
        fit = getattr(self, "_fit_rows", None)
        if fit is None:
            return
        fit_keys, fit_hashes = fit
        pos = pd.Index(fit_keys).get_indexer(keys)
        other = np.zeros(len(keys), dtype=bool)
        known = pos >= 0
        other[known] = fit_hashes[pos[known]] != hashes[known]
        if other.any():
            shown = keys[other][:5].tolist()
            raise ValueError(
                f"PrecomputedModel cannot tell {int(other.sum())} of these {len(keys)} "
                "rows from the rows it was fitted on: its keys are row positions (none "
                "were given), read from X's index, and these rows carry keys the fit "
                f"rows had (e.g. {shown}) but hold other values, as a new DataFrame's "
                "default index 0..n-1 would. Their stored predictions would be those "
                "of the fit rows. Give explicit keys: PrecomputedModel(..., keys=...) "
                "with X indexed by them, or key_column=<the column of X holding them>."
            )

    def predict_raw(self, X) -> np.ndarray:
        keys = self._row_keys(X)
        if self._compares_rows():
            self._check_same_key_same_row(keys, _row_hashes(X))
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
