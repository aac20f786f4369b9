"""The ``hyperagg`` command: score files with a saved model, describe a saved model.

::

    hyperagg score MODEL INPUT OUTPUT [--chunk-rows N] [--id-column C]
                   [--keep-columns C ...] [--resume] [--on-bad-rows error|skip]
                   [--scheduler ADDRESS] [--module NAME=package.module:factory]
    hyperagg info MODEL

Exit status 0 when done; otherwise 1 with a one-line message on stderr (the
traceback only with ``--debug``), or 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import traceback
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hyperagg", description="Score data with a model saved by aggregators.save."
    )
    p.add_argument("--debug", action="store_true", help="show the traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score a Parquet or CSV file (or a Parquet folder)")
    s.add_argument("model", help="a file written by aggregators.save")
    s.add_argument("input", help=".parquet / .csv file, or a folder of Parquet files")
    s.add_argument("output", help=".parquet or .csv file (a folder with --scheduler)")
    s.add_argument("--chunk-rows", type=int, default=100_000, help="rows per chunk")
    s.add_argument("--id-column", help="column copied to the output and naming rows")
    s.add_argument("--keep-columns", nargs="*", default=[], help="columns copied as they are")
    s.add_argument("--columns", nargs="*", help="feature columns (default: the model's)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run")
    s.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--scheduler", help="address of a running dask.distributed scheduler")
    s.add_argument("--trusted", nargs="*", default=None, help="further types to trust")
    s.add_argument(
        "--module", action="append", default=[], metavar="NAME=MODULE:FACTORY",
        help="torch base model NAME's architecture: a zero-argument factory to import",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="describe a saved model")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return p


def _modules(specs: list[str]) -> dict:
    out = {}
    for spec in specs:
        name, sep, target = spec.partition("=")
        mod, colon, attr = target.partition(":")
        if not sep or not colon:
            raise ValueError(f"--module takes NAME=package.module:factory; got {spec!r}.")
        out[name] = getattr(importlib.import_module(mod), attr)
    return out


def _score(args) -> int:
    from ._score import score_file  # noqa: PLC0415

    modules = _modules(args.module)
    if args.scheduler:
        return _score_distributed(args, modules)
    report = score_file(
        args.model, args.input, args.output, chunk_rows=args.chunk_rows,
        columns=args.columns, id_column=args.id_column, keep_columns=args.keep_columns,
        resume=args.resume, on_bad_rows=args.on_bad_rows, device=args.device,
        progress=not args.no_progress, trusted=args.trusted, modules=modules,
    )
    line = (f"scored {report.rows_scored} rows into {report.output} in "
            f"{report.seconds:.1f} s ({report.chunks} chunks")
    if report.chunks_resumed:
        line += f", {report.chunks_resumed} resumed"
    line += ")"
    if report.rows_skipped:
        line += f"; skipped {report.rows_skipped} rows with missing values, listed in {report.skipped_path}"
    print(line)
    return 0


def _score_distributed(args, modules) -> int:
    """Partitioned Parquet in and out, on a running dask.distributed cluster."""
    from distributed import Client  # noqa: PLC0415

    import dask.dataframe as dd  # noqa: PLC0415

    from ._dask import score_dask  # noqa: PLC0415
    from ._persist import load  # noqa: PLC0415

    import pyarrow.dataset as pads  # noqa: PLC0415

    from ._score import make_spec  # noqa: PLC0415

    out = Path(args.output)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    est = load(args.model, args.trusted, modules=modules, device=args.device)
    skipped = None
    with Client(args.scheduler):
        ddf = dd.read_parquet(args.input)
        scores = score_dask(est, ddf, columns=args.columns, id_column=args.id_column,
                            keep_columns=args.keep_columns, on_bad_rows=args.on_bad_rows)
        scores.to_parquet(tmp, write_index=False)
        if args.on_bad_rows == "skip":
            spec = make_spec(est, [str(c) for c in ddf.columns], args.columns,
                             args.id_column, args.keep_columns, args.on_bad_rows)
            bad = ddf[ddf[spec.features].isna().any(axis=1)]
            # Few rows: gathered here. Without an id column, the input's index names them.
            skipped = (bad[[args.id_column]] if args.id_column else
                       bad.index.to_frame(name="row")).compute()
    n = pads.dataset(tmp, format="parquet").count_rows()  # metadata only, no second pass
    # Moved into place only once every partition is written.
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    line = f"scored {n} rows into {out}/ on the Dask cluster at {args.scheduler}"
    if skipped is not None and len(skipped):
        side = out.with_name(f"{out.name}.skipped.parquet")
        skipped.to_parquet(side, index=False)
        line += f"; skipped {len(skipped)} rows with missing values, listed in {side}"
    print(line)
    return 0


def _info(args) -> int:
    from ._persist import _versions, read_manifest  # noqa: PLC0415

    m = read_manifest(args.model)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    s = m["summary"]
    print(f"model        {args.model}")
    print(f"estimator    {s['estimator']}")
    print(f"aggregator   {s['aggregator']}")
    print("base models  " + ", ".join(f"{k} ({v})" for k, v in s["base_models"].items()))
    if "classes" in s:
        print(f"classes      {s['classes']}")
    if "n_outputs" in s:
        print(f"outputs      {s['n_outputs']}")
    feats = s.get("feature_names_in") or f"{s['n_features_in']} unnamed"
    print(f"features     {feats}")
    for k, v in (s.get("hyperparams") or {}).items():
        print(f"hyperparam   {k} = {v}")
    if m.get("torch_modules"):
        print("torch        " + ", ".join(f"{k}: {v}" for k, v in m["torch_modules"].items())
              + " (load with modules={name: module})")
    now = _versions()
    for k, v in m["versions"].items():
        mark = "" if now.get(k) == v else f"   (installed here: {now.get(k)})"
        print(f"saved with   {k} {v}{mark}")
    return 0


def main(argv=None) -> int:
    """Run the ``hyperagg`` command; returns its exit status."""
    args = _parser().parse_args(argv)
    try:
        return _score(args) if args.command == "score" else _info(args)
    except KeyboardInterrupt:
        print("hyperagg: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (one line for the user; --debug for more)
        if args.debug:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"hyperagg: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
