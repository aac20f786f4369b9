"""Behaviour of AggregatedClassifier / AggregatedRegressor.

End to end on bundled datasets with a pretrained pool (``cancer_pool`` in
``conftest.py``: 40 % trains the pool, 30 % is what the aggregators see, 30 %
is the test set); the pretrained path (never refit, predictions computed once,
class alignment by label, pickling); scikit-learn integration (nested
parameters, Pipeline, pandas); the tuning options; user-defined aggregation
functions; and the order of checks on bad input (the table of bad input
itself is ``tests/test_bad_input.py``).
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings
from unittest.mock import Mock

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_diabetes, load_iris
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.metrics import log_loss, mean_squared_error, r2_score
from sklearn.model_selection import KFold, train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from aggregators import (
    AggregatedClassifier,
    AggregatedRegressor,
    AggregationContext,
    Aggregator,
    Hyperparameter,
    HypergradientWarning,
    LearnedWeights,
    Stacking,
)
from base_models import (
    CallableModel,
    PrecomputedModel,
    UnfittedBaseModelError,
    as_base_model,
)

X_IRIS, Y_IRIS = load_iris(return_X_y=True)
IRIS_NAMES = np.array(["setosa", "versicolor", "virginica"])


def _cheap(**kw):
    """A classifier over two cheap unfitted estimators (fitted inside)."""
    ests = [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=2, random_state=0))]
    return AggregatedClassifier(ests, **{"max_outer_iter": 3, "random_state": 0, **kw})


# -- end to end ----------------------------------------------------------------------
@pytest.mark.parametrize("aggregator", ["stacking", "weights"])
def test_tuned_beats_uniform_average_on_breast_cancer(cancer_pool, frozen_pool, aggregator):
    d = cancer_pool
    uniform = np.mean([m.predict_proba(d.X_test) for m in d.pool.values()], axis=0)
    est = AggregatedClassifier(frozen_pool, aggregator=aggregator, random_state=0)
    proba = est.fit(d.X_agg, d.y_agg).predict_proba(d.X_test)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-10)
    # Measured: uniform 0.124, stacking 0.102, weights 0.092 (best single model 0.087).
    assert log_loss(d.y_test, proba) < log_loss(d.y_test, uniform)
    # Tuning moved the hyperparameters and lowered the validation loss.
    hist = est.tuning_history_
    assert hist["validation_loss"].min() < hist["validation_loss"].iloc[0]
    assert est.validation_loss_ == pytest.approx(hist["validation_loss"].min())
    np.testing.assert_array_equal(est.predict(d.X_test), est.classes_[proba.argmax(1)])


def test_regressor_beats_pool_mean_on_diabetes():
    X, y = load_diabetes(return_X_y=True)
    X_pool, X_rest, y_pool, y_rest = train_test_split(X, y, train_size=0.4, random_state=0)
    X_agg, X_test, y_agg, y_test = train_test_split(X_rest, y_rest, test_size=0.5, random_state=0)
    pool = {
        "ridge": Ridge(1.0),
        "tree": DecisionTreeRegressor(max_depth=3, random_state=0),
        "lin": LinearRegression(),
        "deep": DecisionTreeRegressor(max_depth=12, random_state=0),  # overfits: a bad member
    }
    for m in pool.values():
        m.fit(X_pool, y_pool)
    mean_mse = mean_squared_error(y_test, np.mean([m.predict(X_test) for m in pool.values()], 0))
    frozen = [(n, FrozenEstimator(m)) for n, m in pool.items()]
    for agg in ("stacking", "weights"):
        reg = AggregatedRegressor(frozen, aggregator=agg, random_state=0).fit(X_agg, y_agg)
        assert reg.predict(X_test).shape == (len(X_test),)
        assert mean_squared_error(y_test, reg.predict(X_test)) < mean_mse, agg
    # The weights learn to drop the overfitting tree.
    weights = reg.aggregator_.weights_
    assert weights["deep"] < 1 / len(pool)


def test_regressor_output_shapes_and_multioutput():
    X, y = load_diabetes(return_X_y=True)
    ests = [("ridge", Ridge(0.1)), ("tree", DecisionTreeRegressor(max_depth=3, random_state=0))]
    Y = np.column_stack([y, 100 * np.log(y)])  # two targets on different scales
    reg = AggregatedRegressor(ests, max_outer_iter=3, random_state=0).fit(X, Y)
    pred = reg.predict(X)
    assert pred.shape == (len(X), 2) and reg.n_outputs_ == 2
    assert np.all(r2_score(Y, pred, multioutput="raw_values") > 0.4)
    col = AggregatedRegressor(ests, max_outer_iter=3, random_state=0).fit(X, y[:, None])
    assert col.predict(X[:5]).shape == (5, 1) and col.n_outputs_ == 1
    flat = AggregatedRegressor(ests, max_outer_iter=3, random_state=0).fit(X, y)
    assert flat.predict(X[:5]).shape == (5,) and np.ndim(flat.y_mean_) == 0
    np.testing.assert_allclose(flat.predict(X), col.predict(X).ravel(), rtol=1e-10)
    # Fitted state is public and ends in "_" (no private attributes set in fit).
    assert not [k for k in vars(flat) if k.startswith("_") and not k.endswith("_")]


# -- tuning options -------------------------------------------------------------------
@pytest.mark.parametrize("tuner", ["implicit-cg", "implicit-neumann", "truncated-reverse", "reverse"])
def test_every_tuner_runs(cancer_pool, frozen_pool, tuner):
    d = cancer_pool
    est = AggregatedClassifier(
        frozen_pool, aggregator="weights", tuner=tuner, max_outer_iter=5, cv=3, random_state=0
    ).fit(d.X_agg, d.y_agg)
    hist = est.tuning_history_
    assert len(hist) >= 3 and np.isfinite(hist["hypergrad_norm"]).all()
    assert hist["validation_loss"].min() < hist["validation_loss"].iloc[0]
    assert 0.5 <= est.hyperparams_["temperature"] <= 2.0
    assert log_loss(d.y_test, est.predict_proba(d.X_test)) < 0.12


def test_adam_optimizer_single_split_and_cv_object(cancer_pool, frozen_pool):
    d = cancer_pool
    adam = AggregatedClassifier(
        frozen_pool, aggregator="stacking", optimizer="adam", cv=None, max_outer_iter=8,
        random_state=0,
    ).fit(d.X_agg, d.y_agg)
    assert 2 <= adam.n_iter_ <= 8
    # Adam moves every L2 entry (by up to outer_lr=0.1 in log space per step).
    assert not np.allclose(adam.hyperparams_["l2"].to_numpy(), 1e-2)
    assert adam.predict_proba(d.X_test).shape == (len(d.X_test), 2)
    folds = AggregatedClassifier(
        frozen_pool, aggregator="weights", cv=KFold(3, shuffle=True, random_state=0),
        random_state=0,
    ).fit(d.X_agg, d.y_agg)
    assert np.isfinite(folds.validation_loss_)


def test_tuning_history_and_hyperparams(cancer_pool, frozen_pool):
    d = cancer_pool
    est = AggregatedClassifier(frozen_pool, aggregator="stacking", cv=3, random_state=0)
    est.fit(d.X_agg, d.y_agg)
    l2 = est.hyperparams_["l2"]
    assert list(l2.index) == list(d.pool)
    floor = 0.1 / round(len(d.y_agg) * 2 / 3)  # Stacking's floor: 0.1 / training rows
    assert np.all((l2 >= floor * (1 - 1e-9)) & (l2 <= 1e2 * (1 + 1e-9)))
    hist = est.tuning_history_
    assert {"step", "validation_loss", "hypergrad_norm", "inner_iter", "seconds"} <= set(hist)
    assert {f"l2[{n}]" for n in d.pool} <= set(hist)
    assert est.n_iter_ == len(hist) and list(hist["step"]) == list(range(len(hist)))
    # The kept hyperparameters are those of the best row of the history.
    best = hist.loc[hist["validation_loss"].idxmin()]
    np.testing.assert_allclose(l2.to_numpy(), [best[f"l2[{n}]"] for n in d.pool], rtol=1e-10)
    assert est.tuning_time_ > 0 and (hist["inner_iter"] > 0).all()


def test_fixed_and_partly_fixed_hyperparams(cancer_pool, frozen_pool):
    d = cancer_pool
    fixed = AggregatedClassifier(
        frozen_pool, aggregator="weights", hyperparams="fixed", random_state=0
    ).fit(d.X_agg, d.y_agg)
    assert fixed.hyperparams_ == {"temperature": 1.0, "l2": 1e-3, "entropy": 1e-4}
    assert fixed.n_iter_ == 1
    part = AggregatedClassifier(
        frozen_pool, aggregator="weights", hyperparams={"temperature": 0.8}, random_state=0
    ).fit(d.X_agg, d.y_agg)
    assert part.hyperparams_["temperature"] == 0.8
    assert (part.tuning_history_["temperature"] == 0.8).all()
    assert part.hyperparams_["l2"] != pytest.approx(1e-3)  # the rest was tuned
    # A vector hyperparameter fixed entry by entry.
    values = [0.1, 0.2, 0.3, 0.4, 0.5]
    vec = AggregatedClassifier(
        frozen_pool, aggregator=Stacking(passthrough=True), hyperparams={"l2": values},
        cv=None, random_state=0,
    ).fit(d.X_agg, d.y_agg)
    np.testing.assert_allclose(vec.hyperparams_["l2"].to_numpy(), values)
    assert vec.hyperparams_["l2_passthrough"] != pytest.approx(0.1)


def test_verbose_prints_one_line_per_step(cancer_pool, frozen_pool, capsys):
    d = cancer_pool
    AggregatedClassifier(frozen_pool, aggregator="weights", max_outer_iter=3, random_state=0).fit(
        d.X_agg, d.y_agg
    )
    assert capsys.readouterr().out == ""
    est = AggregatedClassifier(
        frozen_pool, aggregator="weights", max_outer_iter=3, random_state=0, verbose=1
    ).fit(d.X_agg, d.y_agg)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(est.tuning_history_)
    shown = [float(re.search(r"validation loss (\S+)", line).group(1)) for line in lines]
    # The mean over the cv folds, as in tuning_history_ (not the engine's sum).
    np.testing.assert_allclose(shown, est.tuning_history_["validation_loss"], rtol=1e-5)


# -- pretrained models ----------------------------------------------------------------
def test_pretrained_models_are_never_refit(cancer_pool):
    d = cancer_pool
    models = {n: copy.deepcopy(m) for n, m in d.pool.items() if n in ("lr", "nb", "forest")}
    for m in models.values():
        m.fit = Mock(side_effect=AssertionError("a pretrained model was refit"))
    est = AggregatedClassifier(list(models.items()), random_state=0).fit(d.X_agg, d.y_agg)
    est.predict(d.X_test)
    assert est.estimators_[0] is models["lr"]
    # FrozenEstimator / as_base_model keep the model itself through clone, and
    # prefit=False cannot refit them either.
    wrapped = [("a", as_base_model(models["lr"])), ("b", FrozenEstimator(models["nb"]))]
    for prefit in ("auto", True, False):
        est2 = clone(AggregatedClassifier(wrapped, prefit=prefit, random_state=0))
        est2.fit(d.X_agg, d.y_agg)
        assert est2.base_models_["a"].estimator is models["lr"]
        assert est2.named_estimators_["b"].estimator is models["nb"]
    assert all(m.fit.call_count == 0 for m in models.values())


def test_base_predictions_are_computed_once(cancer_pool):
    d = cancer_pool
    nb = copy.deepcopy(d.pool["nb"])
    nb.predict_proba = Mock(wraps=nb.predict_proba)
    ests = [("nb", FrozenEstimator(nb)), ("lr", FrozenEstimator(d.pool["lr"]))]
    est = AggregatedClassifier(ests, aggregator="stacking", random_state=0).fit(d.X_agg, d.y_agg)
    assert nb.predict_proba.call_count == 1  # cv=5 folds and the refit reuse them
    est.predict_proba(d.X_test)
    assert nb.predict_proba.call_count == 2
    # prefit=False cannot refit a frozen model, so it does not predict fold by fold either.
    AggregatedClassifier(ests, prefit=False, random_state=0).fit(d.X_agg, d.y_agg)
    assert nb.predict_proba.call_count == 3

    class RowCountingNB(GaussianNB):
        rows = 0

        def predict_proba(self, X):
            type(self).rows += len(X)
            return super().predict_proba(X)

    # Fitted inside: every row is predicted once, out of fold.
    AggregatedClassifier(
        [("nb", RowCountingNB()), ("lr", FrozenEstimator(d.pool["lr"]))], random_state=0
    ).fit(d.X_agg, d.y_agg)
    assert RowCountingNB.rows == len(d.X_agg)


def test_unfitted_estimators_are_fitted_inside(cancer_pool):
    d = cancer_pool
    ests = [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=2, random_state=0))]
    est = AggregatedClassifier(ests, random_state=0).fit(d.X_agg, d.y_agg)
    assert est.named_estimators_["nb"].class_count_.sum() == len(d.X_agg)
    assert not hasattr(ests[0][1], "classes_")  # the user's object is untouched
    with pytest.raises(UnfittedBaseModelError, match=r"'nb' \(GaussianNB\).*prefit=True"):
        AggregatedClassifier(ests, prefit=True).fit(d.X_agg, d.y_agg)


def test_prefit_false_refits_clones_of_fitted_estimators(cancer_pool):
    d = cancer_pool
    few = GaussianNB().fit(d.X_agg[:40], d.y_agg[:40])
    few.fit = Mock(side_effect=AssertionError("the user's object was refit"))
    ests = [("nb", few), ("lr", FrozenEstimator(d.pool["lr"]))]
    auto = AggregatedClassifier(ests, random_state=0).fit(d.X_agg, d.y_agg)
    assert auto.named_estimators_["nb"] is few
    refit = AggregatedClassifier(ests, prefit=False, random_state=0).fit(d.X_agg, d.y_agg)
    assert refit.named_estimators_["nb"] is not few
    assert refit.named_estimators_["nb"].class_count_.sum() == len(d.X_agg)
    assert few.fit.call_count == 0


def test_class_alignment_of_a_model_knowing_a_subset_of_classes():
    X, y = X_IRIS, Y_IRIS
    sub = y != 1
    partial = LogisticRegression(max_iter=500).fit(X[sub], y[sub])  # knows classes 0 and 2
    full = GaussianNB().fit(X, y)
    est = AggregatedClassifier(
        [("partial", FrozenEstimator(partial)), ("full", FrozenEstimator(full))],
        # Strong L2 keeps both weights away from 0, so a misplaced column would show.
        aggregator=LearnedWeights(eps=1e-12, l2=10.0), hyperparams="fixed", random_state=0,
    ).fit(X, y)
    # With T=1 the linear pool is sum_m w_m p_m on columns aligned by label:
    # the partial model's two columns go to classes 0 and 2, class 1 gets 0.
    aligned = np.zeros((len(X), 3))
    aligned[:, [0, 2]] = partial.predict_proba(X)
    w = est.aggregator_.weights_
    expected = w["partial"] * aligned + w["full"] * full.predict_proba(X)
    np.testing.assert_allclose(est.predict_proba(X), expected / expected.sum(1, keepdims=True), atol=1e-8)
    assert 0.2 < w["partial"] < 0.8
    assert est.score(X, y) > 0.9


@pytest.mark.parametrize("per", ["global", "per_output"])
@pytest.mark.parametrize("pool", ["linear", "log", "regression"])
def test_weights_forward_is_the_written_out_weighted_sum(per, pool):
    """The contraction over the model axis equals ``sum_m w_m Z[:, m]`` term by term."""
    gen = torch.Generator().manual_seed(0)
    n, m, c = 7, 4, 3
    Z = torch.softmax(torch.randn(n, m, c, generator=gen, dtype=torch.float64), 2)
    agg = LearnedWeights(per=per, pool="linear" if pool == "regression" else pool)
    task = "regression" if pool == "regression" else "classification"
    agg.bind(AggregationContext(task, m, c, 1, [f"m{j}" for j in range(m)]))
    shape = (m,) if per == "global" else (m, c)
    params = {"logits": torch.randn(*shape, generator=gen, dtype=torch.float64)}
    w = torch.softmax(params["logits"], 0)
    w = (w[:, None] if w.dim() == 1 else w).expand(m, c)
    mix = lambda V: sum(w[j] * V[:, j] for j in range(m))  # noqa: E731
    if pool == "regression":
        np.testing.assert_allclose(agg.forward(params, {}, Z), mix(Z), rtol=1e-12)
        return
    hyper = {"temperature": torch.tensor([0.7], dtype=torch.float64)}
    if pool == "linear":
        p = mix(Z)
        expected = torch.log(p / p.sum(1, keepdim=True) if per == "per_output" else p)
    else:
        expected = mix(torch.log(Z))
    np.testing.assert_allclose(agg.forward(params, hyper, Z), expected / 0.7, rtol=1e-12)


def test_class_alignment_by_label_not_by_column_order():
    X, y = X_IRIS, IRIS_NAMES[Y_IRIS]
    lr = LogisticRegression(max_iter=500).fit(X, y)
    nb = GaussianNB().fit(X, y)
    order = [2, 0, 1]
    # The same model, its columns in another order, with its labels declared.
    shuffled = CallableModel(
        lambda Xn: lr.predict_proba(Xn)[:, order], output="proba", classes=IRIS_NAMES[order]
    )
    kw = dict(aggregator="stacking", max_outer_iter=3, cv=None, random_state=0)
    ref = AggregatedClassifier([("lr", FrozenEstimator(lr)), ("nb", FrozenEstimator(nb))], **kw)
    alt = AggregatedClassifier([("lr", shuffled), ("nb", FrozenEstimator(nb))], **kw)
    np.testing.assert_allclose(
        alt.fit(X, y).predict_proba(X), ref.fit(X, y).predict_proba(X), atol=1e-10
    )
    assert list(alt.classes_) == list(IRIS_NAMES)


def test_stored_predictions_with_positional_keys(cancer_pool):
    """Stored for a whole frame, keys left to default (positions): the fit
    rows again and the frame's other rows are predicted; a new frame whose
    default index repeats the fit rows' numbers is refused (tests/test_bad_input.py)."""
    d = cancer_pool
    X = pd.DataFrame(np.vstack([d.X_agg, d.X_test]))
    n = len(d.X_agg)
    stored = PrecomputedModel(d.pool["forest"].predict_proba(X.to_numpy()))
    pool = [("stored", stored), ("nb", FrozenEstimator(d.pool["nb"]))]
    est = AggregatedClassifier(pool, aggregator="weights", random_state=0).fit(X.iloc[:n], d.y_agg)
    assert est.estimators_[0] is stored and stored._fit_rows is None  # the user's, untouched
    ref = AggregatedClassifier(
        [("forest", FrozenEstimator(d.pool["forest"])), ("nb", FrozenEstimator(d.pool["nb"]))],
        aggregator="weights", random_state=0,
    ).fit(d.X_agg, d.y_agg)
    np.testing.assert_allclose(est.predict_proba(X.iloc[n:]), ref.predict_proba(d.X_test), atol=1e-10)
    np.testing.assert_allclose(est.predict_proba(X.iloc[:n]), ref.predict_proba(d.X_agg), atol=1e-10)


