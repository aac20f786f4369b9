"""``Aggregator.outer_budget``: a hard bound on the outer evaluations a tuning spends."""

import pytest

from aggregators import AggregatedClassifier
from aggregators.laf import LAF
from aggregators.sugeno import Sugeno


class _LAFNoBudget(LAF):
    outer_budget = None


class _LAFBudget3(LAF):
    outer_budget = 3


class _SugenoNoBudget(Sugeno):
    outer_budget = None


def _evals(frozen_pool, cancer_pool, agg, **params):
    est = AggregatedClassifier(frozen_pool, aggregator=agg, random_state=0, **params)
    est.fit(cancer_pool.X_agg, cancer_pool.y_agg)
    return len(est.tuning_history_), est


@pytest.mark.parametrize("cls", [LAF, Sugeno])
def test_laf_and_sugeno_declare_stackings_budget(cls):
    assert cls.outer_budget == 8


def test_budget_bounds_the_evaluations_line_searches_included(frozen_pool, cancer_pool):
    free, _ = _evals(frozen_pool, cancer_pool, _LAFNoBudget())
    assert free > 3  # without it, the same tuning spends more than the budget below
    bounded, est = _evals(frozen_pool, cancer_pool, _LAFBudget3())
    assert bounded == 3
    # The best of those evaluations is kept.
    assert est.validation_loss_ == pytest.approx(est.tuning_history_["validation_loss"].min())


def test_default_sugeno_fit_spends_at_most_eight_evaluations(frozen_pool, cancer_pool):
    free, _ = _evals(frozen_pool, cancer_pool, _SugenoNoBudget())
    n, est = _evals(frozen_pool, cancer_pool, Sugeno())
    assert 1 <= n <= min(8, free)
    assert est.validation_loss_ == pytest.approx(est.tuning_history_["validation_loss"].min())


def test_estimator_bound_wins_when_smaller(frozen_pool, cancer_pool):
    # max_outer_iter=1 gives L-BFGS-B 2 evaluations, fewer than the budget of 8.
    n, _ = _evals(frozen_pool, cancer_pool, LAF(), max_outer_iter=1)
    assert n <= 2


def test_line_searches_never_overrun_twice_max_outer_iter():
    # Choquet on 200 rows of diabetes (six models): with max_outer_iter=3,
    # L-BFGS-B's line searches spent 9 evaluations although maxfun was 6;
    # the estimator promises at most twice max_outer_iter.
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import Ridge
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.tree import DecisionTreeRegressor

    from aggregators import AggregatedRegressor

    X, y = load_diabetes(return_X_y=True)
    fit_rows, agg_rows = slice(0, 180), slice(180, 380)
    pool = [
        (name, model.fit(X[fit_rows], y[fit_rows]))
        for name, model in [
            ("ridge", Ridge()),
            ("knn", KNeighborsRegressor(10)),
            ("tree", DecisionTreeRegressor(max_depth=4, random_state=0)),
            ("forest", RandomForestRegressor(30, random_state=0)),
            ("gb", GradientBoostingRegressor(n_estimators=50, random_state=0)),
        ]
    ]
    for k in (1, 2, 3):
        est = AggregatedRegressor(pool, aggregator="choquet", cv=None, max_outer_iter=k,
                                  random_state=0).fit(X[agg_rows], y[agg_rows])
        assert 1 <= len(est.tuning_history_) <= 2 * k
        assert est.validation_loss_ == pytest.approx(est.tuning_history_["validation_loss"].min())


def test_stacking_spends_at_most_its_budget_of_six(frozen_pool, cancer_pool):
    from aggregators import Stacking

    class _StackingNoBudget(Stacking):
        outer_budget = None

    assert Stacking.outer_budget == 6
    free, _ = _evals(frozen_pool, cancer_pool, _StackingNoBudget())
    assert free > 6  # the shared stage's budget of 8 alone would spend more here
    n, est = _evals(frozen_pool, cancer_pool, Stacking())
    assert n == 6
    assert est.validation_loss_ == pytest.approx(est.tuning_history_["validation_loss"].min())
