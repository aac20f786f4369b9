"""Behaviour of AggregatedClassifier / AggregatedRegressor on real data."""

from __future__ import annotations

import pickle
import warnings
from unittest.mock import Mock

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.metrics import log_loss, mean_squared_error
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from aggregators import (
    AggregatedClassifier,
    AggregatedRegressor,
    Aggregator,
    Hyperparameter,
    HypergradientWarning,
)
from base_models import (
    IncompatibleBaseModelError,
    TorchModel,
    UnfittedBaseModelError,
    as_base_model,
)


@pytest.fixture(scope="module")
def cancer():
    """A pool pretrained on 40 % of breast_cancer; 30 % to aggregate on, 30 % to test."""
    X, y = load_breast_cancer(return_X_y=True)
    X_pool, X_rest, y_pool, y_rest = train_test_split(X, y, train_size=0.4, stratify=y, random_state=0)
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0
    )
    pool = {
        "lr": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X_pool, y_pool),
        "nb": GaussianNB().fit(X_pool, y_pool),
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(15)).fit(X_pool, y_pool),
        "tree": DecisionTreeClassifier(max_depth=4, random_state=0).fit(X_pool, y_pool),
        "forest": RandomForestClassifier(50, max_depth=5, random_state=0).fit(X_pool, y_pool),
    }
    return pool, X_agg, y_agg, X_test, y_test


def frozen(pool):
    return [(name, FrozenEstimator(m)) for name, m in pool.items()]


# -- end to end --------------------------------------------------------------------
@pytest.mark.parametrize("aggregator", ["stacking", "weights"])
def test_tuned_beats_uniform_average_on_breast_cancer(cancer, aggregator):
    pool, X_agg, y_agg, X_test, y_test = cancer
    uniform = np.mean([m.predict_proba(X_test) for m in pool.values()], axis=0)
    est = AggregatedClassifier(frozen(pool), aggregator=aggregator, random_state=0).fit(X_agg, y_agg)
    proba = est.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-10)
    assert log_loss(y_test, proba) < log_loss(y_test, uniform)
    # Tuning moved the hyperparameters and lowered the validation loss.
    hist = est.tuning_history_
    assert hist["validation_loss"].min() < hist["validation_loss"].iloc[0]
    assert est.validation_loss_ == pytest.approx(hist["validation_loss"].min())


def test_tuning_history_and_hyperparams(cancer):
    pool, X_agg, y_agg, *_ = cancer
    est = AggregatedClassifier(frozen(pool), aggregator="stacking", random_state=0).fit(X_agg, y_agg)
    l2 = est.hyperparams_["l2"]
    assert list(l2.index) == list(pool)
    assert np.all((l2 >= 1e-3 - 1e-12) & (l2 <= 1e2 + 1e-9))
    cols = set(est.tuning_history_.columns)
    assert {"step", "validation_loss", "hypergrad_norm", "inner_iter", "seconds"} <= cols
    assert {f"l2[{n}]" for n in pool} <= cols
    assert est.n_iter_ == len(est.tuning_history_)


def test_fixed_and_partly_fixed_hyperparams(cancer):
    pool, X_agg, y_agg, *_ = cancer
    est = AggregatedClassifier(
        frozen(pool), aggregator="weights", hyperparams="fixed", random_state=0
    ).fit(X_agg, y_agg)
    assert est.hyperparams_ == {"temperature": 1.0, "l2": 1e-3, "entropy": 1e-4}
    assert est.n_iter_ == 1
    est = AggregatedClassifier(
        frozen(pool), aggregator="weights", hyperparams={"temperature": 0.8}, random_state=0
    ).fit(X_agg, y_agg)
    assert est.hyperparams_["temperature"] == pytest.approx(0.8)
    assert est.hyperparams_["l2"] != pytest.approx(1e-3)