# -- scikit-learn integration ----------------------------------------------------------
def test_nested_params_clone_and_pipeline(cancer_pool):
    d = cancer_pool
    est = AggregatedClassifier(
        [("nb", GaussianNB()), ("rf", RandomForestClassifier(10, random_state=0))],
        aggregator=Stacking(), hyperparams="fixed", max_outer_iter=3, random_state=0,
    )
    params = est.get_params()
    assert {"aggregator__l2", "aggregator__passthrough", "rf__max_depth", "nb__var_smoothing"} <= set(params)
    assert params["rf"] is est.estimators[1][1]
    est.set_params(rf__max_depth=2, aggregator__l2=0.1)
    assert est.estimators[1][1].max_depth == 2 and est.aggregator.l2 == 0.1
    twin = clone(est)
    assert twin.get_params()["rf__max_depth"] == 2 and twin.get_params()["aggregator__l2"] == 0.1
    assert twin.estimators[1][1] is not est.estimators[1][1] and twin.aggregator is not est.aggregator
    twin.set_params(nb=DecisionTreeClassifier(max_depth=1))
    assert isinstance(twin.estimators[0][1], DecisionTreeClassifier)
    assert isinstance(est.estimators[0][1], GaussianNB)
    bad = clone(est)
    with pytest.raises(ValueError, match="short name 'weights'.*Aggregator instance"):
        bad.set_params(rf__max_depth=5, aggregator="weights", aggregator__l2=0.1)
    assert isinstance(bad.aggregator, Stacking) and bad.estimators[1][1].max_depth == 2

    pipe = Pipeline([("scale", StandardScaler()), ("agg", est)])
    pipe.set_params(agg__rf__max_depth=3, agg__aggregator__l2=1.0)
    pipe.fit(d.X_agg, d.y_agg)
    fitted = pipe.named_steps["agg"]
    assert fitted.named_estimators_["rf"].max_depth == 3
    np.testing.assert_allclose(fitted.hyperparams_["l2"].to_numpy(), 1.0)
    assert pipe.score(d.X_test, d.y_test) > 0.9
    assert clone(pipe).get_params()["agg__rf__max_depth"] == 3


