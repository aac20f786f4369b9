"""score_dask and ``hyperagg score --scheduler`` on a real two-process Dask cluster."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from _deploy import FEATURES, data, pool
from aggregators import AggregatedClassifier, save, score_dask, score_file
from aggregators.deploy import cli

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    X, y = data(1000)
    models = [(n, m) for n, m in pool(X.iloc[:300], y[:300], X) if n != "net"]
    est = AggregatedClassifier(models, aggregator="weights", max_outer_iter=2, cv=3,
                               random_state=0).fit(X.iloc[300:600], y[300:600])
    folder = tmp_path_factory.mktemp("dask")
    rows = X.iloc[600:].reset_index()
    rows.loc[7, "f1"] = np.nan
    rows.to_parquet(folder / "rows.parquet")
    path = save(est, folder / "model.hyperagg")
    return est, path, rows, folder


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c:
        yield c


def test_the_model_enters_the_graph_once(fitted):
    est, _, rows, _ = fitted
    sizes = []
    for n in (2, 16):
        ddf = dd.from_pandas(rows, npartitions=n)
        graph = dict(score_dask(est, ddf, id_column="key", on_bad_rows="skip").__dask_graph__())
        holding = [k for k, v in graph.items() if _holds(v, est)]
        assert len(holding) == 1, holding
        sizes.append(len(pickle.dumps(graph)))
    # Fourteen more partitions cost a few small tasks, not fourteen more models.
    assert sizes[1] - sizes[0] < len(pickle.dumps(est)) / 2


def _holds(task, est) -> bool:
    if task is est:
        return True
    value = getattr(task, "value", None)  # dask's DataNode / Task wrappers
    if value is est:
        return True
    return isinstance(task, tuple) and any(_holds(t, est) for t in task)


def test_score_dask_on_a_local_cluster_equals_score_file(fitted, cluster, tmp_path):
    est, path, rows, folder = fitted
    score_file(est, folder / "rows.parquet", tmp_path / "one.parquet", id_column="key",
               keep_columns=["f0"], on_bad_rows="skip", progress=False)
    single = pd.read_parquet(tmp_path / "one.parquet")
    with distributed.Client(cluster):
        ddf = dd.read_parquet(folder / "rows.parquet").repartition(npartitions=4)
        got = score_dask(path, ddf, id_column="key", keep_columns=["f0"],
                         on_bad_rows="skip").compute()
    assert len(got) == 399  # one row with a missing value left out
    pd.testing.assert_frame_equal(got.reset_index(drop=True), single, check_exact=False,
                                  check_dtype=False,  # dask reads strings as string[pyarrow]
                                  rtol=0, atol=1e-12)
    with distributed.Client(cluster):
        with pytest.raises(ValueError, match="missing values"):
            score_dask(est, dd.from_pandas(rows, npartitions=3), id_column="key").compute()


def test_cli_with_a_scheduler_writes_partitioned_parquet(fitted, cluster, tmp_path, capsys):
    est, path, rows, folder = fitted
    src = tmp_path / "rows"
    dd.from_pandas(rows.dropna(), npartitions=3).to_parquet(src, write_index=False)
    out = tmp_path / "scores"
    code = cli.main(["score", str(path), str(src), str(out), "--id-column", "key",
                     "--scheduler", cluster.scheduler_address])
    assert code == 0, capsys.readouterr().err
    assert "scored 399 rows" in capsys.readouterr().out
    assert len(list(out.glob("*.parquet"))) == 3 and not (tmp_path / "scores.partial").exists()
    got = pd.read_parquet(out).sort_values("key").reset_index(drop=True)
    X = rows.dropna().set_index("key")[FEATURES]
    ref = pd.DataFrame(est.predict_proba(X), index=X.index).sort_index()
    np.testing.assert_allclose(got.filter(like="proba_").to_numpy(), ref.to_numpy(), atol=1e-12)


def test_cli_with_a_scheduler_skips_bad_rows_to_a_side_file(fitted, cluster, tmp_path, capsys):
    est, path, rows, folder = fitted
    src = tmp_path / "rows"
    dd.from_pandas(rows, npartitions=2).to_parquet(src, write_index=False)
    out = tmp_path / "scores"
    code = cli.main(["score", str(path), str(src), str(out), "--id-column", "key",
                     "--on-bad-rows", "skip", "--scheduler", cluster.scheduler_address])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "scored 399 rows" in printed and "skipped 1 rows" in printed
    side = pd.read_parquet(tmp_path / "scores.skipped.parquet")
    assert side["key"].tolist() == [rows.loc[7, "key"]]
    assert len(pd.read_parquet(out)) == 399
