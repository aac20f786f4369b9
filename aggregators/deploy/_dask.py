"""Scoring past one machine: :func:`score_dask` over a ``dask.dataframe``."""

from __future__ import annotations

import os

from sklearn.utils.validation import check_is_fitted

from ._persist import load
from ._score import empty_output, make_spec, score_frame

__all__ = ["score_dask"]


def _import_dask():
    try:
        import dask  # noqa: PLC0415
        import dask.dataframe  # noqa: F401, PLC0415 (map_partitions needs it loaded)
    except ImportError as e:  # an optional extra
        raise ImportError(
            "score_dask needs Dask: pip install 'hyperagg[dask]' (dask[dataframe] and "
            "distributed)."
        ) from e
    return dask


def _score_partition(df, est, spec):
    return score_frame(est, df, spec)[0]


def score_dask(
    model,
    ddf,
    *,
    columns=None,
    id_column=None,
    keep_columns=(),
    on_bad_rows: str = "error",
    trusted=None,
    modules=None,
):
    """Score a ``dask.dataframe`` lazily, partition by partition.

    The output has the columns :func:`aggregators.score_file` writes, and the
    input's index. The fitted model enters the task graph once, as one
    ``dask.delayed`` object that every partition's task depends on, so a
    ``dask.distributed`` cluster ships it to each worker once, not once per
    partition.

    Parameters
    ----------
    model : estimator or path
        A fitted estimator, or a file written by :func:`aggregators.save`.
    ddf : dask.dataframe.DataFrame
        The rows to score.
    columns, id_column, keep_columns
        As in :func:`aggregators.score_file`.
    on_bad_rows : {"error", "skip"}, default="error"
        Rows with a missing feature value: fail the computation with an error
        naming them, or drop them from the output.
    trusted, modules
        Passed to :func:`aggregators.load` when ``model`` is a path.

    Returns
    -------
    dask.dataframe.DataFrame

    Examples
    --------
    >>> import dask.dataframe as dd  # doctest: +SKIP
    >>> scores = score_dask("ensemble.hyperagg", dd.read_parquet("rows/"))  # doctest: +SKIP
    >>> scores.to_parquet("scores/")  # doctest: +SKIP
    """
    dask = _import_dask()
    if isinstance(model, (str, os.PathLike)):
        est = load(model, trusted, modules=modules)
    else:
        check_is_fitted(model)
        est = model
    names = [str(c) for c in ddf.columns]
    spec = make_spec(est, names, columns, id_column, keep_columns, on_bad_rows)
    meta = empty_output(est, spec, ddf._meta)
    meta.index = ddf._meta.index[:0]
    shared = dask.delayed(est, pure=True, traverse=False)
    return ddf.map_partitions(_score_partition, shared, spec, meta=meta,
                              enforce_metadata=False)