def test_regressor_beats_pool_mean_and_multioutput():
    X, y = load_diabetes(return_X_y=True)
    X_pool, X_rest, y_pool, y_rest = train_test_split(X, y, train_size=0.4, random_state=0)
    X_agg, X_test, y_agg, y_test = train_test_split(X_rest, y_rest, test_size=0.5, random_state=0)
    pool = {
        "ridge": Ridge(1.0).fit(X_pool, y_pool),
        "tree": DecisionTreeRegressor(max_depth=3, random_state=0).fit(X_pool, y_pool),
        "lin": LinearRegression().fit(X_pool, y_pool),
        "bad": DecisionTreeRegressor(max_depth=12, random_state=0).fit(X_pool, y_pool),
    }
    mean_pred = np.mean([m.predict(X_test) for m in pool.values()], axis=0)
    for agg in ("stacking", "weights"):
        reg = AggregatedRegressor(frozen(pool), aggregator=agg, random_state=0).fit(X_agg, y_agg)
        assert mean_squared_error(y_test, reg.predict(X_test)) < mean_squared_error(y_test, mean_pred)
    Y = np.column_stack([y, np.log(y)])
    reg = AggregatedRegressor(
        [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=3, random_state=0))], random_state=0
    ).fit(X, Y)
    assert reg.predict(X[:5]).shape == (5, 2)


@pytest.mark.parametrize("tuner", ["implicit-cg", "implicit-neumann", "truncated-reverse", "reverse"])
def test_every_tuner_runs(cancer, tuner):
    pool, X_agg, y_agg, *_ = cancer
    est = AggregatedClassifier(
        frozen(pool), aggregator="weights", tuner=tuner, max_outer_iter=5, random_state=0
    ).fit(X_agg, y_agg)
    assert np.isfinite(est.validation_loss_)
    assert est.tuning_history_["hypergrad_norm"].notna().all()


def test_adam_and_single_split(cancer):
    pool, X_agg, y_agg, X_test, _ = cancer
    est = AggregatedClassifier(
        frozen(pool), aggregator="stacking", optimizer="adam", cv=None, max_outer_iter=10, random_state=0
    ).fit(X_agg, y_agg)
    assert est.predict_proba(X_test).shape == (len(X_test), 2)


# -- pretrained models ---------------------------------------------------------------
def test_pretrained_models_are_never_refit(cancer):
    pool, X_agg, y_agg, X_test, _ = cancer
    models = {n: clone(m).fit(X_agg, y_agg) for n, m in list(pool.items())[:3]}
    for m in models.values():
        m.fit = Mock(side_effect=AssertionError("refit"))
    est = AggregatedClassifier(list(models.items()), random_state=0).fit(X_agg, y_agg)
    est.predict(X_test)
    assert all(m.fit.call_count == 0 for m in models.values())
    # Through clone, a FrozenEstimator / as_base_model wrapper keeps the model itself.
    wrapped = [("a", as_base_model(models["lr"])), ("b", FrozenEstimator(models["nb"]))]
    est2 = clone(AggregatedClassifier(wrapped, random_state=0)).fit(X_agg, y_agg)
    assert est2.base_models_["a"].estimator is models["lr"]
    assert all(m.fit.call_count == 0 for m in models.values())


def test_unfitted_estimators_fitted_inside_and_prefit_true(cancer):
    _, X_agg, y_agg, *_ = cancer
    ests = [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=2, random_state=0))]
    est = AggregatedClassifier(ests, random_state=0).fit(X_agg, y_agg)
    assert hasattr(est.named_estimators_["nb"], "classes_")
    assert not hasattr(ests[0][1], "classes_")  # the user's object is untouched
    with pytest.raises(UnfittedBaseModelError, match="'nb'.*prefit=True"):
        AggregatedClassifier(ests, prefit=True).fit(X_agg, y_agg)