def test_dataframe_input(cancer_pool):
    d = cancer_pool
    names = [f"f{i}" for i in range(d.X_agg.shape[1])]
    df = pd.DataFrame(d.X_agg, columns=names)
    df_test = pd.DataFrame(d.X_test, columns=names)
    with warnings.catch_warnings():
        # Base models are fitted and called on the DataFrame itself, so none
        # warns about missing feature names.
        warnings.simplefilter("error")
        est = _cheap().fit(df, d.y_agg)
        proba = est.predict_proba(df_test)
    assert list(est.feature_names_in_) == names and est.n_features_in_ == len(names)
    assert list(est.named_estimators_["nb"].feature_names_in_) == names
    np.testing.assert_allclose(_cheap().fit(d.X_agg, d.y_agg).predict_proba(d.X_test), proba)
    assert not hasattr(_cheap().fit(d.X_agg, d.y_agg), "feature_names_in_")
    with pytest.raises(ValueError, match="feature names"):
        est.predict(df_test[names[::-1]])
    pipe = make_pipeline(StandardScaler().set_output(transform="pandas"), _cheap()).fit(df, d.y_agg)
    assert list(pipe[-1].feature_names_in_) == names


def test_reproducible_with_random_state(cancer_pool, frozen_pool):
    d = cancer_pool
    make = lambda: AggregatedClassifier(frozen_pool, cv=3, random_state=3)  # noqa: E731
    a = make().fit(d.X_agg, d.y_agg).predict_proba(d.X_test)
    np.testing.assert_array_equal(a, make().fit(d.X_agg, d.y_agg).predict_proba(d.X_test))
    # Also with base estimators fitted inside.
    b = _cheap(cv=None).fit(d.X_agg, d.y_agg).predict_proba(d.X_test)
    np.testing.assert_array_equal(b, _cheap(cv=None).fit(d.X_agg, d.y_agg).predict_proba(d.X_test))


