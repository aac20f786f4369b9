"""``Stacking.hoag_eps0`` / ``hoag_decay``: stacking's own HOAG schedule, under the user's."""

import pytest

import aggregators._fit as fit_module
from aggregators import AggregatedClassifier, Stacking
from aggregators._fit import _tuner_options
from aggregators.laf import LAF


def test_tuner_options_put_the_aggregators_eps0_under_the_users():
    own = {"eps0": Stacking.hoag_eps0, "decay": Stacking.hoag_decay,
           "min_tol": Stacking.hoag_min_tol}
    assert own == {"eps0": 1e-4, "decay": 1.01, "min_tol": 1e-3}
    assert _tuner_options(Stacking(), "hoag", None, "iterative") == own
    assert _tuner_options(Stacking(), "hoag", {"max_iter": 5}, "iterative") == {**own, "max_iter": 5}
    # The user's options win; other methods and other aggregators are left alone.
    assert _tuner_options(Stacking(), "hoag", {"eps0": 1e-5}, "iterative") == {**own, "eps0": 1e-5}
    assert _tuner_options(Stacking(), "implicit-cg", None, "iterative") is None
    assert _tuner_options(LAF(), "hoag", {"max_iter": 50}, "iterative") == {"max_iter": 50}
    # Approximate cross-validation (one full-data solve) keeps the engine's schedule.
    assert _tuner_options(Stacking(), "hoag", None, "newton-step") is None


def test_stacking_fit_tunes_with_its_looser_tolerance(frozen_pool, cancer_pool, monkeypatch):
    seen = []
    tune = fit_module.tune

    def spy(*args, **kwargs):
        seen.append(kwargs["method_options"])
        return tune(*args, **kwargs)

    monkeypatch.setattr(fit_module, "tune", spy)
    d = cancer_pool

    def fit(**params):
        est = AggregatedClassifier(frozen_pool, aggregator="stacking", random_state=0, **params)
        return est.fit(d.X_agg, d.y_agg)

    loose = fit()
    assert seen[-1] == {"eps0": 1e-4, "decay": 1.01, "min_tol": 1e-3}
    engine = {"eps0": 1e-4, "decay": 2.0, "min_tol": 1e-10}
    tight = fit(tuner_options=engine)
    assert seen[-1] == engine
    # The looser later solves and linear solves take fewer iterations to much
    # the same validation loss.
    assert loose.tuning_history_["inner_iter"].sum() < tight.tuning_history_["inner_iter"].sum()
    assert loose.validation_loss_ == pytest.approx(tight.validation_loss_, rel=0.02)
    # An untuned fit (one evaluation) solves to the engine's first tolerance.
    untuned = fit(hyperparams="fixed").validation_loss_
    assert untuned == fit(hyperparams="fixed", tuner_options=engine).validation_loss_
