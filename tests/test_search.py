"""HypergradSearchCV: GridSearchCV's interface, continuous dimensions by gradient."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from scipy.stats import loguniform, norm, uniform
from sklearn.base import clone
from sklearn.datasets import load_diabetes, make_classification
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold, train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from aggregators import (
    AggregatedClassifier,
    AggregatedRegressor,
    HypergradSearchCV,
    LearnedWeights,
    Stacking,
)
from aggregators.hypergrad._tuner import FIRST_STEP


@pytest.fixture
def stacking(frozen_pool):
    return AggregatedClassifier(frozen_pool, aggregator=Stacking(), random_state=0)


@pytest.fixture
def data(cancer_pool):
    return cancer_pool.X_agg, cancer_pool.y_agg


CV = StratifiedKFold(3, shuffle=True, random_state=0)


def test_cv_results_have_grid_search_keys(stacking, data):
    X, y = data
    space = {"aggregator": [Stacking(), LearnedWeights()], "aggregator__l2": loguniform(1e-3, 1e2)}
    # "fixed": l2 alone is solved, as in the grid (and the refit below).
    search = HypergradSearchCV(
        clone(stacking).set_params(hyperparams="fixed"), space, cv=CV, scoring="neg_log_loss"
    ).fit(X, y)
    grid = GridSearchCV(
        clone(stacking).set_params(hyperparams="fixed"),
        {"aggregator": [Stacking(), LearnedWeights()], "aggregator__l2": [0.1]},
        cv=CV, scoring="neg_log_loss",
    ).fit(X, y)
    assert set(search.cv_results_) == set(grid.cv_results_)
    res = search.cv_results_
    assert len(res["params"]) == 2
    assert np.all(res["rank_test_score"] >= 1)
    assert search.n_splits_ == 3 and not search.multimetric_
    assert search.best_index_ == int(np.argmin(res["rank_test_score"]))
    assert search.best_score_ == res["mean_test_score"][search.best_index_]
    # Split scores are honest: each is the fold refit's log-loss on held-out rows.
    l2 = res["params"][0]["aggregator__l2"]
    assert l2.shape == (5,) and np.all((l2 >= 1e-3 * (1 - 1e-9)) & (l2 <= 1e2 * (1 + 1e-9)))
    tr, te = next(iter(CV.split(X, y)))
    ref = clone(stacking).set_params(
        aggregator=Stacking(), hyperparams={"l2": l2, "l2_scale": Stacking().l2_scale},
        max_outer_iter=0,
    ).fit(X[tr], y[tr])
    assert res["split0_test_score"][0] == pytest.approx(
        -log_loss(y[te], ref.predict_proba(X[te]), labels=[0, 1]), abs=1e-4
    )


def test_solution_matches_a_fine_grid(stacking, data):
    """One shared L2 solved by gradient is as good as the best of a fine grid."""
    X, y = data
    shared = clone(stacking).set_params(aggregator=LearnedWeights(per="global"))
    search = HypergradSearchCV(
        shared, {"aggregator__l2": (1e-4, 1e1, "log")}, cv=CV, scoring="neg_log_loss"
    ).fit(X, y)
    grid = GridSearchCV(
        clone(shared).set_params(hyperparams="fixed"),
        {"aggregator__l2": np.logspace(-4, 1, 11)}, cv=CV, scoring="neg_log_loss",
    ).fit(X, y)
    # The solve minimises the same cross-validated log-loss the grid scores.
    assert search.best_score_ >= grid.best_score_ - 2e-3
    assert isinstance(search.best_params_["aggregator__l2"], float)


def test_pipeline_and_delegation(frozen_pool, data, cancer_pool):
    X, y = data
    pipe = Pipeline([
        ("scale", StandardScaler()),
        ("agg", AggregatedClassifier(frozen_pool, aggregator=Stacking(), random_state=0)),
    ])
    # The frozen pool expects raw features: a scaler in front would feed it the
    # wrong inputs, so use an identity-like scaler to check the plumbing only.
    pipe.set_params(scale=StandardScaler(with_mean=False, with_std=False))
    search = HypergradSearchCV(
        pipe, {"agg__aggregator__l2": uniform(1e-3, 10.0)}, cv=3, random_state=0
    ).fit(X, y)
    assert set(search.best_params_) == {"agg__aggregator__l2"}
    best = search.best_estimator_
    Xt = cancer_pool.X_test
    np.testing.assert_array_equal(search.predict(Xt), best.predict(Xt))
    np.testing.assert_allclose(search.predict_proba(Xt), best.predict_proba(Xt))
    assert search.score(Xt, cancer_pool.y_test) == best.score(Xt, cancer_pool.y_test)
    np.testing.assert_array_equal(search.classes_, [0, 1])
    # The best estimator's parameters describe it: a refit reproduces it.
    again = clone(best).fit(X, y)
    # (up to the final solve's tolerance: the two refits start from other points)
    np.testing.assert_allclose(again.predict_proba(Xt), best.predict_proba(Xt), atol=1e-4)


def test_multimetric_and_train_scores(stacking, data):
    X, y = data
    search = HypergradSearchCV(
        stacking, {"aggregator__l2": loguniform(1e-2, 1e1)}, cv=CV,
        scoring=["neg_log_loss", "accuracy"], refit="accuracy", return_train_score=True,
    ).fit(X, y)
    res = search.cv_results_
    for key in ("mean_test_accuracy", "rank_test_neg_log_loss", "split2_train_accuracy",
                "mean_train_neg_log_loss"):
        assert key in res
    assert search.multimetric_
    assert 0.8 < search.score(X, y) <= 1.0
    with pytest.raises(ValueError, match="refit must be one of"):
        HypergradSearchCV(stacking, {"aggregator__l2": loguniform(1e-2, 1)}, cv=CV,
                          scoring=["accuracy", "neg_log_loss"], refit=True).fit(X, y)


def test_parallel_equals_serial(stacking, data):
    X, y = data
    space = {"aggregator__l2": loguniform(1e-3, 1e2), "max_inner_iter": [50, 100]}
    a = HypergradSearchCV(stacking, space, cv=CV, n_jobs=1).fit(X, y)
    b = HypergradSearchCV(stacking, space, cv=CV, n_jobs=2).fit(X, y)
    np.testing.assert_allclose(a.cv_results_["mean_test_score"], b.cv_results_["mean_test_score"])
    for pa, pb in zip(a.cv_results_["params"], b.cv_results_["params"]):
        np.testing.assert_allclose(pa["aggregator__l2"], pb["aggregator__l2"])


def test_regressor_and_other_methods():
    X, y = load_diabetes(return_X_y=True)
    X_pool, y_pool, X, y = X[:200], y[:200], X[200:], y[200:]
    pool = [("ridge", Ridge().fit(X_pool, y_pool)),
            ("tree", DecisionTreeRegressor(max_depth=3, random_state=0).fit(X_pool, y_pool))]
    est = AggregatedRegressor(pool, aggregator=Stacking(), random_state=0)
    for method in ("implicit-neumann", "implicit-cg"):
        search = HypergradSearchCV(
            est, {"aggregator__l2": loguniform(1e-3, 1e2)}, cv=KFold(3), method=method
        ).fit(X, y)
        assert search.best_estimator_.tuner == method
        assert 0.0 < search.best_score_ < 1.0  # R^2 of the refits on held-out folds
    assert search.predict(X[:4]).shape == (4,)


def test_clear_errors(stacking, data):
    X, y = data
    with pytest.raises(TypeError, match="GridSearchCV"):
        HypergradSearchCV(LogisticRegression(), {"C": loguniform(1e-2, 1e2)}).fit(X, y)
    with pytest.raises(ValueError, match="not a hyperparameter of the aggregation"):
        HypergradSearchCV(stacking, {"max_inner_iter": (10, 100, "linear")}).fit(X, y)
    with pytest.raises(ValueError, match="all 1 candidates.*does not have"), pytest.warns(Warning):
        HypergradSearchCV(stacking, {"aggregator__nope": loguniform(1e-2, 1)}).fit(X, y)
    with pytest.raises(ValueError, match="loguniform or scipy.stats.uniform"):
        HypergradSearchCV(stacking, {"aggregator__l2": norm(0, 1)}).fit(X, y)
    with pytest.raises(ValueError, match="low < high"):
        HypergradSearchCV(stacking, {"aggregator__l2": (1.0, 0.1, "log")}).fit(X, y)
    with pytest.raises(ValueError, match="list of values"):
        HypergradSearchCV(stacking, {"max_inner_iter": 50}).fit(X, y)
    with pytest.raises(ValueError):  # unknown method, caught by parameter validation
        HypergradSearchCV(stacking, {"aggregator__l2": loguniform(1e-2, 1)}, method="x").fit(X, y)


def test_failed_candidate_gets_error_score(stacking, data):
    X, y = data
    space = {"aggregator__l2": loguniform(1e-2, 1e1), "max_outer_iter": [2, -1]}
    with pytest.warns(Warning, match="failed to fit"):
        search = HypergradSearchCV(stacking, space, cv=CV, error_score=-99.0).fit(X, y)
    res = search.cv_results_
    bad = [i for i, p in enumerate(res["params"]) if p["max_outer_iter"] == -1][0]
    assert res["mean_test_score"][bad] == -99.0
    assert search.best_params_["max_outer_iter"] == 2
    with pytest.raises(ValueError):
        HypergradSearchCV(stacking, space, cv=CV, error_score="raise").fit(X, y)


def test_estimator_hyperparams_accept_ranges(frozen_pool, data):
    X, y = data
    est = AggregatedClassifier(
        frozen_pool, aggregator=Stacking(), hyperparams={"l2": (0.5, 2.0, "linear")},
        max_outer_iter=5, random_state=0,
    ).fit(X, y)
    l2 = est.hyperparams_["l2"]
    assert np.all((l2 >= 0.5 - 1e-9) & (l2 <= 2.0 + 1e-9))


def test_split_scores_from_fold_solutions_match_refits(stacking, data):
    """Split scores are those of refitting each split at the solved values; the
    solve's own fold solutions stay on the best estimator (``fold_aggregators_``)."""
    X, y = data
    search = HypergradSearchCV(
        stacking, {"aggregator__l2": loguniform(1e-3, 1e2)}, cv=CV, scoring="neg_log_loss",
        return_train_score=True,
    ).fit(X, y)
    best = search.best_estimator_
    assert len(best.fold_aggregators_) == 3 and not best.fitted_inside_
    solved = best.get_params()["hyperparams"]  # l2 and l2_scale, as the refits hold them
    assert np.allclose(solved["l2"], search.best_params_["aggregator__l2"])
    for k, (tr, te) in enumerate(CV.split(X, y)):
        ref = clone(stacking).set_params(hyperparams=solved, max_outer_iter=0).fit(X[tr], y[tr])
        want = -log_loss(y[te], ref.predict_proba(X[te]), labels=[0, 1])
        assert search.cv_results_[f"split{k}_test_score"][0] == pytest.approx(want, abs=1e-4)
        want_tr = -log_loss(y[tr], ref.predict_proba(X[tr]), labels=[0, 1])
        assert search.cv_results_[f"split{k}_train_score"][0] == pytest.approx(want_tr, abs=1e-4)


