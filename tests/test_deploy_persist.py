"""aggregators.save / load: round trips in a fresh process, trust, versions, devices."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from sklearn.datasets import make_regression
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.tree import DecisionTreeRegressor

from _deploy import FEATURES, data, make_net, pool, proba_equal, subprocess_env
from aggregators import (
    AggregatedClassifier,
    AggregatedRegressor,
    Aggregator,
    Hyperparameter,
    HypergradSearchCV,
    load,
    save,
)
from aggregators.deploy import DeployVersionWarning, UnsafeModelError, read_manifest
from base_models import CallableModel

AGGREGATORS = ["stacking", "weights", "choquet", "sugeno", "uninorm", "laf", "moe", "select"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Every aggregator fitted on one mixed pool, saved, with its predictions."""
    X, y = data()
    models = pool(X.iloc[:300], y[:300], X)
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name in AGGREGATORS:
        est = AggregatedClassifier(
            models, aggregator=name, max_outer_iter=2, cv=3, random_state=0
        ).fit(X.iloc[300:600], y[300:600])
        path = save(est, folder / f"{name}.hyperagg")
        out[name] = (est, path)
    return X.iloc[600:], out


def test_round_trip_in_a_fresh_process_for_every_aggregator(fitted, tmp_path):
    X_test, models = fitted
    X_test.to_parquet(tmp_path / "X.parquet")
    code = (
        "import sys, numpy as np, pandas as pd\n"
        "from aggregators import load\n"
        "from _deploy import make_net\n"
        "X = pd.read_parquet(sys.argv[1])\n"
        "for path in sys.argv[3:]:\n"
        "    est = load(path, modules={'net': make_net})\n"
        "    name = path.rsplit('/', 1)[-1].split('.')[0]\n"
        "    np.save(f'{sys.argv[2]}/{name}.npy', est.predict_proba(X))\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "X.parquet"), str(tmp_path),
         *[str(p) for _, p in models.values()]],
        env=subprocess_env(), check=True, capture_output=True, text=True,
    )
    for name, (est, _) in models.items():
        proba_equal(np.load(tmp_path / f"{name}.npy"), est.predict_proba(X_test))


def test_loaded_estimator_keeps_its_fitted_attributes(fitted):
    X_test, models = fitted
    est, path = models["select"]
    back = load(path, modules={"net": make_net()})
    assert type(back) is type(est)
    assert list(back.base_models_) == list(est.base_models_)
    assert back.aggregator_.selected_.equals(est.aggregator_.selected_)
    assert back.tuning_history_.equals(est.tuning_history_)
    assert back.fitted_inside_ == est.fitted_inside_ == ["lr"]
    np.testing.assert_array_equal(back.classes_, est.classes_)
    np.testing.assert_array_equal(back.feature_names_in_, FEATURES)
    np.testing.assert_array_equal(back.predict(X_test), est.predict(X_test))
    # Sparse routing survives: dropped models are still never called.
    back.predict_proba(X_test)
    kept = est.aggregator_.selected_
    assert (back.last_routing_[~kept.to_numpy()] == 0).all()


def test_manifest_records_versions_and_a_summary(fitted):
    _, models = fitted
    m = read_manifest(models["stacking"][1])
    assert {"hyperagg", "scikit-learn", "torch", "numpy", "skops", "python"} <= set(m["versions"])
    assert m["summary"]["aggregator"] == "Stacking"
    assert m["summary"]["classes"] == [0, 1, 2]
    assert m["summary"]["feature_names_in"] == FEATURES
    assert m["torch_modules"] == {"net": "torch.nn.modules.container.Sequential"}


