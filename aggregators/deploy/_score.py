"""Batch scoring of Parquet/CSV files: :func:`score_file`.

The input is streamed with pyarrow datasets in chunks of ``chunk_rows`` rows;
each chunk's output is written to its own file in a work folder beside the
output (``<output>.partial/``), atomically, and recorded there with the settings
of the run. Only when every chunk is done are they concatenated, in input order,
into a temporary file that is then moved onto the output name: a run that dies
leaves no partial output under that name, and ``resume=True`` restarts from the
chunks already written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import is_classifier
from sklearn.utils.validation import check_is_fitted

from ._persist import estimator_summary, load, place_on_device

__all__ = ["ScoreReport", "score_file"]

_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_CHUNK = "chunk-{:08d}"
_STATE = "state.json"


@dataclass
class ScoreReport:
    """What a :func:`score_file` run did.

    Attributes
    ----------
    output : pathlib.Path
        The file written.
    rows_read : int
        Input rows.
    rows_scored : int
        Rows written to the output.
    rows_skipped : int
        Rows left out for missing values (``on_bad_rows="skip"``).
    skipped_path : pathlib.Path or None
        The side file listing the skipped rows' ids, when any were skipped.
    chunks : int
        Chunks in the input.
    chunks_resumed : int
        Chunks found finished by an earlier run and not scored again.
    seconds : float
        Wall time of the run.
    """

    output: Path
    rows_read: int
    rows_scored: int
    rows_skipped: int
    skipped_path: Path | None
    chunks: int
    chunks_resumed: int
    seconds: float


# -- what to read and write --------------------------------------------------------
def file_format(path) -> str:
    """``"parquet"`` or ``"csv"``, from the file name (a folder is a Parquet dataset)."""
    path = Path(path)
    if path.is_dir():
        return "parquet"
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its extension: use "
            f"one of {sorted(_FORMATS)} (or a folder of Parquet files)."
        )
    return fmt


def output_columns(est) -> list[str]:
    """The prediction columns :func:`score_file` writes for ``est``."""
    if is_classifier(est):
        return [f"proba_{c}" for c in est.classes_] + ["prediction"]
    n = int(getattr(est, "n_outputs_", 1))
    return ["prediction"] if n == 1 else [f"prediction_{k}" for k in range(n)]


def feature_columns(est, names: list[str], columns=None, exclude=()) -> list[str]:
    """The input columns fed to ``est``, checked against what it was fitted on.

    Raises ``ValueError`` naming the missing or differing columns.
    """
    fitted = getattr(est, "feature_names_in_", None)
    fitted = None if fitted is None else [str(c) for c in fitted]
    if columns is not None:
        columns = [str(c) for c in columns]
        if fitted is not None and columns != fitted:
            missing = [c for c in fitted if c not in columns]
            extra = [c for c in columns if c not in fitted]
            what = (f"missing {missing}" if missing else "") + (
                f"{'; ' if missing else ''}not fitted on {extra}" if extra else ""
            ) or "the same names in another order"
            raise ValueError(
                f"columns={columns} differ from the features the model was fitted on "
                f"(feature_names_in_ = {fitted}): {what}."
            )
    else:
        columns = fitted
    if columns is None:
        columns = [c for c in names if c not in exclude]
        if len(columns) != est.n_features_in_:
            raise ValueError(
                f"the model was fitted on {est.n_features_in_} unnamed features but the "
                f"input has {len(columns)} columns besides the id and kept ones "
                f"({columns[:10]}{'...' if len(columns) > 10 else ''}); name the "
                "feature columns with columns=[...]."
            )
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(
            f"the input lacks the feature column(s) {missing} that the model needs; "
            f"its columns are {names[:20]}{' ...' if len(names) > 20 else ''}."
        )
    return columns


@dataclass
class _Spec:
    """The column layout of a scoring run; shared with :func:`score_dask`."""

    features: list[str]
    id_column: str | None
    keep_columns: list[str]
    on_bad_rows: str
    named: bool  # the model was fitted on a DataFrame (feature names)


def make_spec(est, names, columns=None, id_column=None, keep_columns=(), on_bad_rows="error"):
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip'; got {on_bad_rows!r}.")
    keep = [str(c) for c in keep_columns]
    for c in ([id_column] if id_column is not None else []) + keep:
        if c not in names:
            raise ValueError(f"the input has no column {c!r} (id or kept column).")
    exclude = set(keep) | ({id_column} if id_column is not None else set())
    feats = feature_columns(est, list(names), columns, exclude)
    return _Spec(feats, id_column, keep, on_bad_rows, hasattr(est, "feature_names_in_"))


def score_frame(est, df: pd.DataFrame, spec: _Spec, first_row: int = 0):
    """Score one pandas chunk: ``(output frame, ids of the rows skipped)``.

    ``first_row`` is the chunk's position in the input, used as the row id of
    skipped rows when there is no id column.
    """
    X = df[spec.features]
    bad = X.isna().to_numpy().any(axis=1)
    ids = (df[spec.id_column].to_numpy() if spec.id_column is not None
           else np.arange(first_row, first_row + len(df)))
    if bad.any():
        if spec.on_bad_rows == "error":
            rows = np.flatnonzero(bad)
            cols = [c for c in spec.features if X[c].iloc[rows].isna().any()]
            raise ValueError(
                f"{bad.sum()} row(s) have missing values (first ids: {ids[rows[:5]].tolist()}; "
                f"columns {cols[:10]}); pass on_bad_rows='skip' to leave them out."
            )
        df, X = df[~bad], X[~bad]
    skipped = ids[bad]
    out = pd.DataFrame(index=df.index)  # score_dask keeps the input's index
    if spec.id_column is not None:
        out[spec.id_column] = df[spec.id_column].array  # .array keeps the dtype
        # Stored predictions (PrecomputedModel) are matched to rows by index.
        X = X.set_axis(pd.Index(df[spec.id_column].to_numpy(), name=spec.id_column), axis=0)
    for c in spec.keep_columns:
        out[c] = df[c].array
    Xin = X if spec.named else X.to_numpy()
    if len(df):
        if is_classifier(est):
            proba = est.predict_proba(Xin)
            for j, c in enumerate(est.classes_):
                out[f"proba_{c}"] = proba[:, j]
            # The most probable class, as predict gives, without calling the
            # base models a second time.
            out["prediction"] = est.classes_[proba.argmax(axis=1)]
        else:
            pred = np.asarray(est.predict(Xin)).reshape(len(df), -1)
            for k, c in enumerate(output_columns(est)):
                out[c] = pred[:, k]
    else:
        out = empty_output(est, spec, df).set_axis(df.index, axis=0)
    return out, skipped


def empty_output(est, spec: _Spec, df: pd.DataFrame) -> pd.DataFrame:
    """A zero-row frame with the output's columns and dtypes (Dask's ``meta``)."""
    cols = {}
    for c in ([spec.id_column] if spec.id_column is not None else []) + spec.keep_columns:
        cols[c] = df[c].iloc[:0].array
    for c in output_columns(est):
        if c == "prediction" and is_classifier(est):
            cols[c] = np.asarray(est.classes_)[:0]
        else:
            cols[c] = np.zeros(0)
    return pd.DataFrame(cols)


# -- the run -----------------------------------------------------------------------
def _fingerprint(path: Path) -> list:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def _model_id(est) -> str:
    """A fingerprint of the fitted model that survives save/load.

    Its description (classes, features, base models, tuned hyperparameters),
    not its bytes: the same model, given as a file or as the loaded object,
    may resume the other's run; another fit of it may not.
    """
    blob = json.dumps(estimator_summary(est), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_table(table, path: Path, fmt: str) -> None:
    """Write ``table`` to ``path`` atomically (a temporary name, then a rename).

    ``fmt="arrow"`` is the work folder's own format (Arrow IPC, uncompressed):
    its chunk files are read once, so encoding them would only cost time.
    """
    import pyarrow.csv as pacsv  # noqa: PLC0415
    import pyarrow.feather as feather  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "arrow":
        feather.write_feather(table, tmp, compression="uncompressed")
    elif fmt == "parquet":
        pq.write_table(table, tmp)
    else:
        pacsv.write_csv(table, tmp)
    os.replace(tmp, path)


def _read_part(path: Path):
    import pyarrow.feather as feather  # noqa: PLC0415

    return feather.read_table(path, memory_map=True)


def _concat(parts: list[Path], output: Path, fmt: str) -> None:
    """Concatenate chunk files into ``output``, streaming, then move it into place."""
    import pyarrow.csv as pacsv  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    writer = None
    try:
        for part in parts:
            table = _read_part(part)
            if writer is None:
                writer = (pq.ParquetWriter(tmp, table.schema) if fmt == "parquet"
                          else pacsv.CSVWriter(tmp, table.schema))
            writer.write_table(table.cast(writer.schema) if fmt == "parquet" else table)
        if writer is not None:
            writer.close()
            writer = None
        os.replace(tmp, output)
    finally:
        if writer is not None:
            writer.close()
        Path(tmp).unlink(missing_ok=True)


def _chunks(dataset, columns, chunk_rows):
    """Record batches of exactly ``chunk_rows`` rows (the last one shorter), in order.

    Fixed boundaries make a resumed run's chunk ``i`` the same rows as the
    first run's, whatever sizes the reader happens to return.
    """
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.dataset as ds  # noqa: PLC0415

    options = None
    if isinstance(dataset.format, ds.ParquetFileFormat):
        # Parquet's pre-buffering reads ahead whole row groups' column chunks
        # as fast as the disk allows: behind a consumer slower than the disk
        # (any model) it ends up holding most of the file.
        options = ds.ParquetFragmentScanOptions(pre_buffer=False)
    pending, n = [], 0
    # Little read-ahead, and no reader threads: the threaded scanner keeps
    # decoding row groups while the model works on a chunk, and its queue,
    # not chunk_rows, then sets the memory. Decoding is a small share of
    # scoring; the model gets the cores.
    for batch in dataset.to_batches(columns=columns, batch_size=min(chunk_rows, 1 << 16),
                                    batch_readahead=1, fragment_readahead=1,
                                    fragment_scan_options=options, use_threads=False):
        pending.append(batch)
        n += batch.num_rows
        while n >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, chunk_rows)
            rest = table.slice(chunk_rows)
            pending, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(pending)


def open_dataset(path, fmt: str, est=None, columns=None):
    """A pyarrow dataset over ``path``; CSV integer features are read as floats.

    pyarrow infers a CSV column's type from its first block: a column of whole
    numbers there and decimals later would fail halfway through the file.
    """
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.csv as pacsv  # noqa: PLC0415
    import pyarrow.dataset as ds  # noqa: PLC0415

    dataset = ds.dataset(str(path), format=fmt)
    if fmt == "csv" and est is not None:
        names = dataset.schema.names
        try:
            feats = feature_columns(est, names, columns)
        except ValueError:
            return dataset  # reported with the caller's full context
        types = {c: pa.float64() for c in feats
                 if pa.types.is_integer(dataset.schema.field(c).type)}
        if types:
            fmt_ = ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types=types))
            dataset = ds.dataset(str(path), format=fmt_)
    return dataset


def score_file(
    model,
    input,
    output,
    *,
    chunk_rows: int = 100_000,
    columns=None,
    id_column: str | None = None,
    keep_columns=(),
    resume: bool = False,
    on_bad_rows: str = "error",
    device="auto",
    progress: bool = True,
    trusted=None,
    modules=None,
) -> ScoreReport:
    """Score a Parquet or CSV file of any size with a fitted estimator, chunk by chunk.

    Parameters
    ----------
    model : estimator or path
        A fitted ``AggregatedClassifier`` / ``AggregatedRegressor``, or a file
        written by :func:`aggregators.save` (then ``trusted`` and ``modules``
        go to :func:`aggregators.load`).
    input : str or path-like
        A ``.parquet`` or ``.csv`` file, or a folder of Parquet files.
    output : str or path-like
        A ``.parquet`` or ``.csv`` file. Classifiers write ``proba_<label>`` per
        class and ``prediction`` (the most probable class); regressors write
        ``prediction`` (``prediction_<k>`` per target for several). The id
        column and ``keep_columns`` come first. It appears only when complete.
    chunk_rows : int, default=100_000
        Rows scored at a time: memory follows it, not the file's size.
    columns : list of str, default=None
        The feature columns, in the model's order. Default: the model's
        ``feature_names_in_``, or else every column but the id and kept ones.
    id_column : str, default=None
        A column copied to the output, naming skipped rows, and used as the
        row index given to the model (stored predictions are matched by it).
    keep_columns : sequence of str, default=()
        Input columns copied to the output as they are.
    resume : bool, default=False
        Continue a run that was interrupted: chunks it finished are not scored
        again. The settings, the input and the model must be the same.
    on_bad_rows : {"error", "skip"}, default="error"
        Rows with a missing feature value: stop with an error naming them, or
        leave them out and list their ids (the id column, else the 0-based row
        number) in ``<output stem>.skipped<suffix>``.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Where the aggregation runs (see :func:`aggregators.load`).
    progress : bool, default=True
        Show a tqdm progress bar over rows.
    trusted, modules
        Passed to :func:`aggregators.load` when ``model`` is a path.

    Returns
    -------
    ScoreReport

    Examples
    --------
    >>> from aggregators import score_file  # doctest: +SKIP
    >>> score_file("ensemble.hyperagg", "rows.parquet", "scores.parquet", id_column="id")  # doctest: +SKIP
    """
    import pyarrow as pa  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    t0 = time.perf_counter()
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer; got {chunk_rows!r}.")
    input, output = Path(input), Path(output)
    if not input.exists():
        raise FileNotFoundError(f"input {str(input)!r} does not exist.")
    in_fmt, out_fmt = file_format(input), file_format(output)
    if output.resolve() == input.resolve():
        raise ValueError("output would overwrite the input; choose another name.")
    if isinstance(model, (str, os.PathLike)):
        est = load(model, trusted, modules=modules, device=device)
    else:
        check_is_fitted(model)
        est = model if device == "auto" else place_on_device(copy.copy(model), device)

    dataset = open_dataset(input, in_fmt, est, columns)
    names = dataset.schema.names
    spec = make_spec(est, names, columns, id_column, keep_columns, on_bad_rows)
    read = list(dict.fromkeys(
        ([id_column] if id_column is not None else []) + spec.keep_columns + spec.features
    ))

    work = output.with_name(output.name + ".partial")
    state = {
        "input": str(input.resolve()),
        "input_files": _fingerprint(input),
        "model": _model_id(est),
        "chunk_rows": int(chunk_rows),
        "features": spec.features,
        "id_column": id_column,
        "keep_columns": spec.keep_columns,
        "on_bad_rows": on_bad_rows,
        "output_format": out_fmt,
    }
    if work.exists() and resume:
        old = json.loads((work / _STATE).read_text()) if (work / _STATE).exists() else {}
        differ = [k for k in state if old.get(k) != state[k]]
        if differ:
            raise ValueError(
                f"cannot resume: the unfinished run in {str(work)!r} was made with a "
                f"different {', '.join(differ)}. Run without resume to start again."
            )
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / _STATE).write_text(json.dumps(state, indent=1))

    total = dataset.count_rows() if in_fmt == "parquet" else None
    bar = tqdm(total=total, unit="rows", unit_scale=True, disable=not progress,
               desc=f"scoring {input.name}")
    n_read = n_skipped = resumed = 0
    parts, skipped_parts = [], []
    try:
        for i, table in enumerate(_chunks(dataset, read, int(chunk_rows))):
            part = work / (_CHUNK.format(i) + ".arrow")
            side = work / (_CHUNK.format(i) + ".skipped.arrow")
            if part.exists():
                resumed += 1
            else:
                out, skipped = score_frame(est, table.to_pandas(), spec, first_row=n_read)
                if len(skipped):
                    # Before the chunk itself: a chunk file on disk means both are done.
                    _write_table(pa.table({id_column or "row": skipped}), side, "arrow")
                _write_table(pa.Table.from_pandas(out, preserve_index=False), part, "arrow")
            parts.append(part)
            if side.exists():
                skipped_parts.append(side)
                n_skipped += _read_part(side).num_rows
            n_read += table.num_rows
            bar.update(table.num_rows)
    finally:
        bar.close()

    skipped_path = None
    if skipped_parts:
        skipped_path = output.with_name(f"{output.stem}.skipped{output.suffix}")
        _concat(skipped_parts, skipped_path, out_fmt)
    if parts:
        _concat(parts, output, out_fmt)
    else:  # an empty input still gives a file with the output's columns
        empty = empty_output(est, spec, dataset.head(0, columns=read).to_pandas())
        _write_table(pa.Table.from_pandas(empty, preserve_index=False), output, out_fmt)
    shutil.rmtree(work, ignore_errors=True)
    return ScoreReport(
        output=output, rows_read=n_read, rows_scored=n_read - n_skipped,
        rows_skipped=n_skipped, skipped_path=skipped_path, chunks=len(parts),
        chunks_resumed=resumed, seconds=time.perf_counter() - t0,
    )
