"""scikit-learn's estimator checks on both estimators.

The checks change the number of features and the classes from one fit to the
next, so the instances use cheap *unfitted* base estimators, fitted inside
with out-of-fold predictions (pretrained pools have their own tests). Base
estimators get a ``random_state`` so that two fits are identical. The
instances keep the default ``cv=5`` but bound tuning at ``max_outer_iter=5``
(default 30) so that the ~240 checks run in about a minute on one core.
"""

import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
from sklearn.utils.estimator_checks import parametrize_with_checks

from aggregators import AggregatedClassifier, AggregatedRegressor


def _instances():
    for agg in ("auto", "stacking", "weights"):
        yield AggregatedClassifier(
            [("lr", LogisticRegression()), ("tree", DecisionTreeClassifier(max_depth=3, random_state=0)),
             ("nb", GaussianNB())],
            aggregator=agg,
            max_outer_iter=5,  # keeps the ~60 checks fast; tuning is tested elsewhere
            random_state=0,
        )
        yield AggregatedRegressor(
            [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=3, random_state=0))],
            aggregator=agg,
            max_outer_iter=5,
            random_state=0,
        )


# One check of scikit-learn 1.9 fails by design; every other passes on these instances.
# (scikit-learn itself skips check_array_api_input unless SCIPY_ARRAY_API=1 is set.)
_REPEATS = (
    "a row of weight k and k copies of the row give the same losses (asserted with "
    "max_outer_iter=0 in tests/test_estimators.py), but copies change the cross-fitting "
    "folds, and the inner folds of base estimators fitted inside, so tuned fits differ"
)
EXPECTED_FAILED_CHECKS: dict = {
    name: {"check_sample_weight_equivalence_on_dense_data": _REPEATS}
    for name in ("AggregatedClassifier", "AggregatedRegressor")
}


@parametrize_with_checks(
    list(_instances()),
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS.get(type(est).__name__, {}),
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize("est", list(_instances()), ids=lambda e: f"{type(e).__name__}-{e.aggregator}")
def test_nested_params_roundtrip(est):
    name, base = est.estimators[0]
    key = f"{name}__{'C' if name == 'lr' else 'alpha'}"  # LogisticRegression / Ridge
    params = est.get_params()
    assert "aggregator" in params and params[name] is base and key in params
    twin = clone(est).set_params(**{key: 0.5})
    assert twin.get_params()[key] == 0.5
    assert est.get_params()[key] != 0.5  # the clone is independent