def test_estimator_hyperparams_dict_is_respected(stacking, data):
    """Fixed values in the estimator's own hyperparams stay fixed; its ranges hold
    for the hyperparameters the space does not name."""
    X, y = data
    est = clone(stacking).set_params(
        aggregator=LearnedWeights(), hyperparams={"temperature": 0.8, "entropy": (1e-5, 1e-3, "log")}
    )
    search = HypergradSearchCV(est, {"aggregator__l2": loguniform(1e-4, 1e1)}, cv=CV).fit(X, y)
    hyper = search.best_estimator_.hyperparams_
    assert hyper["temperature"] == pytest.approx(0.8)
    assert 1e-5 * (1 - 1e-9) <= hyper["entropy"] <= 1e-3 * (1 + 1e-9)
    assert search.solve_histories_[0]["entropy"].nunique() > 1  # tuned within its range
    assert 1e-4 * (1 - 1e-9) <= search.best_params_["aggregator__l2"] <= 1e1 * (1 + 1e-9)


def test_unnamed_hyperparameters_follow_the_estimators_policy(stacking, data):
    """A search over Stacking's l2 tunes l2_scale too (the estimator's default
    "tune"), unless the user fixes it: in hyperparams, or through the space."""
    X, y = data
    space = {"aggregator__l2": loguniform(1e-4, 1e2)}
    search = HypergradSearchCV(stacking, space, cv=CV).fit(X, y)
    history = search.solve_histories_[0]
    assert history["l2_scale"].nunique() > 1
    assert search.best_estimator_.hyperparams_["l2_scale"] != pytest.approx(Stacking().l2_scale)
    fixed = HypergradSearchCV(
        clone(stacking).set_params(hyperparams={"l2_scale": 0.1}), space, cv=CV
    ).fit(X, y)
    assert np.allclose(fixed.solve_histories_[0]["l2_scale"], 0.1)
    assert fixed.best_estimator_.hyperparams_["l2_scale"] == pytest.approx(0.1)
    through_space = HypergradSearchCV(
        stacking, {**space, "hyperparams": [{"l2_scale": 0.1}]}, cv=CV
    ).fit(X, y)
    assert through_space.best_estimator_.hyperparams_["l2_scale"] == pytest.approx(0.1)
    # "fixed" holds everything the space does not name, as a grid search would.
    held = HypergradSearchCV(clone(stacking).set_params(hyperparams="fixed"), space, cv=CV).fit(X, y)
    assert held.best_estimator_.hyperparams_["l2_scale"] == pytest.approx(Stacking().l2_scale)