def test_pickle_round_trip(cancer_pool, frozen_pool):
    d = cancer_pool
    est = AggregatedClassifier(frozen_pool, aggregator="weights", random_state=0).fit(d.X_agg, d.y_agg)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.predict_proba(d.X_test), est.predict_proba(d.X_test))
    pd.testing.assert_frame_equal(again.tuning_history_, est.tuning_history_)
    X, y = load_diabetes(return_X_y=True)
    reg = AggregatedRegressor(
        [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=3, random_state=0))],
        max_outer_iter=3, random_state=0,
    ).fit(X, y)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(reg)).predict(X), reg.predict(X))


def test_fit_and_predict_emit_no_warnings(cancer_pool, frozen_pool):
    d = cancer_pool
    X, y = load_diabetes(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for agg in ("stacking", "weights"):
            est = AggregatedClassifier(frozen_pool, aggregator=agg, random_state=0)
            est.fit(d.X_agg, d.y_agg).predict_proba(d.X_test)
            _cheap(aggregator=agg).fit(X_IRIS, Y_IRIS).predict(X_IRIS)
            AggregatedRegressor(
                [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=3, random_state=0))],
                aggregator=agg, max_outer_iter=3, random_state=0,
            ).fit(X, y).predict(X)


def test_float32_and_explicit_cpu(cancer_pool, frozen_pool):
    d = cancer_pool
    est = AggregatedClassifier(
        frozen_pool, aggregator="weights", dtype="float32", device="cpu", random_state=0
    ).fit(d.X_agg, d.y_agg)
    assert est.device_ == torch.device("cpu")
    ref = AggregatedClassifier(frozen_pool, aggregator="weights", random_state=0).fit(d.X_agg, d.y_agg)
    # float32 stops the outer line search earlier (the loss stops registering
    # progress), so the tuned values differ a little; the ensembles must not.
    assert log_loss(d.y_test, est.predict_proba(d.X_test)) == pytest.approx(
        log_loss(d.y_test, ref.predict_proba(d.X_test)), abs=1e-2
    )
    np.testing.assert_allclose(est.predict_proba(d.X_test), ref.predict_proba(d.X_test), atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(cancer_pool, frozen_pool):
    d = cancer_pool
    kw = dict(aggregator="stacking", cv=3, random_state=0)
    gpu = AggregatedClassifier(frozen_pool, device="cuda", **kw).fit(d.X_agg, d.y_agg)
    cpu = AggregatedClassifier(frozen_pool, device="cpu", **kw).fit(d.X_agg, d.y_agg)
    assert gpu.device_.type == "cuda"
    # Reductions run in another order on the GPU; the outer L-BFGS-B path and
    # the inner tolerances (1e-7 / 1e-6) turn rounding into ~1e-5 differences.
    np.testing.assert_allclose(gpu.predict_proba(d.X_test), cpu.predict_proba(d.X_test), atol=1e-4)
    assert gpu.validation_loss_ == pytest.approx(cpu.validation_loss_, rel=1e-4)


# -- user-defined aggregation functions --------------------------------------------------
class PowerMean(Aggregator):
    """``(sum_m w_m p_m^r)^(1/r)``: a weighted power mean with a tuned exponent."""

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


def test_user_defined_aggregator_end_to_end(cancer_pool, frozen_pool):
    d = cancer_pool
    for spec in (PowerMean(), "test_power_mean"):
        est = AggregatedClassifier(frozen_pool, aggregator=spec, random_state=0).fit(d.X_agg, d.y_agg)
        assert isinstance(est.aggregator_, PowerMean)
        assert set(est.hyperparams_) == {"r", "l2"}
        assert est.hyperparams_["r"] != pytest.approx(1.0)  # it was tuned
        assert log_loss(d.y_test, est.predict_proba(d.X_test)) < 0.15
    est = AggregatedClassifier(frozen_pool, aggregator=PowerMean())
    assert est.get_params()["aggregator__r"] == 1.0
    assert est.set_params(aggregator__r=2.0).aggregator.r == 2.0


@pytest.mark.parametrize(
    "name", ["stacking", "weights", "choquet", "sugeno", "uninorm", "laf", "moe", "select"]
)
@pytest.mark.parametrize("task, n_outputs", [("classification", 2), ("classification", 3),
                                             ("regression", 1), ("regression", 2)])
def test_forward_is_told_the_task_through_bind(name, task, n_outputs):
    """forward gets no context: it reads what bind(ctx) recorded, never the shapes."""
    from aggregators._registry import resolve_aggregator

    gen = torch.Generator().manual_seed(0)
    n, m = 12, 3
    ctx = AggregationContext(task, m, n_outputs, 2, ["a", "b", "c"], generator=gen)
    Z = torch.rand(n, m, n_outputs, generator=gen, dtype=torch.float64)
    if task == "classification":
        Z = Z / Z.sum(2, keepdim=True)
    X = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    agg = resolve_aggregator(name)
    agg.check_task(ctx)
    hyper = {h.name: torch.as_tensor(h.initial()) for h in agg.hyperparameters(ctx)}
    params = {**agg.init_params(ctx, Z, None, X)}
    with pytest.raises(RuntimeError, match="told its task"):
        agg.forward({**params, **agg.fit_buffers(ctx, Z, None, X)}, hyper, Z, X)
    assert agg.bind(ctx) is agg and (agg.task_, agg.n_outputs_, agg.n_models_) == (task, n_outputs, m)
    params.update(agg.fit_buffers(ctx, Z, None, X))
    out = agg.forward(params, hyper, Z, X)
    assert out.shape == (n, n_outputs) and torch.isfinite(out).all()


def test_moe_gate_summarises_a_regressor_by_its_mean_prediction():
    from aggregators import SparseMoE

    agg = SparseMoE(gate_inputs="X+outputs").bind(
        AggregationContext("regression", 3, 2, 2, ["a", "b", "c"])
    )
    Z = torch.arange(12, dtype=torch.float64).reshape(2, 3, 2)
    torch.testing.assert_close(agg._summary(Z), Z.mean(2))


class Fragile(PowerMean):
    """Its forward pass breaks (NaN) once r falls below 1.5: the tuner must notice."""

    short_name = None

    def forward(self, params, hyper, Z, X=None):
        out = super().forward(params, hyper, Z, X)
        r = hyper["r"][0].detach()  # a constant NaN: gradients of the good branch stay finite
        return out + torch.where(r < 1.5, torch.full_like(r, float("nan")), torch.zeros_like(r))


def test_divergence_keeps_last_good_hyperparams(cancer_pool, frozen_pool):
    d = cancer_pool
    # Lower r pays on this data (measured: 1.9 -> 1.08 for PowerMean), so the
    # tuner walks into the NaN region.
    est = AggregatedClassifier(
        frozen_pool, aggregator=Fragile(r=1.9, l2=1.0), hyperparams={"l2": 1.0},
        optimizer="adam", max_outer_iter=30, random_state=0,
    )
    with pytest.warns(HypergradientWarning, match="stopped early"):
        est.fit(d.X_agg, d.y_agg)
    hist = est.tuning_history_
    assert np.isfinite(hist["validation_loss"]).all() and (hist["r"] >= 1.5).all()
    assert len(hist) < 30  # it stopped at the divergence, not at max_outer_iter
    assert 1.5 <= est.hyperparams_["r"] < 1.9
    assert est.hyperparams_["r"] == pytest.approx(hist.loc[hist["validation_loss"].idxmin(), "r"])
    assert np.all(np.isfinite(est.predict_proba(d.X_test)))


# -- bad input: the table is tests/test_bad_input.py; here, what a table cannot say ------
def _reg_pool():
    return [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=2, random_state=0))]


