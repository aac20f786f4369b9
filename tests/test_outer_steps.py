"""Few outer evaluations (issue 20, item 2).

L-BFGS-B's first step on a boxed problem is the negative gradient itself, so
its length was the loss's units: a standardised regression loss with a
hypergradient of a few thousandths moved the log-L2 weights by as much, and
the tuning spent its evaluations learning a curvature one longer step shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_friedman1
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsRegressor
from sklearn.tree import DecisionTreeRegressor

from aggregators import AggregatedRegressor, Stacking
from aggregators.hypergrad._tuner import FIRST_STEP, SHARED_BUDGET, _run_lbfgs


@pytest.mark.parametrize("size", [1e-6, 1e-2, 1e3])
def test_first_step_is_one_unit_whatever_the_loss_units(size):
    centre = np.array([2.0, -1.5, 0.5])
    weights = np.array([1.0, 3.0, 0.5])
    trail = []

    def evaluate(h):
        d = h.numpy() - centre
        trail.append(h.numpy().copy())
        value = size * float(np.sum(weights * d**2))
        return torch.tensor(value), torch.as_tensor(2 * size * weights * d)

    h0 = torch.zeros(3, dtype=torch.float64)
    box = torch.full((3,), 10.0, dtype=torch.float64)
    state: dict = {}
    _run_lbfgs(evaluate, h0, -box, box, 30, 1e-8, state)
    first = np.max(np.abs(trail[1] - trail[0]))
    assert first == pytest.approx(FIRST_STEP, rel=1e-6)
    assert np.max(np.abs(trail[-1] - centre)) < 1e-3
    assert len(trail) <= 12  # the same count at every size of the loss


def _pool_and_rows(seed):
    X, y = make_friedman1(n_samples=700, noise=1.0, random_state=seed)
    Xp, Xa, yp, ya = train_test_split(X, y, test_size=0.5, random_state=seed)
    pool = [
        ("ridge", Ridge().fit(Xp, yp)),
        ("knn", KNeighborsRegressor(10).fit(Xp, yp)),
        ("tree", DecisionTreeRegressor(max_depth=4, random_state=0).fit(Xp, yp)),
    ]
    return pool, Xa, ya


def _fit(pool, X, y, **kw):
    return AggregatedRegressor(
        pool, aggregator=Stacking(per_model_l2=False), prefit=True, random_state=0, **kw
    ).fit(X, y)


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_l2_reaches_the_grid_minimum_in_few_evaluations(seed):
    pool, X, y = _pool_and_rows(seed)
    est = _fit(pool, X, y)
    grid = [
        _fit(pool, X, y, hyperparams={"l2": v}).validation_loss_
        for v in np.logspace(-4, 2, 60)
    ]
    assert len(est.tuning_history_) <= 8
    assert est.validation_loss_ <= 1.001 * min(grid)


def test_shared_stage_finds_the_common_level_then_the_spread():
    # A loss whose common level (the mean of h) is far from the start and
    # whose per-entry spread matters less: the shape of per-model L2 weights.
    centre = np.array([-4.0, -3.0, -5.0, -4.5, -3.5])
    trail = []

    def evaluate(h):
        x = h.numpy()
        trail.append(x.copy())
        d = x - centre
        value = 2.0 * d.mean() ** 2 + 0.1 * np.sum((d - d.mean()) ** 2)
        grad = 4.0 * d.mean() / d.size + 0.2 * (d - d.mean())
        return torch.tensor(value), torch.as_tensor(grad)

    h0 = torch.zeros(5, dtype=torch.float64)
    box = torch.full((5,), 10.0, dtype=torch.float64)
    state: dict = {}
    _run_lbfgs(evaluate, h0, -box, box, 30, 1e-4, state, shared_stage=True)
    assert len(trail) <= SHARED_BUDGET
    # The first moves keep every entry together.
    assert np.ptp(trail[1]) == pytest.approx(0.0, abs=1e-12)
    best = min(trail, key=lambda x: np.sum((x - centre) ** 2))
    assert abs(np.mean(best - centre)) < 0.05
    assert np.max(np.abs(best - centre)) < 0.5


def _per_model(pool, X, y, **kw):
    return AggregatedRegressor(
        pool, aggregator=Stacking(), prefit=True, random_state=0, **kw
    ).fit(X, y)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_model_l2_reaches_the_grid_minimum_in_few_evaluations(seed):
    pool, X, y = _pool_and_rows(seed)
    pool = pool[:2]
    est = _per_model(pool, X, y)
    values = np.logspace(-3, 2, 11)
    grid = [
        _per_model(pool, X, y, hyperparams={"l2": [a, b]}).validation_loss_
        for a in values for b in values
    ]
    assert len(est.tuning_history_) <= SHARED_BUDGET
    assert est.validation_loss_ <= 1.001 * min(grid)


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_stage_reaches_the_full_runs_loss(seed, monkeypatch):
    # Within 0.5 % of what L-BFGS-B alone reaches with up to 60 evaluations.
    pool, X, y = _pool_and_rows(seed)
    est = _per_model(pool, X, y)
    monkeypatch.setattr(Stacking, "shared_stage", False)
    full = _per_model(pool, X, y)
    assert len(est.tuning_history_) <= SHARED_BUDGET
    assert est.validation_loss_ <= 1.005 * full.validation_loss_


def test_shared_stage_is_skipped_where_the_entries_pull_apart():
    centre = np.array([3.0, -3.0, 2.0, -2.0])
    trail = []

    def evaluate(h):
        x = h.numpy()
        trail.append(x.copy())
        d = x - centre
        return torch.tensor(float(np.sum(d**2))), torch.as_tensor(2 * d)

    h0 = torch.zeros(4, dtype=torch.float64)
    box = torch.full((4,), 10.0, dtype=torch.float64)
    _run_lbfgs(evaluate, h0, -box, box, 30, 1e-8, {}, shared_stage=True)
    assert np.ptp(trail[1]) > 1.0  # L-BFGS-B's per-entry step, not a common shift
    assert len(trail) <= SHARED_BUDGET
    assert np.max(np.abs(trail[-1] - centre)) < 1e-2