def test_readme_search_scores_as_well_as_the_plain_estimator():
    """The README's search (Stacking or weights, l2 by gradient) on a small
    3-class problem: at least the plain estimator's test log-loss, within a
    small tolerance (it used to hold l2_scale at its initial value and lose)."""
    X, y = make_classification(
        900, 12, n_informative=6, n_classes=3, n_clusters_per_class=1, random_state=0
    )
    X_pool, X_rest, y_pool, y_rest = train_test_split(X, y, train_size=300, random_state=0,
                                                      stratify=y)
    X_agg, X_test, y_agg, y_test = train_test_split(X_rest, y_rest, train_size=300,
                                                    random_state=0, stratify=y_rest)
    pool = [
        ("lr", FrozenEstimator(LogisticRegression(max_iter=1000).fit(X_pool, y_pool))),
        ("nb", FrozenEstimator(GaussianNB().fit(X_pool, y_pool))),
        ("tree", FrozenEstimator(DecisionTreeClassifier(max_depth=4, random_state=0)
                                 .fit(X_pool, y_pool))),
    ]
    plain = AggregatedClassifier(pool, aggregator=Stacking(), random_state=0).fit(X_agg, y_agg)
    search = HypergradSearchCV(
        AggregatedClassifier(pool, aggregator=Stacking(), random_state=0),
        {"aggregator__l2": loguniform(1e-4, 1e2),
         "aggregator": [Stacking(), LearnedWeights()]},
        cv=5, scoring="neg_log_loss", method="implicit-cg",
    ).fit(X_agg, y_agg)
    ours = log_loss(y_test, search.predict_proba(X_test))
    assert ours <= log_loss(y_test, plain.predict_proba(X_test)) + 0.005


