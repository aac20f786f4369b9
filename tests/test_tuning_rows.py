"""``max_tuning_rows``: tuning on a subsample of a large aggregation set.

The hyperparameters are tuned on a random (stratified) subsample; the
penalty weights are tuned as the same prior per row (the subsample's
problems see them multiplied by ``n / m``), and the aggregation function is
then fitted on all rows at the tuned values.
"""

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification, make_regression
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
from sklearn.utils import check_random_state

from aggregators import AggregatedClassifier, AggregatedRegressor, Stacking
from aggregators import auto as auto_module
from aggregators._base import Hyperparameter
from aggregators._bilevel import HyperSpace
from aggregators._fit import make_splits, tuning_rows


def _classification(n_agg=900):
    X, y = make_classification(
        600 + n_agg, 8, n_informative=5, n_classes=3, random_state=0
    )
    models = [
        ("lr", LogisticRegression(max_iter=300)),
        ("nb", GaussianNB()),
        ("tree", DecisionTreeClassifier(max_depth=3, random_state=0)),
    ]
    pool = [(name, FrozenEstimator(m.fit(X[:600], y[:600]))) for name, m in models]
    return pool, X[600:], y[600:]


def _seed(random_state):
    """The seed ``fit_aggregated`` draws from ``random_state``."""
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


# -- the subsample ---------------------------------------------------------------------
def test_tuning_rows_is_a_stratified_sorted_subsample_keeping_rare_classes():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [9000, 2997, 3])  # class 2: fewer rows than folds
    rng.shuffle(y)
    sub = tuning_rows(1000, 5, y.size, y, seed=0)
    assert np.all(np.diff(sub) > 0) and sub[-1] < y.size  # sorted, no repeats
    counts = np.bincount(y[sub], minlength=3)
    assert counts[0] == 750 and counts[1] == 250  # each class's share of the rows
    assert counts[2] == 3  # a rare class keeps all its rows (fewer than the 5 folds)
    assert np.array_equal(sub, tuning_rows(1000, 5, y.size, y, seed=0))  # seeded
    assert not np.array_equal(sub, tuning_rows(1000, 5, y.size, y, seed=1))


def test_tuning_rows_for_regression_and_when_all_rows_are_kept():
    sub = tuning_rows(100, None, 1000, None, seed=0)
    assert sub.size == 100 and np.unique(sub).size == 100
    assert tuning_rows(1000, 5, 1000, None, seed=0) is None  # not more rows than that
    assert tuning_rows(None, 5, 10**6, None, seed=0) is None
    # "auto" leaves a splitter the user gave alone: its splits refer to all rows.
    assert tuning_rows("auto", KFold(3), 10**6, None, seed=0) is None


def test_tuning_rows_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match=r"max_tuning_rows=100 .* only an int cv"):
        tuning_rows(100, KFold(3), 1000, None, seed=0)
    with pytest.raises(ValueError, match=r"max_tuning_rows=7 is too few rows .* cv=5"):
        tuning_rows(7, 5, 1000, None, seed=0)


# -- the penalties' units --------------------------------------------------------------
def test_rescaled_space_scales_the_penalties_only_and_records_them_unscaled():
    specs = [
        Hyperparameter("l2", 1e-2, 1e-6, 1e2, size=2, penalty=True),
        Hyperparameter("temperature", 1.0, 1e-2, 1e2),
        Hyperparameter("entropy", 0.1, 1e-6, 1.0, penalty=True),
    ]
    space = HyperSpace(specs, {"entropy": 0.2}, torch.device("cpu"), torch.float64)
    sub = space.rescaled(4.0)
    u = torch.log(torch.tensor([0.5, 0.25, 2.0], dtype=torch.float64))
    v, w = space.values(u), sub.values(u)
    assert torch.allclose(w["l2"], 4.0 * v["l2"])
    assert torch.equal(w["temperature"], v["temperature"])
    assert torch.allclose(w["entropy"], torch.tensor([0.8], dtype=torch.float64))  # fixed too
    assert np.allclose(sub.flat_values(u), space.flat_values(u))  # the record: unscaled
    assert torch.equal(sub.initial(), space.initial())
    assert all(torch.equal(a, b) for a, b in zip(sub.bounds(), space.bounds()))
    assert torch.allclose(sub.rescaled(1.0).values(u)["entropy"], v["entropy"])


