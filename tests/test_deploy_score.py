"""score_file, the hyperagg command and score_dask."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_regression
from sklearn.linear_model import LinearRegression, Ridge

from _deploy import FEATURES, data, make_net, pool, subprocess_env
from aggregators import (
    AggregatedClassifier,
    AggregatedRegressor,
    ModelSelection,
    SparseMoE,
    save,
    score_file,
)
from aggregators.deploy import cli
from base_models import CallableModel


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A fitted classifier over a mixed pool, its file, and rows to score."""
    X, y = data(1200)
    est = AggregatedClassifier(
        pool(X.iloc[:300], y[:300], X), aggregator="stacking", max_outer_iter=2, cv=3,
        random_state=0,
    ).fit(X.iloc[300:600], y[300:600])
    folder = tmp_path_factory.mktemp("score")
    path = save(est, folder / "model.hyperagg")
    rows = X.iloc[600:].reset_index()  # the key becomes a column: the id column
    rows["region"] = np.where(np.arange(len(rows)) % 2, "north", "south")
    rows.to_parquet(folder / "rows.parquet", row_group_size=128)
    rows.to_csv(folder / "rows.csv", index=False)
    return est, path, rows, folder


def expected(est, rows):
    X = rows.set_index("key")[FEATURES]
    return est.predict_proba(X), est.predict(X)


@pytest.mark.parametrize("fmt_in", ["parquet", "csv"])
@pytest.mark.parametrize("fmt_out", ["parquet", "csv"])
def test_score_file_matches_predict_proba(model, tmp_path, fmt_in, fmt_out):
    est, path, rows, folder = model
    out = tmp_path / f"scores.{fmt_out}"
    report = score_file(
        path, folder / f"rows.{fmt_in}", out, chunk_rows=97, id_column="key",
        keep_columns=["region"], progress=False, modules={"net": make_net},
    )
    got = pd.read_parquet(out) if fmt_out == "parquet" else pd.read_csv(out)
    assert list(got.columns) == ["key", "region", "proba_0", "proba_1", "proba_2", "prediction"]
    proba, pred = expected(est, rows)
    np.testing.assert_allclose(got[["proba_0", "proba_1", "proba_2"]].to_numpy(), proba,
                               rtol=0, atol=1e-12 if fmt_out == "parquet" else 1e-9)
    np.testing.assert_array_equal(got["prediction"], pred)
    np.testing.assert_array_equal(got["key"], rows["key"])
    np.testing.assert_array_equal(got["region"], rows["region"])
    assert (report.rows_read, report.rows_scored, report.chunks) == (600, 600, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no work files left


def test_chunk_size_does_not_change_the_output(model, tmp_path):
    est, _, rows, folder = model
    outs = []
    for chunk_rows in (1, 64, 10_000):
        out = tmp_path / f"s{chunk_rows}.parquet"
        score_file(est, folder / "rows.parquet", out, chunk_rows=chunk_rows,
                   id_column="key", progress=False)
        outs.append(pd.read_parquet(out))
    pd.testing.assert_frame_equal(outs[0], outs[1])
    pd.testing.assert_frame_equal(outs[0], outs[2])


def test_progress_bar_counts_rows(model, tmp_path, capsys):
    est, _, _, folder = model
    score_file(est, folder / "rows.parquet", tmp_path / "o.parquet", id_column="key")
    err = capsys.readouterr().err
    assert "600/600" in err and "rows" in err


_KILLABLE = """
import sys, time
from aggregators import load, score_file
from _deploy import make_net
est = load(sys.argv[1], modules={"net": make_net})
slow = est.predict_proba
def predict_proba(X):  # slow enough to be killed halfway
    time.sleep(0.3)
    return slow(X)
est.predict_proba = predict_proba
score_file(est, sys.argv[2], sys.argv[3], chunk_rows=50, id_column="key", progress=False)
"""


def test_killed_run_resumes_to_the_uninterrupted_output(model, tmp_path):
    est, path, _, folder = model
    src = folder / "rows.parquet"
    whole = tmp_path / "whole.parquet"
    score_file(est, src, whole, chunk_rows=50, id_column="key", progress=False)

    out = tmp_path / "scores.parquet"
    work = tmp_path / "scores.parquet.partial"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(path), str(src), str(out)],
        env=subprocess_env(), stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while len(list(work.glob("chunk-????????.arrow"))) < 4:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the scoring run made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(work.glob("chunk-????????.arrow")))
    assert 4 <= done < 12  # killed halfway
    print(f"killed with SIGKILL after {done} of 12 chunks; output present: {out.exists()}")
    assert not out.exists()  # nothing under the output name

    calls = []
    slow = est.predict_proba

    def counting(X):
        calls.append(len(X))
        return slow(X)

    est.predict_proba = counting
    try:
        report = score_file(est, src, out, chunk_rows=50, id_column="key", resume=True,
                            progress=False)
    finally:
        del est.predict_proba
    print(f"resumed: {report.chunks_resumed} chunks reused, predict_proba on {sum(calls)} rows")
    assert report.chunks_resumed == done
    assert sum(calls) == 600 - 50 * done  # finished chunks were not scored again
    got = pd.read_parquet(out)
    pd.testing.assert_frame_equal(got, pd.read_parquet(whole))  # same rows, order, values
    assert got["key"].is_unique and len(got) == 600
    assert not work.exists()