X_DIAB, Y_DIAB = load_diabetes(return_X_y=True)


class NoFitNB(GaussianNB):
    def fit(self, X, y, sample_weight=None):
        raise AssertionError("a base estimator was fitted before the configuration was checked")


@pytest.mark.parametrize(
    "params, match",
    [
        ({"hyperparams": {"l3": 1.0}}, "l3"),
        ({"hyperparams": {"l2": [1.0, 2.0, 3.0]}}, "takes a scalar or 2 values"),
        ({"aggregator": LearnedWeights(per="nope")}, "per must be"),
        ({"aggregator": "nope"}, "unknown aggregator"),
    ],
)
def test_configuration_errors_come_before_fitting_base_models(params, match):
    est = AggregatedClassifier([("a", NoFitNB()), ("b", NoFitNB())], **{"aggregator": "stacking", **params})
    with pytest.raises(ValueError, match=match):
        est.fit(X_IRIS, Y_IRIS)


def test_unfitted_estimator_raises_not_fitted():
    with pytest.raises(NotFittedError):
        _cheap().predict(X_IRIS)
    with pytest.raises(NotFittedError):
        AggregatedRegressor(_reg_pool()).predict(X_DIAB)


def test_zero_outer_iterations_refits_at_initial_hyperparameters(cancer_pool, frozen_pool):
    d = cancer_pool
    est = AggregatedClassifier(
        frozen_pool, aggregator="weights", hyperparams={"l2": 0.5}, max_outer_iter=0,
        random_state=0,
    ).fit(d.X_agg, d.y_agg)
    assert est.n_iter_ == 0 and len(est.tuning_history_) == 0
    assert "validation_loss" in est.tuning_history_.columns
    assert np.isnan(est.validation_loss_)
    assert est.hyperparams_ == pytest.approx({"temperature": 1.0, "l2": 0.5, "entropy": 1e-4})
    # Same refit as a fixed-hyperparameter fit, which also validates once first.
    ref = AggregatedClassifier(
        frozen_pool, aggregator=LearnedWeights(l2=0.5), hyperparams="fixed", random_state=0
    ).fit(d.X_agg, d.y_agg)
    np.testing.assert_allclose(
        est.predict_proba(d.X_test), ref.predict_proba(d.X_test), atol=1e-5
    )