# -- the fit ---------------------------------------------------------------------------
def test_tuned_on_the_subsample_then_fitted_on_all_rows():
    pool, X, y = _classification()
    n, m = len(y), 400
    # The engine's tolerance schedule (Stacking's own is looser on its last solves):
    # the fold fits are then exact enough to compare with fits of their own.
    est = AggregatedClassifier(pool, aggregator=Stacking(), cv=3, max_tuning_rows=m,
                               tuner_options={"decay": 2.0}, random_state=0).fit(X, y)
    history = est.tuning_history_
    assert history.attrs["tuning_rows"] == m
    # The folds were the subsample's, fitted with the penalties scaled by n / m ...
    seed = _seed(0)
    sub = tuning_rows(m, 3, n, y, seed)
    splits = make_splits(m, y[sub], seed, 3, 0.25)
    assert len(est.fold_aggregators_) == 3
    for (tr, _), fold in zip(splits, est.fold_aggregators_):
        for name in ("l2", "l2_scale"):
            assert np.allclose(fold.hyperparams_[name], np.asarray(est.hyperparams_[name]) * n / m)
        again = AggregatedClassifier(
            pool, aggregator=Stacking(), max_outer_iter=0,
            hyperparams={k: np.asarray(v) for k, v in fold.hyperparams_.items()},
        ).fit(X[sub][tr], y[sub][tr])
        assert np.allclose(fold.coef_.values, again.aggregator_.coef_.values, atol=1e-4)
        # (Which the penalties' values decide: unscaled, the fit is another one.)
        unscaled = AggregatedClassifier(
            pool, aggregator=Stacking(), max_outer_iter=0,
            hyperparams={k: np.asarray(v) for k, v in est.hyperparams_.items()},
        ).fit(X[sub][tr], y[sub][tr])
        assert not np.allclose(fold.coef_.values, unscaled.aggregator_.coef_.values, atol=1e-3)
    # ... and the final fit is the fit on all rows at the tuned (unscaled) values.
    plain = AggregatedClassifier(
        pool, aggregator=Stacking(), max_outer_iter=0,
        hyperparams={k: np.asarray(v) for k, v in est.hyperparams_.items()},
    ).fit(X, y)
    assert np.allclose(est.predict_proba(X), plain.predict_proba(X), atol=1e-6)


def test_all_rows_when_no_more_than_max_tuning_rows_or_nothing_is_tuned():
    pool, X, y = _classification(300)
    a = AggregatedClassifier(pool, aggregator="stacking", cv=3, random_state=0,
                             max_tuning_rows=300).fit(X, y)
    b = AggregatedClassifier(pool, aggregator="stacking", cv=3, random_state=0,
                             max_tuning_rows=None).fit(X, y)
    assert a.tuning_history_.attrs["tuning_rows"] == 300
    assert np.array_equal(a.predict_proba(X), b.predict_proba(X))
    # Nothing tuned: the cross-fitting only validates, on all rows.
    c = AggregatedClassifier(pool, aggregator="stacking", cv=3, random_state=0,
                             max_tuning_rows=100, hyperparams="fixed").fit(X, y)
    assert c.tuning_history_.attrs["tuning_rows"] == 300


def test_regression_subsample_keeps_the_closed_form_and_matches_the_plain_refit():
    X, y = make_regression(1400, 6, noise=20, random_state=0)
    models = [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=3, random_state=0))]
    pool = [(name, FrozenEstimator(mdl.fit(X[:400], y[:400]))) for name, mdl in models]
    X, y = X[400:], y[400:]
    est = AggregatedRegressor(pool, aggregator="stacking", max_tuning_rows=300,
                              random_state=0).fit(X, y)
    assert est.tuning_history_.attrs["tuning_rows"] == 300
    assert est.tuning_history_.attrs["cv_solver"] == "closed-form"
    plain = AggregatedRegressor(
        pool, aggregator="stacking", max_outer_iter=0,
        hyperparams={k: np.asarray(v) for k, v in est.hyperparams_.items()},
    ).fit(X, y)
    assert np.allclose(est.predict(X), plain.predict(X), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("aggregator", ["weights", "choquet"])
def test_other_aggregators_tune_on_the_subsample(aggregator):
    pool, X, y = _classification(600)
    est = AggregatedClassifier(pool, aggregator=aggregator, cv=3, max_tuning_rows=200,
                               random_state=0).fit(X, y)
    assert est.tuning_history_.attrs["tuning_rows"] == 200
    assert np.isfinite(est.validation_loss_)
    proba = est.predict_proba(X)
    assert np.allclose(proba.sum(1), 1.0)


def test_max_tuning_rows_errors_name_it():
    pool, X, y = _classification(300)
    with pytest.raises(ValueError, match="max_tuning_rows"):
        AggregatedClassifier(pool, aggregator="stacking", max_tuning_rows="all").fit(X, y)
    with pytest.raises(ValueError, match=r"max_tuning_rows=100 .* only an int cv"):
        AggregatedClassifier(pool, aggregator="stacking", cv=KFold(3),
                             max_tuning_rows=100).fit(X, y)


def test_auto_compares_candidates_on_a_subsample_and_fits_the_winner_on_all_rows():
    pool, X, y = _classification(900)
    est = AggregatedClassifier(pool, cv=3, max_tuning_rows=100, random_state=0).fit(X, y)
    cmp = est.candidates_.attrs["compared_rows"]
    n_cmp = auto_module.N_OUTER * 100  # N_OUTER * max_tuning_rows rows
    assert len(cmp) == n_cmp and np.all(np.diff(cmp) > 0)
    assert est.candidates_.attrs["row_losses"].shape[1] == n_cmp
    chosen = est.candidates_.index[est.candidates_["chosen"]][0]
    # The winner's final fit saw every row: a fit of the same aggregator on all rows.
    again = AggregatedClassifier(pool, aggregator=type(est.aggregator_)(**est.aggregator_.get_params()),
                                 cv=3, max_tuning_rows=100, random_state=0).fit(X, y)
    assert np.allclose(est.predict_proba(X), again.predict_proba(X), atol=1e-8), chosen
    full = AggregatedClassifier(pool, cv=3, max_tuning_rows=None, random_state=0).fit(X, y)
    assert len(full.candidates_.attrs["compared_rows"]) == 900
