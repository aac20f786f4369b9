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