def test_stacking_shared_l2(cancer_pool, frozen_pool):
    d = cancer_pool
    est = AggregatedClassifier(
        frozen_pool, aggregator=Stacking(per_model_l2=False), max_outer_iter=5, random_state=0
    ).fit(d.X_agg, d.y_agg)
    assert isinstance(est.hyperparams_["l2"], float)
    assert list(est.tuning_history_.columns[-2:]) == ["l2", "l2_scale"]


@pytest.mark.parametrize("aggregator", ["weights", "stacking", "choquet"])
def test_regressor_tunes_when_the_validation_loss_is_tiny(aggregator):
    """One near-perfect model among poor ones: the standardised validation
    error is ~0.005, so an absolute stopping test (SciPy's ``ftol`` below a
    loss of 1) ended tuning after a step or two at the initial
    hyperparameters, 1.4x to 1.7x the best model's test error (measured:
    stacking 36.8, choquet 46.0 against ridge's 26.5). Tuned to ``tol`` in
    relative terms, the ensemble finds the good model."""
    from sklearn.datasets import make_regression
    from sklearn.neighbors import KNeighborsRegressor

    X, y = make_regression(600, 10, n_informative=6, n_targets=2, noise=5, random_state=0)
    X_pool, X_rest, y_pool, y_rest = train_test_split(X, y, test_size=0.5, random_state=0)
    X_agg, X_test, y_agg, y_test = train_test_split(X_rest, y_rest, test_size=0.5, random_state=0)
    pool = [
        ("ridge", FrozenEstimator(Ridge().fit(X_pool, y_pool))),
        ("knn", FrozenEstimator(KNeighborsRegressor().fit(X_pool, y_pool))),
        ("tree", FrozenEstimator(DecisionTreeRegressor(max_depth=5, random_state=0).fit(X_pool, y_pool))),
    ]
    best = mean_squared_error(y_test, pool[0][1].predict(X_test))
    reg = AggregatedRegressor(pool, aggregator=aggregator, random_state=0).fit(X_agg, y_agg)
    assert len(reg.tuning_history_) > 3
    # Measured: weights 26.50, stacking 26.32, choquet 26.33 against 26.50.
    assert mean_squared_error(y_test, reg.predict(X_test)) <= 1.05 * best


