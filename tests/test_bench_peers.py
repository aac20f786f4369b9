"""The benchmarks' peer baselines (``benchmarks/_peers.py``) do what their tables claim."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _peers import (  # noqa: E402
    best_single,
    best_single_sq,
    caruana_selection,
    caruana_selection_sq,
    convex_weights_sq,
    rmse,
    softmax_weights_lbfgs,
)


def _regression_pool(seed=0, n=2000):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(n)
    noise = np.array([0.2, 1.0, 1.5])
    P = y[None] + noise[:, None] * rng.standard_normal((3, n))
    return P, y


def test_regression_peers_find_the_best_model_and_blend_below_it():
    P, y = _regression_pool()
    assert np.argmax(best_single_sq(P, y)) == 0
    for rule in (caruana_selection_sq, convex_weights_sq):
        w = rule(P, y)
        assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
        assert np.argmax(w) == 0
        assert rmse(w @ P, y) <= rmse(P[0], y) + 1e-12


def test_convex_weights_sq_reaches_the_inverse_variance_blend():
    # Independent unbiased errors: the best convex blend weighs by 1 / variance.
    P, y = _regression_pool(n=200_000)
    w = convex_weights_sq(P, y)
    inv = 1 / np.array([0.2, 1.0, 1.5]) ** 2
    np.testing.assert_allclose(w, inv / inv.sum(), atol=0.01)


def test_regression_peers_take_several_targets():
    P, y = _regression_pool()
    P2, y2 = np.stack([P, -P], axis=-1), np.stack([y, -y], axis=-1)
    assert np.argmax(best_single_sq(P2, y2)) == 0
    np.testing.assert_allclose(caruana_selection_sq(P2, y2), caruana_selection_sq(P, y))


def test_classification_peers_prefer_the_informative_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    good = np.full((500, 3), 0.1)
    good[np.arange(500), y] = 0.8
    P = np.stack([np.full((500, 3), 1 / 3), good])
    assert np.argmax(best_single(P, y)) == 1
    assert np.argmax(caruana_selection(P, y)) == 1
    assert softmax_weights_lbfgs(P, y)[1] > 0.99