def test_first_outer_step_is_measured_in_the_given_range(frozen_pool, data):
    """L-BFGS-B's first step is along the projected negative hypergradient,
    ``FIRST_STEP`` units of the range the user gave (log-width W) long:
    |dh| = min(FIRST_STEP * W, distance to the bound), whatever the
    hyperparameter's own units and the size of its hypergradient."""
    X, y = data
    low, high = 1e-4, 1e1
    est = AggregatedClassifier(
        frozen_pool, aggregator=LearnedWeights(per="global"),
        hyperparams={"l2": (low, high, "log"), "temperature": 1.0, "entropy": 1e-3},
        max_outer_iter=3, random_state=0,
    ).fit(X, y)
    hist = est.tuning_history_
    assert len(hist) >= 2
    h0, h1 = np.log(hist["l2"].iloc[0]), np.log(hist["l2"].iloc[1])
    width = np.log(high / low)
    room = (h0 - np.log(low)) if h1 < h0 else (np.log(high) - h0)
    assert abs(h1 - h0) == pytest.approx(min(FIRST_STEP * width, room), rel=1e-6)


def test_sample_weight_follows_each_split(stacking, data):
    """A row-aligned fit parameter is sliced to each split's training rows, as
    GridSearchCV does; the solve on all rows gets it whole."""
    X, y = data
    sw = np.random.default_rng(0).uniform(0.2, 3.0, len(y))
    space = {"aggregator__l2": loguniform(1e-3, 1e2)}
    search = HypergradSearchCV(stacking, space, cv=CV, scoring="neg_log_loss").fit(X, y, sample_weight=sw)
    plain = HypergradSearchCV(stacking, space, cv=CV, scoring="neg_log_loss").fit(X, y)
    res = search.cv_results_
    l2 = res["params"][0]["aggregator__l2"]
    assert not np.allclose(l2, plain.cv_results_["params"][0]["aggregator__l2"])
    tr, te = next(iter(CV.split(X, y)))
    solved = search.best_estimator_.get_params()["hyperparams"]
    ref = clone(stacking).set_params(hyperparams=solved, max_outer_iter=0).fit(
        X[tr], y[tr], sample_weight=sw[tr]
    )
    assert res["split0_test_score"][0] == pytest.approx(
        -log_loss(y[te], ref.predict_proba(X[te]), labels=[0, 1]), abs=1e-4
    )