def test_class_alignment_by_label():
    X, y = load_iris(return_X_y=True)
    sub = y != 1
    partial = LogisticRegression(max_iter=500).fit(X[sub], y[sub])  # knows classes 0 and 2
    labels = np.array(["setosa", "versicolor", "virginica"])
    full = LogisticRegression(max_iter=500).fit(X, y)
    est = AggregatedClassifier(
        [("partial", FrozenEstimator(partial)), ("full", FrozenEstimator(full))], random_state=0
    ).fit(X, y)
    Z = est.base_models_["partial"].predict_raw(X[:3])
    assert Z.shape == (3, 2)
    assert est.score(X, y) > 0.9
    with pytest.raises(IncompatibleBaseModelError, match="'partial'.*incompatible"):
        AggregatedClassifier(
            [("partial", FrozenEstimator(partial)), ("full", FrozenEstimator(full))]
        ).fit(X, labels[y])


# -- scikit-learn integration ----------------------------------------------------------
def test_nested_params_pipeline_and_pandas(cancer):
    pool, X_agg, y_agg, X_test, _ = cancer
    est = AggregatedClassifier(
        [("nb", GaussianNB()), ("rf", RandomForestClassifier(20, random_state=0))], random_state=0
    )
    params = est.get_params()
    assert "aggregator" in params and "rf__max_depth" in params
    est.set_params(rf__max_depth=2, aggregator="weights")
    assert est.get_params()["rf__max_depth"] == 2
    from aggregators import Stacking

    est2 = AggregatedClassifier([("nb", GaussianNB()), ("rf", RandomForestClassifier(5))], aggregator=Stacking())
    est2.set_params(aggregator__l2=0.5)
    assert est2.get_params()["aggregator__l2"] == 0.5
    names = [f"f{i}" for i in range(X_agg.shape[1])]
    df = pd.DataFrame(X_agg, columns=names)
    pipe = make_pipeline(StandardScaler().set_output(transform="pandas"), est).fit(df, y_agg)
    assert list(pipe[-1].feature_names_in_) == names
    assert pipe.predict(pd.DataFrame(X_test, columns=names)).shape == (len(X_test),)


def test_reproducible_and_picklable(cancer):
    pool, X_agg, y_agg, X_test, _ = cancer
    make = lambda: AggregatedClassifier(frozen(pool), aggregator="stacking", random_state=3)  # noqa: E731
    a = make().fit(X_agg, y_agg).predict_proba(X_test)
    est = make().fit(X_agg, y_agg)
    np.testing.assert_array_equal(a, est.predict_proba(X_test))
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.predict_proba(X_test), a)


# -- user-defined aggregation functions --------------------------------------------------
class PowerMean(Aggregator):
    """(sum_m w_m p_m^r)^(1/r): the README's example."""

    short_name = "test_power_mean"

    def __init__(self, r=1.0, l2=1e-2):
        self.r = r
        self.l2 = l2

    def hyperparameters(self, ctx):
        return [Hyperparameter("r", self.r, 0.1, 10.0), Hyperparameter("l2", self.l2, 1e-6, 1e2)]

    def init_params(self, ctx, Z, y, X=None):
        return {"logits": ctx.zeros(ctx.n_models)}

    def forward(self, params, hyper, Z, X=None):
        w = torch.softmax(params["logits"], 0)[:, None]
        r = hyper["r"][0]
        return torch.log((w * Z.clamp_min(1e-6) ** r).sum(1) ** (1 / r))

    def penalty(self, params, hyper):
        return 0.5 * hyper["l2"][0] * params["logits"].pow(2).sum()


def test_user_defined_aggregator_end_to_end(cancer):
    pool, X_agg, y_agg, X_test, y_test = cancer
    for spec in (PowerMean(), "test_power_mean"):
        est = AggregatedClassifier(frozen(pool), aggregator=spec, random_state=0).fit(X_agg, y_agg)
        assert set(est.hyperparams_) == {"r", "l2"}
        assert est.hyperparams_["r"] != pytest.approx(1.0)  # it was tuned
        assert log_loss(y_test, est.predict_proba(X_test)) < 0.5
    assert AggregatedClassifier(frozen(pool), aggregator=PowerMean()).get_params()["aggregator__r"] == 1.0