# -- sample weights ---------------------------------------------------------------------------
def _diabetes_pool():
    X, y = load_diabetes(return_X_y=True)
    pool = [
        ("ridge", FrozenEstimator(Ridge().fit(X[:150], y[:150]))),
        ("tree", FrozenEstimator(DecisionTreeRegressor(max_depth=3, random_state=0).fit(X[:150], y[:150]))),
    ]
    return pool, X[150:300], y[150:300], X[300:]


@pytest.mark.parametrize("task, agg", [
    ("classification", "stacking"), ("classification", "weights"), ("classification", "choquet"),
    ("regression", "stacking"), ("regression", "weights"),
])
def test_sample_weight_counts_as_repeated_rows(task, agg, cancer_pool, frozen_pool):
    """A row of weight k fits as k copies of it (without tuning, so that the
    copies cannot change the cross-fitting folds)."""
    if task == "classification":
        Est, pool, X, y, X_new = (AggregatedClassifier, frozen_pool, cancer_pool.X_agg,
                                  cancer_pool.y_agg, cancer_pool.X_test)
    else:
        Est, (pool, X, y, X_new) = AggregatedRegressor, _diabetes_pool()
    sw = np.random.default_rng(0).integers(0, 4, len(y)).astype(float)
    kw = dict(aggregator=agg, max_outer_iter=0, random_state=0)
    weighted = Est(pool, **kw).fit(X, y, sample_weight=sw)
    rows = np.repeat(np.arange(len(y)), sw.astype(int))
    copied = Est(pool, **kw).fit(X[rows], y[rows])
    out = (lambda e: e.predict_proba(X_new)) if task == "classification" else (lambda e: e.predict(X_new))
    np.testing.assert_allclose(out(weighted), out(copied), rtol=1e-9, atol=1e-9)
    unweighted = Est(pool, **kw).fit(X, y)
    assert np.abs(out(weighted) - out(unweighted)).max() > 1e-4  # the weights mattered


@pytest.mark.parametrize("agg", ["stacking", "weights"])
def test_rows_of_weight_zero_do_not_count_in_tuning(agg, frozen_pool, cancer_pool):
    """Tuned over 5 folds (drawn without looking at y), rows of weight 0 may carry
    any label: neither the inner fits nor the validation losses read them."""
    d = cancer_pool
    y = d.y_agg.copy()
    sw = np.ones(len(y))
    sw[::4] = 0.0
    noisy = y.copy()
    noisy[::4] = 1 - noisy[::4]
    kw = dict(aggregator=agg, cv=KFold(5, shuffle=True, random_state=0), random_state=0)
    a = AggregatedClassifier(frozen_pool, **kw).fit(d.X_agg, y, sample_weight=sw)
    b = AggregatedClassifier(frozen_pool, **kw).fit(d.X_agg, noisy, sample_weight=sw)
    np.testing.assert_allclose(a.predict_proba(d.X_test), b.predict_proba(d.X_test), atol=1e-8)
    assert a.validation_loss_ == pytest.approx(b.validation_loss_, rel=1e-8)
    c = AggregatedClassifier(frozen_pool, **kw).fit(d.X_agg, noisy)
    assert abs(c.validation_loss_ - b.validation_loss_) > 1e-3


def test_equal_sample_weights_are_no_weights(frozen_pool, cancer_pool):
    d = cancer_pool
    ref = AggregatedClassifier(frozen_pool, random_state=0).fit(d.X_agg, d.y_agg)
    for sw in (np.ones(len(d.y_agg)), np.full(len(d.y_agg), 2.5), list(np.ones(len(d.y_agg)))):
        est = AggregatedClassifier(frozen_pool, random_state=0).fit(d.X_agg, d.y_agg, sample_weight=sw)
        np.testing.assert_array_equal(est.predict_proba(d.X_test), ref.predict_proba(d.X_test))