def test_resume_refuses_other_settings(model, tmp_path):
    est, _, rows, folder = model
    bad = rows.copy()
    bad.loc[10, "f2"] = np.nan
    src = tmp_path / "bad.parquet"
    bad.to_parquet(src)
    out = tmp_path / "o.parquet"
    with pytest.raises(ValueError, match="missing values"):
        score_file(est, src, out, chunk_rows=50, id_column="key", progress=False)
    with pytest.raises(ValueError, match="different chunk_rows"):
        score_file(est, src, out, chunk_rows=60, id_column="key", resume=True, progress=False)
    assert not out.exists()


def test_bad_rows_error_or_skip_to_a_side_file(model, tmp_path):
    est, _, rows, _ = model
    bad = rows.copy()
    bad.loc[[3, 250], "f5"] = np.nan
    bad.loc[400, "f0"] = np.nan
    src = tmp_path / "bad.csv"
    bad.to_csv(src, index=False)
    out = tmp_path / "o.csv"
    with pytest.raises(ValueError, match=r"first ids: \['r603'\]; columns \['f5'\]"):
        score_file(est, src, out, chunk_rows=100, id_column="key", progress=False)
    assert not out.exists()
    report = score_file(est, src, out, chunk_rows=100, id_column="key",
                        on_bad_rows="skip", progress=False)
    assert report.rows_skipped == 3 and report.rows_scored == 597
    assert pd.read_csv(report.skipped_path)["key"].tolist() == ["r603", "r850", "r1000"]
    got = pd.read_csv(out)
    assert len(got) == 597 and not got["key"].isin(["r603", "r850", "r1000"]).any()
    # Without an id column, skipped rows are named by their 0-based row number
    # (a model without stored predictions: those need the ids as keys).
    X, y = data(1200)
    plain = AggregatedClassifier(
        [(n, m) for n, m in est.estimators if n != "stored"], hyperparams="fixed",
        random_state=0,
    ).fit(X.iloc[300:600], y[300:600])
    report = score_file(plain, src, tmp_path / "n.parquet", chunk_rows=100,
                        on_bad_rows="skip", progress=False, columns=FEATURES)
    assert pd.read_parquet(report.skipped_path)["row"].tolist() == [3, 250, 400]


@pytest.mark.parametrize(
    "change, kwargs, match",
    [
        (lambda r: r.drop(columns=["f3"]), {}, r"lacks the feature column\(s\) \['f3'\]"),
        (lambda r: r, {"columns": FEATURES[::-1]}, "the same names in another order"),
        (lambda r: r, {"columns": FEATURES[:-1]}, r"missing \['f7'\]"),
        (lambda r: r, {"id_column": "nope"}, "no column 'nope'"),
        (lambda r: r, {"on_bad_rows": "drop"}, "on_bad_rows must be"),
        (lambda r: r, {"chunk_rows": 0}, "chunk_rows must be a positive integer"),
    ],
)
def test_schema_problems_name_the_columns(model, tmp_path, change, kwargs, match):
    est, _, rows, _ = model
    src = tmp_path / "in.parquet"
    change(rows).to_parquet(src)
    out = tmp_path / "o.parquet"
    with pytest.raises(ValueError, match=match):
        score_file(est, src, out, progress=False, **kwargs)
    assert not out.exists()