class Fragile(PowerMean):
    """Its forward pass breaks (NaN) once r falls below 1.5: the tuner must notice."""

    short_name = None

    def forward(self, params, hyper, Z, X=None):
        out = super().forward(params, hyper, Z, X)
        r = hyper["r"][0].detach()  # a constant NaN: gradients of the good branch stay finite
        return out + torch.where(r < 1.5, torch.full_like(r, float("nan")), torch.zeros_like(r))


def test_divergence_keeps_last_good_hyperparams(cancer):
    pool, X_agg, y_agg, X_test, _ = cancer
    # Lower r pays on this data (measured: 1.9 -> 1.08), so the tuner walks into the NaN region.
    est = AggregatedClassifier(
        frozen(pool), aggregator=Fragile(r=1.9, l2=1.0), hyperparams={"l2": 1.0},
        optimizer="adam", max_outer_iter=30, random_state=0,
    )
    with pytest.warns(HypergradientWarning, match="stopped early"):
        est.fit(X_agg, y_agg)
    assert np.isfinite(est.hyperparams_["r"]) and 1.5 <= est.hyperparams_["r"] < 1.9
    assert np.all(np.isfinite(est.predict_proba(X_test)))


# -- bad input ---------------------------------------------------------------------------
class LazyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.LazyLinear(2)

    def forward(self, x):
        return self.lin(x)


def _two():
    return [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=2, random_state=0))]


X_IRIS, Y_IRIS = load_iris(return_X_y=True)
X_NAN = X_IRIS.copy()
X_NAN[3, 1] = np.nan
X_INF = X_IRIS.copy()
X_INF[0, 0] = np.inf


@pytest.mark.parametrize(
    "est, X, y, err, match",
    [
        (AggregatedClassifier(_two()), X_NAN, Y_IRIS, ValueError, "NaN"),
        (AggregatedClassifier(_two()), X_INF, Y_IRIS, ValueError, "infinity|inf"),
        (AggregatedClassifier(_two()), X_IRIS, np.zeros(150), ValueError, "only one class"),
        (AggregatedClassifier(_two()[:1]), X_IRIS, Y_IRIS, ValueError, "at least 2 base models"),
        (AggregatedClassifier(_two()), X_IRIS, Y_IRIS + 0.5, ValueError, "Unknown label type"),
        (AggregatedClassifier(_two()), X_IRIS, Y_IRIS[:-1], ValueError, "inconsistent numbers of samples"),
        (
            AggregatedClassifier(_two() + [("net", LazyNet())]),
            X_IRIS, Y_IRIS, UnfittedBaseModelError, "'net'.*uninitialised",
        ),
        (AggregatedClassifier(_two(), aggregator="nope"), X_IRIS, Y_IRIS, ValueError, "unknown aggregator 'nope'"),
        (
            AggregatedClassifier(_two(), hyperparams={"l3": 1.0}),
            X_IRIS, Y_IRIS, ValueError, r"\['l3'\].*\['l2'\]",
        ),
        (
            AggregatedClassifier(_two() + [("reg", Ridge())]),
            X_IRIS, Y_IRIS, IncompatibleBaseModelError, "'reg' is a regressor",
        ),
        (AggregatedClassifier(_two(), cv=1), X_IRIS, Y_IRIS, ValueError, "'cv' parameter"),
        (AggregatedClassifier([GaussianNB(), GaussianNB()]), X_IRIS, Y_IRIS, TypeError, r"\(name, model\) tuples"),
    ],
)
def test_bad_input(est, X, y, err, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(err, match=match):
            est.fit(X, y)


def test_bad_input_at_predict():
    est = AggregatedClassifier(_two(), random_state=0, max_outer_iter=3).fit(X_IRIS, Y_IRIS)
    with pytest.raises(ValueError, match="features"):
        est.predict(X_IRIS[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        est.predict(X_NAN)


def test_base_model_with_nan_output_is_named():
    bad = TorchModel(torch.nn.Linear(4, 3), output="logits")
    torch.nn.init.constant_(bad.module.weight, float("nan"))
    with pytest.raises(UnfittedBaseModelError, match="non-finite"):
        AggregatedClassifier(_two() + [("bad", bad)]).fit(X_IRIS, Y_IRIS)
