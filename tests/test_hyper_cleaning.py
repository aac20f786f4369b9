"""Data hyper-cleaning: per-row weights of the aggregator's training loss as
hyperparameters (Franceschi et al. 2017; ``../shared/FORMULAS.md``).

Checked here, on small generated data:

* :func:`project_capped_simplex` is the exact Euclidean projection onto
  ``{0 <= p <= cap, sum p <= R}``: against an independent breakpoint
  enumeration and against SLSQP, feasible, idempotent, and satisfying the
  variational inequality that characterises a projection;
* ``tune(project=...)`` keeps every iterate in the set; ``make_problem``'s
  ``row_weights`` hook gives the unweighted problem at weights one;
* on a stacking problem over generated base-model outputs with half the labels
  flipped, tuned weights of corrupted rows fall below those of clean rows and
  the model at the tuned weights beats the one trained on all rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from aggregators import Stacking
from aggregators._base import AggregationContext
from aggregators._bilevel import HyperSpace, Split, data_loss, make_problem
from aggregators.hypergrad import project_capped_simplex, solve_inner, tune

DT = torch.float64


def _projection_by_breakpoints(v: np.ndarray, radius: float, cap: float) -> np.ndarray:
    """Exact projection, found independently: f(tau) = sum clip(v - tau, 0, cap)
    is piecewise linear with kinks at v_i and v_i - cap; locate the piece on
    which f crosses ``radius`` and interpolate linearly on it."""
    box = np.clip(v, 0, cap)
    if box.sum() <= radius:
        return box
    f = lambda t: np.clip(v - t, 0, cap).sum()  # noqa: E731
    kinks = np.unique(np.concatenate([v, v - cap, [0.0]]))
    kinks = kinks[kinks >= 0]
    vals = np.array([f(t) for t in kinks])
    # f is non-increasing; first kink where it is at or below the radius.
    j = int(np.argmax(vals <= radius))
    t0, t1, f0, f1 = kinks[j - 1], kinks[j], vals[j - 1], vals[j]
    tau = t1 if f0 == f1 else t0 + (f0 - radius) * (t1 - t0) / (f0 - f1)
    return np.clip(v - tau, 0, cap)


vectors = st.lists(
    st.floats(-3, 4, allow_nan=False, allow_subnormal=False), min_size=1, max_size=40
)


@settings(max_examples=150, deadline=None)
@given(vectors, st.floats(0, 1.2), st.sampled_from([1.0, 0.3, 2.5]))
def test_projection_matches_breakpoint_enumeration(values, frac, cap):
    v = np.array(values)
    radius = frac * len(v) * cap
    p = project_capped_simplex(torch.as_tensor(v, dtype=DT), radius, cap=cap).numpy()
    np.testing.assert_allclose(p, _projection_by_breakpoints(v, radius, cap), atol=1e-12)
    # Feasible, and a projection is idempotent.
    assert p.min() >= 0 and p.max() <= cap and p.sum() <= radius + 1e-10
    again = project_capped_simplex(torch.as_tensor(p, dtype=DT), radius, cap=cap).numpy()
    np.testing.assert_allclose(again, p, atol=1e-13)


@settings(max_examples=60, deadline=None)
@given(vectors, st.floats(0, 1.2), st.integers(0, 2**31 - 1))
def test_projection_variational_inequality(values, frac, seed):
    """<v - p, z - p> <= 0 for every feasible z characterises p = proj(v)."""
    v = np.array(values)
    radius = frac * len(v)
    p = project_capped_simplex(torch.as_tensor(v, dtype=DT), radius).numpy()
    z = np.random.RandomState(seed).uniform(0, 1, (50, len(v)))
    z *= np.minimum(1.0, radius / np.maximum(z.sum(1, keepdims=True), 1e-300))
    assert np.all((z - p) @ (v - p) <= 1e-10)


def test_projection_matches_slsqp():
    rng = np.random.RandomState(0)
    for _ in range(5):
        v = rng.normal(0.5, 1.0, 8)
        radius = 2.5
        cons = [{"type": "ineq", "fun": lambda x: radius - x.sum(), "jac": lambda x: -np.ones_like(x)}]
        ref = minimize(
            lambda x: (0.5 * ((x - v) ** 2).sum(), x - v), np.zeros(8), jac=True,
            bounds=[(0, 1)] * 8, constraints=cons, method="SLSQP",
            options={"ftol": 1e-14, "maxiter": 500},
        )
        p = project_capped_simplex(torch.as_tensor(v), radius).numpy()
        np.testing.assert_allclose(p, ref.x, atol=1e-7)


def test_projection_hand_computed_and_batched():
    v = torch.tensor([[0.9, 0.5, -1.0, 3.0], [0.2, 0.2, 0.2, 0.2]], dtype=DT)
    p = project_capped_simplex(v, 1.5)
    # Row 1: the 3.0 stays capped at 1, the shift tau = 0.45 solves
    # (0.9 - tau) + (0.5 - tau) + 1 = 1.5. Row 2: the box alone is feasible.
    expected = torch.tensor([[0.45, 0.05, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2]], dtype=DT)
    torch.testing.assert_close(p, expected, atol=1e-15, rtol=0)
    # float32 is projected in float32, just as exactly.
    p32 = project_capped_simplex(v.float(), 1.5)
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32, expected.float(), atol=1e-6, rtol=0)
    # Radius zero: everything goes to zero; an empty vector stays empty.
    assert project_capped_simplex(v, 0.0).abs().max() == 0
    assert project_capped_simplex(torch.zeros(0, dtype=DT), 1.0).numel() == 0


@pytest.mark.parametrize(
    "v, kwargs, err, match",
    [
        (torch.tensor([1, 2]), {"radius": 1.0}, TypeError, "floating-point"),
        ([0.5, 0.2], {"radius": 1.0}, TypeError, "floating-point"),
        (torch.tensor([0.5]), {"radius": -1.0}, ValueError, "radius"),
        (torch.tensor([0.5]), {"radius": float("inf")}, ValueError, "radius"),
        (torch.tensor([0.5]), {"radius": 1.0, "cap": 0.0}, ValueError, "cap"),
        (torch.tensor([0.5, float("nan")]), {"radius": 1.0}, ValueError, "non-finite"),
        (torch.tensor(0.5), {"radius": 1.0}, ValueError, "dimension"),
    ],
)
def test_projection_bad_input(v, kwargs, err, match):
    with pytest.raises(err, match=match):
        project_capped_simplex(v, **kwargs)


# -- the bilevel problem with one weight per row ---------------------------------------


def _noisy_stacking_problem(seed=0, n_train=120, n_val=60, n_test=400):
    """Three generated "base models" (noisy probability vectors around the true
    class) over 3 classes; half the aggregation-training labels flipped."""
    rng = np.random.RandomState(seed)
    n = n_train + n_val + n_test
    y = rng.randint(0, 3, n)
    logits = np.stack(
        [3 * np.eye(3)[y] + rng.normal(0, s, (n, 3)) for s in (1.0, 1.5, 2.0)], axis=1
    )
    Z = np.exp(logits)
    Z /= Z.sum(-1, keepdims=True)
    bad = np.zeros(n_train, dtype=bool)
    bad[rng.choice(n_train, n_train // 2, replace=False)] = True
    y_noisy = y.copy()
    y_noisy[:n_train][bad] = (y[:n_train][bad] + rng.randint(1, 3, bad.sum())) % 3

    def part(lo, hi, labels):
        return Split(torch.as_tensor(Z[lo:hi], dtype=DT), torch.as_tensor(labels[lo:hi]))

    train = part(0, n_train, y_noisy)
    val = part(n_train, n_train + n_val, y)
    test = part(n_train + n_val, n, y)
    agg = Stacking()
    ctx = AggregationContext(
        task="classification", n_models=3, n_outputs=3, n_features=1,
        model_names=["a", "b", "c"], classes=np.arange(3),
    )
    specs = agg.hyperparameters(ctx)
    space = HyperSpace(specs, {s.name: s.initial() for s in specs}, torch.device("cpu"), DT)
    return agg, ctx, space, train, val, test, bad


def test_row_weights_of_one_give_the_unweighted_problem():
    agg, ctx, space, train, val, _, _ = _noisy_stacking_problem()
    plain, _, _ = make_problem(agg, ctx, train, val, space)
    weighted, _, _ = make_problem(agg, ctx, train, val, space, row_weights=lambda u: u)
    ones = torch.ones(len(train.y), dtype=DT)
    theta = plain.theta0 + 0.1
    torch.testing.assert_close(weighted.inner_loss(theta, ones), plain.inner_loss(theta, torch.zeros(0, dtype=DT)))
    # Weight zero on a row is the same as dropping it (up to the 1/n scale).
    w = ones.clone()
    w[:10] = 0
    out = torch.randn(len(w), 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    dropped = data_loss("classification", out[10:], train.y[10:]) * (len(w) - 10) / len(w)
    torch.testing.assert_close(data_loss("classification", out, train.y, w), dropped)
    # Regression: per-row mean over targets, weighted.
    yr = torch.zeros(len(w), 2, dtype=DT)
    torch.testing.assert_close(
        data_loss("regression", out[:, :2], yr, w),
        (w[:, None] * out[:, :2] ** 2).mean(1).mean(),
    )


def test_tune_project_keeps_iterates_feasible_and_needs_adam():
    agg, ctx, space, train, val, _, _ = _noisy_stacking_problem()
    prob, _, _ = make_problem(agg, ctx, train, val, space, row_weights=lambda u: u)
    n = len(train.y)
    ones = torch.ones(n, dtype=DT)
    radius = 0.4 * n
    res = tune(
        [prob], ones, lower=0 * ones, upper=ones, optimizer="adam", outer_lr=0.2,
        max_outer_iter=5, tol=0.0, project=lambda u: project_capped_simplex(u, radius),
    )
    for entry in res.history:
        assert entry["h"].min() >= 0 and entry["h"].max() <= 1
        assert entry["h"].sum() <= radius + 1e-9
    with pytest.raises(ValueError, match="project needs optimizer='adam'"):
        tune([prob], ones, lower=0 * ones, upper=ones, project=lambda u: u)


def test_hyper_cleaning_downweights_flipped_rows_and_beats_training_on_all():
    agg, ctx, space, train, val, test, bad = _noisy_stacking_problem()
    prob, packer, buffers = make_problem(agg, ctx, train, val, space, row_weights=lambda u: u)
    n = len(train.y)
    ones = torch.ones(n, dtype=DT)
    res = tune(
        [prob], ones, lower=0 * ones, upper=ones, optimizer="adam", outer_lr=0.1,
        max_outer_iter=40, tol=0.0, project=lambda u: project_capped_simplex(u, n / 2),
    )
    lam = res.h.numpy()
    assert lam[bad].mean() < 0.1 and lam[~bad].mean() > 0.9
    assert lam[bad].max() < lam[~bad].mean()
    flagged = lam < 1e-3
    precision = (flagged & bad).sum() / flagged.sum()
    recall = (flagged & bad).sum() / bad.sum()
    assert 2 * precision * recall / (precision + recall) > 0.9
    assert res.history[-1]["outer_loss"] < 0.5 * res.history[0]["outer_loss"]

    def test_scores(theta):
        no_hyper = space.values(torch.zeros(0, dtype=DT))
        out = agg.forward({**packer.unflatten(theta), **buffers}, no_hyper, test.Z)
        acc = float((out.argmax(1) == test.y).double().mean())
        return acc, float(data_loss("classification", out, test.y))

    baseline, _, _ = solve_inner(prob, ones, tol=1e-8)
    acc_all, loss_all = test_scores(baseline)
    acc_clean, loss_clean = test_scores(res.thetas[0])
    assert acc_clean > acc_all + 0.05
    assert loss_clean < 0.5 * loss_all