def test_unnamed_features_and_regression_columns(tmp_path):
    X, y = make_regression(500, 5, n_targets=2, noise=3.0, random_state=0)
    models = [("lin", LinearRegression().fit(X[:200], y[:200])),
              ("ridge", Ridge(30.0).fit(X[:200], y[:200]))]
    reg = AggregatedRegressor(models, max_outer_iter=2, random_state=0).fit(X[200:350], y[200:350])
    src = tmp_path / "in.csv"
    frame = pd.DataFrame(X[350:], columns=list("abcde"))
    frame.insert(0, "id", np.arange(150))
    frame.to_csv(src, index=False)
    out = tmp_path / "o.parquet"
    score_file(reg, src, out, id_column="id", progress=False)
    got = pd.read_parquet(out)
    assert list(got.columns) == ["id", "prediction_0", "prediction_1"]
    np.testing.assert_allclose(got[["prediction_0", "prediction_1"]], reg.predict(X[350:]),
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="fitted on 5 unnamed features but the input has 6"):
        score_file(reg, src, tmp_path / "x.parquet", progress=False)


def test_sparse_routing_never_calls_dropped_models(model, tmp_path):
    """Stored predictions of the routed rows only: a dropped model sees no row."""
    est, _, rows, folder = model
    X, y = data(1200)
    seen = {}

    def counting(name, predict_proba):
        def f(Xb):
            seen[name] = seen.get(name, 0) + len(Xb)
            return predict_proba(Xb)
        return CallableModel(f, classes=[0, 1, 2])

    base = [(n, counting(n, est.named_estimators_[n].predict_proba)) for n in ("forest", "lr")]
    base.append(("junk", counting("junk", lambda Xb: np.full((len(Xb), 3), 1 / 3))))
    sel = AggregatedClassifier(base, aggregator=ModelSelection("weights"), random_state=0,
                               max_outer_iter=3).fit(X.iloc[300:600], y[300:600])
    moe = AggregatedClassifier(base, aggregator=SparseMoE(k=1), random_state=0,
                               max_outer_iter=3).fit(X.iloc[300:600], y[300:600])
    for est_, name in ((sel, "sel"), (moe, "moe")):
        seen.clear()
        score_file(est_, folder / "rows.parquet", tmp_path / f"{name}.parquet",
                   chunk_rows=100, id_column="key", progress=False)
        calls = dict(seen)
        dense = est_.predict_proba(rows.set_index("key")[FEATURES], dense=True)
        got = pd.read_parquet(tmp_path / f"{name}.parquet")
        np.testing.assert_allclose(got.filter(like="proba_").to_numpy(), dense, atol=1e-12)
        if name == "sel":
            dropped = [n for n, keep in sel.aggregator_.selected_.items() if not keep]
            assert dropped and all(calls.get(n, 0) == 0 for n in dropped)
        else:
            assert sum(calls.values()) == 600  # k=1: one model per row


def test_cli_score_and_info(model, tmp_path, capsys):
    est, path, rows, folder = model
    out = tmp_path / "o.parquet"
    args = ["score", str(path), str(folder / "rows.parquet"), str(out), "--chunk-rows", "200",
            "--id-column", "key", "--keep-columns", "region", "--no-progress",
            "--module", "net=_deploy:make_net"]
    assert cli.main(args) == 0
    assert "scored 600 rows" in capsys.readouterr().out
    np.testing.assert_allclose(pd.read_parquet(out).filter(like="proba_").to_numpy(),
                               expected(est, rows)[0], atol=1e-12)

    assert cli.main(["info", str(path)]) == 0
    info = capsys.readouterr().out
    assert "Stacking" in info and "net: torch.nn.modules.container.Sequential" in info

    # Errors: one line, exit status 1, no traceback unless --debug.
    assert cli.main(["score", str(path), str(folder / "rows.parquet"), str(tmp_path / "x.parquet")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hyperagg: error:") and "modules=" in err
    assert cli.main(["--debug", "info", str(folder / "rows.csv")]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_console_script_is_installed(model, tmp_path):
    _, path, _, _ = model
    exe = shutil.which("hyperagg")
    cmd = [exe] if exe else [sys.executable, "-m", "aggregators.deploy.cli"]
    done = subprocess.run([*cmd, "info", str(path)], capture_output=True, text=True,
                          env=subprocess_env())
    assert done.returncode == 0 and "Stacking" in done.stdout
    done = subprocess.run([*cmd, "info", str(tmp_path / "missing.hyperagg")],
                          capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 1 and "Traceback" not in done.stderr