class _Recording(AggregatedClassifier):
    """Records the ``tune_ranges`` each fit sees."""

    seen: typing.ClassVar[list] = []

    def fit(self, X, y, sample_weight=None):
        type(self).seen.append(self.get_params(deep=False)["tune_ranges"])
        return super().fit(X, y, sample_weight=sample_weight)


def test_search_passes_its_ranges_through_tune_ranges(frozen_pool, data):
    """The solve is a clone whose tune_ranges parameter names the continuous
    dimensions; the split refits and the best estimator tune nothing."""
    X, y = data
    _Recording.seen = []
    est = _Recording(
        frozen_pool, aggregator=LearnedWeights(), hyperparams={"temperature": 0.8}, random_state=0
    )
    search = HypergradSearchCV(est, {"aggregator__l2": loguniform(1e-4, 1e1)}, cv=CV).fit(X, y)
    solve, *refits = _Recording.seen
    assert list(solve) == ["l2"]
    assert solve["l2"][0] == pytest.approx(1e-4) and solve["l2"][1:] == (pytest.approx(1e1), "log")
    assert len(refits) == 3 and all(r is None for r in refits)
    assert est.tune_ranges is None and not hasattr(est, "aggregator_")  # the user's estimator untouched
    best = search.best_estimator_.get_params()
    assert best["tune_ranges"] is None and best["hyperparams"]["temperature"] == pytest.approx(0.8)
    # The same ranges given by hand are the same solve.
    direct = AggregatedClassifier(
        frozen_pool, aggregator=LearnedWeights(), hyperparams={"temperature": 0.8}, random_state=0,
        tune_ranges=solve, cv=list(CV.split(X, y)), tuner=search.method,
    ).fit(X, y)
    assert direct.hyperparams_["l2"] == pytest.approx(search.best_params_["aggregator__l2"])