def test_the_file_holds_only_skops_weights_and_a_manifest(fitted):
    _, models = fitted
    with zipfile.ZipFile(models["laf"][1]) as zf:
        names = set(zf.namelist())
        assert names == {"manifest.json", "estimator.skops", "tensors/net.pt"}
        # torch's weights file is read with weights_only=True; it holds tensors.
        state = torch.load(zf.open("tensors/net.pt"), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_torch_module_must_be_supplied_and_match(fitted):
    _, models = fitted
    path = models["weights"][1]
    with pytest.raises(UnsafeModelError, match=r"'net' \(torch.nn.modules.container.Sequential\).*modules="):
        load(path)
    wrong = torch.nn.Sequential(torch.nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match="does not match the saved weights"):
        load(path, modules={"net": wrong})


class _UserAggregator(Aggregator):
    """A user's own aggregation function: a type the loader does not know."""

    def hyperparameters(self, ctx):
        return [Hyperparameter("l2", 1e-2, 1e-6, 1e2)]

    def init_params(self, ctx, Z, y, X=None):
        return {"w": ctx.zeros(ctx.n_models)}

    def forward(self, params, hyper, Z, X=None):
        w = torch.softmax(params["w"], 0)[:, None]
        return torch.log((w * Z).sum(1).clamp_min(1e-9))

    def penalty(self, params, hyper):
        return 0.5 * hyper["l2"][0] * params["w"].pow(2).sum()


def test_untrusted_types_are_refused_with_a_list_and_the_fix(cancer_pool, tmp_path):
    est = AggregatedClassifier(
        [(n, m) for n, m in cancer_pool.pool.items()][:3], aggregator=_UserAggregator(),
        hyperparams="fixed", prefit=True, random_state=0,
    ).fit(cancer_pool.X_agg, cancer_pool.y_agg)
    path = save(est, tmp_path / "user.hyperagg")
    name = f"{_UserAggregator.__module__}._UserAggregator"
    with pytest.raises(UnsafeModelError, match=rf"not trusted: \['{name}'\].*trusted="):
        load(path)
    back = load(path, trusted=[name])
    proba_equal(back.predict_proba(cancer_pool.X_test), est.predict_proba(cancer_pool.X_test))


def test_callable_model_cannot_be_saved(cancer_pool, tmp_path):
    f = cancer_pool.pool["nb"].predict_proba
    est = AggregatedClassifier(
        [("f", CallableModel(f, classes=[0, 1])), ("lr", cancer_pool.pool["lr"])],
        hyperparams="fixed", random_state=0,
    ).fit(cancer_pool.X_agg, cancer_pool.y_agg)
    with pytest.raises(UnsafeModelError, match="CallableModel.*PrecomputedModel"):
        save(est, tmp_path / "f.hyperagg")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_version_mismatch_warns_with_what_differs(fitted, tmp_path):
    _, models = fitted
    src = models["stacking"][1]
    dst = tmp_path / "old.hyperagg"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            blob = zin.read(item)
            if item == "manifest.json":
                m = json.loads(blob)
                m["versions"]["torch"] = "2.3.0"
                blob = json.dumps(m).encode()
            zout.writestr(item, blob)
    with pytest.warns(DeployVersionWarning, match=r"torch 2.3.0 -> "):
        load(dst, modules={"net": make_net})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(src, modules={"net": make_net})


def test_gpu_fitted_model_predicts_on_the_cpu(fitted, tmp_path):
    X_test, models = fitted
    est, _ = models["choquet"]
    ref = est.predict_proba(X_test)
    if torch.cuda.is_available():  # the real thing, where there is a GPU
        X, y = data()
        gpu = AggregatedClassifier(
            pool(X.iloc[:300], y[:300], X), aggregator="choquet", device="cuda",
            max_outer_iter=2, cv=3, random_state=0,
        ).fit(X.iloc[300:600], y[300:600])
        ref = gpu.predict_proba(X_test)
        est = gpu
    else:
        # What a GPU fit leaves: tensors' device recorded as CUDA, a torch base
        # model pinned to it. The aggregator's parameters are numpy arrays.
        est.device_ = torch.device("cuda")
        est.base_models_["net"].device = "cuda"
    path = save(est, tmp_path / "gpu.hyperagg")
    est.device_, est.base_models_["net"].device = torch.device("cpu"), "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "CUDA not available" warning either
        back = load(path, modules={"net": make_net}, device="cpu")
    assert back.device_ == torch.device("cpu")
    proba_equal(back.predict_proba(X_test), ref, atol=1e-6)
    if not torch.cuda.is_available():
        auto = load(path, modules={"net": make_net})
        assert auto.device_ == torch.device("cpu")
        proba_equal(auto.predict_proba(X_test), ref, atol=1e-6)


def test_regressor_and_search_best_estimator(tmp_path):
    X, y = make_regression(400, 6, n_targets=2, noise=5.0, random_state=0)
    models = [
        ("lin", LinearRegression().fit(X[:150], y[:150])),
        ("ridge", Ridge(10.0).fit(X[:150], y[:150])),
        ("tree", DecisionTreeRegressor(max_depth=4, random_state=0).fit(X[:150], y[:150])),
    ]
    reg = AggregatedRegressor(models, max_outer_iter=2, random_state=0).fit(X[150:300], y[150:300])
    back = load(save(reg, tmp_path / "reg.hyperagg"))
    np.testing.assert_array_equal(back.predict(X[300:]), reg.predict(X[300:]))
    assert read_manifest(tmp_path / "reg.hyperagg")["summary"]["n_outputs"] == 2

    search = HypergradSearchCV(
        AggregatedRegressor(models, aggregator="stacking", random_state=0),
        {"aggregator__l2": (1e-3, 1e1, "log")}, cv=3,
    ).fit(X[150:300], y[150:300])
    back = load(save(search, tmp_path / "search.hyperagg"))  # its best_estimator_
    np.testing.assert_array_equal(back.predict(X[300:]), search.predict(X[300:]))