def test_sample_weight_reaches_base_estimators_fitted_inside():
    X, y = X_IRIS, Y_IRIS
    sw = np.random.default_rng(1).uniform(0.1, 3.0, len(y))
    est = AggregatedClassifier(
        [("lr", LogisticRegression(max_iter=2000)), ("nb", GaussianNB())], random_state=0,
    ).fit(X, y, sample_weight=sw)
    direct = LogisticRegression(max_iter=2000).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(est.named_estimators_["lr"].coef_, direct.coef_, rtol=1e-6)
    unweighted = LogisticRegression(max_iter=2000).fit(X, y)
    assert np.abs(est.named_estimators_["lr"].coef_ - unweighted.coef_).max() > 1e-3
    with pytest.raises(ValueError, match=r"'pipe'.*takes no sample_weight"):
        AggregatedClassifier(
            [("lr", LogisticRegression(max_iter=2000)), ("pipe", make_pipeline(StandardScaler(), GaussianNB()))],
        ).fit(X, y, sample_weight=sw)


@pytest.mark.parametrize("sw, match", [
    (np.r_[-1.0, np.ones(149)], "negative"),
    (np.zeros(150), "non-zero|sums to 0"),  # scikit-learn 1.9 says it first
    (np.ones(10), "sample_weight"),
    (np.r_[np.nan, np.ones(149)], "NaN"),
])
def test_bad_sample_weight(sw, match):
    with pytest.raises(ValueError, match=match):
        AggregatedClassifier([("lr", LogisticRegression()), ("nb", GaussianNB())]).fit(
            X_IRIS, Y_IRIS, sample_weight=sw
        )


def test_a_fold_without_weight_is_an_error(frozen_pool, cancer_pool):
    d = cancer_pool
    sw = np.r_[np.ones(len(d.y_agg) // 2), np.zeros(len(d.y_agg) - len(d.y_agg) // 2)]
    with pytest.raises(ValueError, match="total sample weight of 0"):
        # A tuned aggregator uses the given folds (auto's winner may tune nothing).
        AggregatedClassifier(frozen_pool, aggregator="stacking", cv=KFold(2),
                             random_state=0).fit(
            d.X_agg, d.y_agg, sample_weight=sw
        )


def test_nested_params_of_a_mixed_pool_through_clone():
    """``forest__max_depth`` and ``aggregator__l2`` are parameters; base models
    without ``get_params`` (torch modules, stored predictions) are listed by
    name only."""
    est = AggregatedClassifier(
        [("forest", RandomForestClassifier(5, random_state=0)), ("net", torch.nn.Linear(2, 2)),
         ("stored", np.zeros((3, 2))), ("nb", GaussianNB())],
        aggregator=Stacking(),
    )
    params = est.get_params(deep=True)
    assert params["forest__max_depth"] is None and "aggregator__l2" in params
    assert params["net"] is est.estimators[1][1] and params["stored"] is est.estimators[2][1]
    assert not any(k.startswith(("net__", "stored__")) for k in params)
    l2 = est.aggregator.l2
    twin = clone(est).set_params(forest__max_depth=3, aggregator__l2=0.5)
    assert twin.get_params()["forest__max_depth"] == 3 and twin.get_params()["aggregator__l2"] == 0.5
    assert est.get_params()["forest__max_depth"] is None and est.aggregator.l2 == l2
    again = clone(twin)
    assert again.get_params()["forest__max_depth"] == 3 and again.get_params()["aggregator__l2"] == 0.5
    assert again.estimators[0][1] is not twin.estimators[0][1]


def test_tune_ranges_ranges_the_named_and_the_rest_follow_hyperparams(frozen_pool, cancer_pool):
    d = cancer_pool
    base = AggregatedClassifier(
        frozen_pool, aggregator=LearnedWeights(), hyperparams={"temperature": 0.8},
        max_outer_iter=3, random_state=0,
    )
    est = clone(base).set_params(tune_ranges={"l2": (1e-3, 1e1, "log")}).fit(d.X_agg, d.y_agg)
    hyper, history = est.hyperparams_, est.tuning_history_
    assert hyper["temperature"] == pytest.approx(0.8)  # fixed by hyperparams
    assert 1e-3 * (1 - 1e-9) <= hyper["l2"] <= 1e1 * (1 + 1e-9)
    # Not named: as the aggregator tunes it by default (LearnedWeights holds
    # its entropy weight), and a range tunes it.
    assert history["entropy"].nunique() == 1
    ranged = clone(base).set_params(
        tune_ranges={"entropy": (1e-6, 1e-1, "log")}).fit(d.X_agg, d.y_agg)
    assert ranged.tuning_history_["entropy"].nunique() > 1
    # A range overrides a fixed value; "fixed" holds every one not named.
    fixed = clone(base).set_params(
        hyperparams="fixed", tune_ranges={"temperature": (0.5, 2.0, "log")}
    ).fit(d.X_agg, d.y_agg)
    assert fixed.tuning_history_["temperature"].nunique() > 1
    assert fixed.hyperparams_["l2"] == pytest.approx(LearnedWeights().l2)
    assert fixed.hyperparams_["entropy"] == pytest.approx(LearnedWeights().entropy)
    # An empty dict is no ranges at all.
    empty = clone(base).set_params(tune_ranges={}).fit(d.X_agg, d.y_agg)
    plain = clone(base).fit(d.X_agg, d.y_agg)
    assert empty.hyperparams_["l2"] == pytest.approx(plain.hyperparams_["l2"])


@pytest.mark.parametrize("tune_ranges, match", [
    ({"l3": (0.1, 1.0, "log")}, r"tune_ranges names \['l3'\]"),
    ({"l2": 0.5}, r"tune_ranges\['l2'\] must be a range"),
    ([("l2", (0.1, 1.0, "log"))], "'tune_ranges' parameter"),
])
def test_tune_ranges_errors(frozen_pool, cancer_pool, tune_ranges, match):
    est = AggregatedClassifier(
        frozen_pool, aggregator=LearnedWeights(), tune_ranges=tune_ranges, max_outer_iter=1
    )
    with pytest.raises((ValueError, TypeError), match=match):
        est.fit(cancer_pool.X_agg, cancer_pool.y_agg)
