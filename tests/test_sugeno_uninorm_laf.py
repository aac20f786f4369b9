"""Sugeno integral and uninorms: laws, brute force, parametrisations, end to end.

(LAF has its own file, ``tests/test_laf.py``.)

End-to-end tests use the 40 / 30 / 30 protocol of ``conftest.py``: a pool
pretrained on 40 % of the rows, the aggregator fitted on 30 %, judged on the
last 30 %, against the uniform average of the same pool.
"""

from __future__ import annotations

import math
import pickle
import warnings
from functools import reduce
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.datasets import load_diabetes, load_wine
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from aggregators import AggregatedClassifier, AggregatedRegressor, AggregationContext
from aggregators._capacity import full_capacity, symmetric_levels
from aggregators.sugeno import (
    Sugeno,
    soft_sugeno_integral,
    sugeno_integral,
    symmetric_capacity,
)
from aggregators.uninorm import Uninorm, uninorm, weighted_uninorm

settings.register_profile("sugeno_uninorm", deadline=None, max_examples=60)


# ======================================================================================
# Helpers and strategies
# ======================================================================================
def _random_capacity(m: int, seed: int, zeros: float = 0.0) -> np.ndarray:
    """A random normalised monotone capacity (binary order), some steps possibly flat."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(2**m)
    for mask in sorted(range(1, 2**m), key=lambda v: bin(v).count("1")):
        preds = [mu[mask ^ (1 << i)] for i in range(m) if mask >> i & 1]
        step = 0.0 if rng.random() < zeros else rng.exponential()
        mu[mask] = max(preds) + step
    return mu / mu[-1] if mu[-1] > 0 else np.where(np.arange(2**m) == 2**m - 1, 1.0, 0.0)


def _is_capacity(mu: np.ndarray, atol=1e-12) -> bool:
    m = int(round(math.log2(len(mu))))
    if abs(mu[0]) > atol or abs(mu[-1] - 1) > atol:
        return False
    return all(
        mu[mask] >= mu[mask ^ (1 << i)] - atol
        for mask in range(2**m)
        for i in range(m)
        if mask >> i & 1
    )


def _sugeno_brute_force(x: np.ndarray, mu: np.ndarray) -> float:
    """``max over nonempty A of min(min_{i in A} x_i, mu(A))`` — no sorting."""
    m = len(x)
    best = -np.inf
    for k in range(1, m + 1):
        for A in combinations(range(m), k):
            mask = sum(1 << i for i in A)
            best = max(best, min(min(x[i] for i in A), mu[mask]))
    return best


unit = st.floats(0.0, 1.0, allow_nan=False)
inner_unit = st.floats(1e-3, 1 - 1e-3)  # away from the corners, where U jumps
neutral = st.floats(0.05, 0.95)


@st.composite
def inputs_and_capacity(draw, max_m=6):
    m = draw(st.integers(1, max_m))
    x = draw(arrays(np.float64, (m,), elements=unit))
    mu = _random_capacity(m, draw(st.integers(0, 2**31)), zeros=draw(st.sampled_from([0, 0.5])))
    return x, mu


# ======================================================================================
# Sugeno: the pure function
# ======================================================================================
def test_sugeno_hand_computed():
    mu = np.array([0.0, 0.3, 0.6, 1.0])  # {}, {0}, {1}, {0,1}
    # x = (0.9, 0.2): sorted 0.2 (model 1), 0.9 (model 0): max(min(.2, 1), min(.9, .3))
    assert sugeno_integral([0.9, 0.2], mu) == pytest.approx(0.3)
    assert sugeno_integral([0.1, 0.2], mu) == pytest.approx(0.2)
    assert sugeno_integral([0.5, 0.8], mu) == pytest.approx(0.6)
    # Vectorised over leading axes.
    np.testing.assert_allclose(
        sugeno_integral(np.array([[0.9, 0.2], [0.5, 0.8]]), mu), [0.3, 0.6]
    )
    with pytest.raises(ValueError, match="2\\*\\*2"):
        sugeno_integral([0.1, 0.2], [0.0, 1.0])


@settings(settings.get_profile("sugeno_uninorm"))
@given(inputs_and_capacity())
def test_sugeno_matches_brute_force_and_lies_between_min_and_max(data):
    x, mu = data
    s = float(sugeno_integral(x, mu))
    assert s == pytest.approx(_sugeno_brute_force(x, mu), abs=1e-15)
    assert x.min() - 1e-15 <= s <= x.max() + 1e-15
    # The torch version (exact) agrees.
    assert float(soft_sugeno_integral(torch.as_tensor(x), torch.as_tensor(mu))) == s


@settings(settings.get_profile("sugeno_uninorm"))
@given(inputs_and_capacity(), st.integers(0, 5), st.floats(0.0, 1.0))
def test_sugeno_monotone_and_idempotent(data, i, up):
    x, mu = data
    i = i % len(x)
    y = x.copy()
    y[i] = max(x[i], up)
    assert sugeno_integral(y, mu) >= sugeno_integral(x, mu)
    c = float(x[0])
    assert sugeno_integral(np.full(len(x), c), mu) == pytest.approx(c, abs=1e-15)


@settings(settings.get_profile("sugeno_uninorm"))
@given(st.integers(1, 6).flatmap(lambda m: arrays(np.float64, (m,), elements=unit)))
def test_sugeno_extreme_capacities_are_min_and_max(x):
    m = len(x)
    mu_min = np.zeros(2**m)
    mu_min[-1] = 1.0  # only the full set counts
    mu_max = np.ones(2**m)
    mu_max[0] = 0.0  # every nonempty set counts fully
    assert sugeno_integral(x, mu_min) == x.min()
    assert sugeno_integral(x, mu_max) == x.max()


@settings(settings.get_profile("sugeno_uninorm"))
@given(
    st.integers(1, 6).flatmap(
        lambda m: st.tuples(
            arrays(np.float64, (m,), elements=unit),
            arrays(np.float64, (m,), elements=st.floats(0.01, 1.0)),
        )
    )
)
def test_symmetric_capacity_is_an_ordered_weighted_maximum(data):
    x, steps = data
    m = len(x)
    q = np.concatenate([[0.0], np.cumsum(steps) / steps.sum()])
    mu = symmetric_capacity(q)
    assert _is_capacity(mu)
    owmax = max(min(xk, q[k + 1]) for k, xk in enumerate(np.sort(x)[::-1]))
    assert sugeno_integral(x, mu) == pytest.approx(owmax, abs=1e-15)
    # The torch function takes the levels directly.
    got = soft_sugeno_integral(torch.as_tensor(x), torch.as_tensor(q))
    assert float(got) == pytest.approx(owmax, abs=1e-15)
    assert m >= 1


@settings(settings.get_profile("sugeno_uninorm"))
@given(inputs_and_capacity(), st.sampled_from([0.3, 0.1, 1e-2, 1e-3, 1e-5]))
def test_soft_sugeno_approaches_exact_as_softness_vanishes(data, t):
    x, mu = data
    m = len(x)
    exact = float(sugeno_integral(x, mu))
    soft = float(soft_sugeno_integral(torch.as_tensor(x), torch.as_tensor(mu), t))
    # Each soft min is within [min, min + t log 2], the soft max within [max - t log m, max].
    assert exact - t * math.log(m) - 1e-12 <= soft <= exact + t * math.log(2) + 1e-12


def test_soft_sugeno_converges_and_is_differentiable():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.uniform(size=(200, 5)))
    mu = torch.as_tensor(_random_capacity(5, 1))
    exact = soft_sugeno_integral(x, mu)
    errs = [float((soft_sugeno_integral(x, mu, t) - exact).abs().max()) for t in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3
    # Gradients reach every input and capacity entry used by a row, and are finite
    # (also the second derivatives the implicit hypergradient needs).
    mu_r = mu.clone().requires_grad_(True)
    out = soft_sugeno_integral(x, mu_r, 1e-3).sum()
    (g,) = torch.autograd.grad(out, mu_r, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), mu_r)
    assert torch.isfinite(g).all() and torch.isfinite(h).all() and g.abs().sum() > 0


# ======================================================================================
# Sugeno: the parametrisation and the aggregator
# ======================================================================================
@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("spread", [0.1, 3.0, 20.0])
def test_full_capacity_parametrisation_is_monotone_and_normalised(m, spread):
    gen = torch.Generator().manual_seed(m)
    raw = spread * torch.randn(3, 2**m - 1, generator=gen, dtype=torch.float64)
    mu = full_capacity(raw, m).numpy()
    assert mu.shape == (3, 2**m)
    for row in mu:
        assert _is_capacity(row, atol=1e-12)
    levels = symmetric_levels(raw[:, :m]).numpy()
    assert np.all(np.diff(levels, axis=1) >= 0)
    np.testing.assert_allclose(levels[:, [0, -1]], [[0.0, 1.0]] * 3)


def test_full_capacity_start_is_near_cardinality_over_m():
    agg = Sugeno()
    ctx = AggregationContext("classification", 4, 2, 3, list("abcd"))
    mu = full_capacity(agg.init_params(ctx, None, None)["capacity_raw"], 4)[0].numpy()
    size = np.array([bin(v).count("1") for v in range(16)])
    np.testing.assert_allclose(mu, size / 4, atol=0.05)
    sym = Sugeno(capacity_type="symmetric").init_params(ctx, None, None)["levels_raw"]
    np.testing.assert_allclose(symmetric_levels(sym)[0].numpy(), np.arange(5) / 4)


def test_forward_is_exact_without_autograd_and_soft_with_it():
    agg = Sugeno(share="per_class")
    ctx = AggregationContext("classification", 3, 3, 2, list("abc"))
    agg.bind(ctx)
    params = agg.init_params(ctx, None, None)
    params["capacity_raw"] = params["capacity_raw"] + torch.randn(
        params["capacity_raw"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    hyper = {k: torch.tensor([v], dtype=torch.float64) for k, v in
             dict(temperature=0.2, softness=0.05, l2=1e-3).items()}
    Z = torch.softmax(torch.randn(20, 3, 3, generator=torch.Generator().manual_seed(1),
                                  dtype=torch.float64), -1)
    mu = full_capacity(params["capacity_raw"], 3).numpy()  # (3 classes, 8)
    exact = np.stack([sugeno_integral(Z[:, :, c].numpy(), mu[c]) for c in range(3)], 1)
    with torch.no_grad():
        out = agg.forward(params, hyper, Z)
    beta = 0.5 + 0.2 * 0.2 * params["threshold"].numpy()
    expected = torch.nn.functional.logsigmoid(torch.as_tensor((exact - beta) / 0.2)).numpy()
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)
    soft = agg.forward(params, hyper, Z)  # autograd on: the relaxation
    assert not np.allclose(soft.detach().numpy(), out.numpy())
    agg.exact = False
    with torch.no_grad():
        np.testing.assert_allclose(agg.forward(params, hyper, Z).numpy(), soft.detach().numpy())


def test_full_capacity_over_many_models_warns_and_uses_symmetric():
    ctx = AggregationContext("classification", 13, 2, 3, [f"m{i}" for i in range(13)])
    agg = Sugeno()
    with pytest.warns(UserWarning, match="symmetric"):
        agg.check_task(ctx)
    params = agg.init_params(ctx, None, None)
    assert set(params) == {"levels_raw", "threshold"} and params["levels_raw"].shape == (1, 13)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(capacity_type="k-additive"), "capacity_type must be"),
        (dict(share="each"), "share must be"),
        (dict(softness_bounds=(0.1, 0.01)), "softness_bounds"),
    ],
)
def test_sugeno_invalid_parameters(params, match):
    ctx = AggregationContext("classification", 3, 2, 3, list("abc"))
    with pytest.raises(ValueError, match=match):
        Sugeno(**params).check_task(ctx)


# ======================================================================================
# Uninorm: the pure functions
# ======================================================================================
def test_uninorm_hand_computed_and_corners():
    assert uninorm(0.8, 0.8) == pytest.approx(0.64 / (0.64 + 0.04))  # cross-ratio, e = 1/2
    assert uninorm(0.3, 0.5) == pytest.approx(0.3)
    # e = 0.2: logit U = logit .5 + logit .5 - logit .2 = log 4.
    assert uninorm(0.5, 0.5, e=0.2) == pytest.approx(0.8)
    assert uninorm(0.0, 1.0) == 0.0 and uninorm(1.0, 0.0) == 0.0  # conjunctive convention
    assert uninorm(0.0, 0.7) == 0.0 and uninorm(1.0, 0.7) == 1.0
    with pytest.raises(ValueError, match="neutral element"):
        uninorm(0.3, 0.4, e=1.0)


@settings(settings.get_profile("sugeno_uninorm"))
@given(unit, unit, neutral)
def test_uninorm_commutative_neutral_and_bounded(x, y, e):
    u = float(uninorm(x, y, e))
    assert 0.0 <= u <= 1.0
    assert u == float(uninorm(y, x, e))
    assert float(uninorm(x, e, e)) == pytest.approx(x, abs=1e-12)
    if x <= e and y <= e:
        assert u <= min(x, y) + 1e-12  # conjunctive on [0, e]^2
    elif x >= e and y >= e:
        assert u >= max(x, y) - 1e-12  # disjunctive on [e, 1]^2
    elif (x, y) not in ((0.0, 1.0), (1.0, 0.0)):
        assert min(x, y) - 1e-12 <= u <= max(x, y) + 1e-12  # mixed: between


@settings(settings.get_profile("sugeno_uninorm"))
@given(inner_unit, inner_unit, inner_unit, neutral)
def test_uninorm_associative(x, y, z, e):
    left = uninorm(uninorm(x, y, e), z, e)
    right = uninorm(x, uninorm(y, z, e), e)
    assert float(left) == pytest.approx(float(right), abs=1e-9)


@settings(settings.get_profile("sugeno_uninorm"))
@given(st.sampled_from([0.0, 1.0, 0.5, 0.3]), st.sampled_from([0.0, 1.0, 0.3, 0.7]),
       st.sampled_from([0.0, 1.0, 0.9]))
def test_uninorm_associative_at_the_boundary(x, y, z):
    e = 0.3
    assert uninorm(uninorm(x, y, e), z, e) == pytest.approx(uninorm(x, uninorm(y, z, e), e))


@settings(settings.get_profile("sugeno_uninorm"))
@given(unit, unit, unit, neutral)
def test_uninorm_monotone(x, y, up, e):
    assert uninorm(max(x, up), y, e) >= uninorm(x, y, e) - 1e-12


@settings(settings.get_profile("sugeno_uninorm"))
@given(st.integers(1, 6).flatmap(lambda m: arrays(np.float64, (m,), elements=inner_unit)), neutral)
def test_weighted_uninorm_with_unit_weights_is_the_folded_uninorm(x, e):
    folded = reduce(lambda a, b: uninorm(a, b, e), x)
    assert float(weighted_uninorm(x, e)) == pytest.approx(float(folded), abs=1e-9)
    # Order does not matter, and an extra input at e changes nothing.
    perm = np.random.default_rng(len(x)).permutation(len(x))
    assert float(weighted_uninorm(x[perm], e)) == pytest.approx(float(folded), abs=1e-9)
    assert float(weighted_uninorm(np.append(x, e), e)) == pytest.approx(float(folded), abs=1e-9)


@settings(settings.get_profile("sugeno_uninorm"))
@given(
    st.integers(1, 6).flatmap(
        lambda m: st.tuples(
            arrays(np.float64, (m,), elements=inner_unit),
            arrays(np.float64, (m,), elements=st.floats(0.0, 5.0)),
        )
    ),
    neutral,
    st.integers(0, 5),
    unit,
)
def test_weighted_uninorm_laws(data, e, i, up):
    x, w = data
    u = float(weighted_uninorm(x, e, w))
    # Monotone in every input, for any nonnegative weights.
    i = i % len(x)
    y = x.copy()
    y[i] = min(max(x[i], up), 1 - 1e-3)
    assert float(weighted_uninorm(y, e, w)) >= u - 1e-12
    # Permuting inputs with their weights changes nothing; an input at e is neutral.
    perm = np.random.default_rng(len(x)).permutation(len(x))
    assert float(weighted_uninorm(x[perm], e, w[perm])) == pytest.approx(u, abs=1e-12)
    assert float(weighted_uninorm(np.append(x, e), e, np.append(w, 3.0))) == pytest.approx(
        u, abs=1e-12
    )
    # Weights >= 1: conjunctive below e, disjunctive above.
    w1 = 1.0 + w
    if np.all(x <= e):
        assert float(weighted_uninorm(x, e, w1)) <= x.min() + 1e-12
    if np.all(x >= e):
        assert float(weighted_uninorm(x, e, w1)) >= x.max() - 1e-12
    # Weights summing to 1: averaging (between min and max).
    if w.sum() > 0:
        a = float(weighted_uninorm(x, e, w / w.sum()))
        assert x.min() - 1e-12 <= a <= x.max() + 1e-12


def test_weighted_uninorm_conventions_and_errors():
    assert weighted_uninorm([0.0, 1.0, 0.6]) == 0.0
    assert weighted_uninorm([1.0, 0.6]) == 1.0
    assert weighted_uninorm([0.0, 0.6], weights=[0.0, 1.0]) == pytest.approx(0.6)
    np.testing.assert_allclose(
        weighted_uninorm(np.array([[0.8, 0.3], [0.8, 0.8]]), axis=0),
        [uninorm(0.8, 0.8), uninorm(0.3, 0.8)],
    )
    with pytest.raises(ValueError, match="nonnegative"):
        weighted_uninorm([0.2, 0.3], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="one per input"):
        weighted_uninorm([0.2, 0.3], weights=[1.0])


# ======================================================================================
# Uninorm: the aggregator
# ======================================================================================
def test_uninorm_forward_is_the_weighted_uninorm_of_shrunk_inputs():
    agg = Uninorm(min_weight=0.5)
    ctx = AggregationContext("classification", 3, 3, 2, list("abc"))
    agg.bind(ctx)
    Z = torch.softmax(torch.randn(10, 3, 3, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64), -1)
    params = {**agg.init_params(ctx, Z, None), **agg.fit_buffers(ctx, Z, None)}
    params["log_weight"] = torch.tensor([0.3, -1.0, 0.7], dtype=torch.float64)
    params["neutral_logit"] = torch.tensor([0.4], dtype=torch.float64)
    s = 0.05
    hyper = {"shrink": torch.tensor([s], dtype=torch.float64)}
    out = agg.forward(params, hyper, Z).numpy()
    e = 1 / (1 + math.exp(-(math.log(1 / 2) + 0.4)))  # e_0 = 1/3: logit = log(1/2)
    w = 0.5 + np.exp([0.3, -1.0, 0.7])
    ref = weighted_uninorm(s + (1 - 2 * s) * Z.numpy(), e, w, axis=1)  # (n, c)
    np.testing.assert_allclose(np.exp(out), ref, rtol=1e-10)
    # The penalty is zero at the start and grows away from it.
    start = agg.init_params(ctx, Z, None)
    zero = agg.penalty(start, {"l2": torch.ones(1), "neutral": torch.ones(1)})
    assert float(zero) == 0.0
    assert float(agg.penalty(params, {"l2": torch.ones(1), "neutral": torch.ones(1)})) > 0


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(min_weight=-1.0), "min_weight"),
        (dict(neutral_prior=1.5), "neutral_prior"),
        (dict(shrink_bounds=(0.1, 0.6)), "shrink_bounds"),
    ],
)
def test_uninorm_invalid_parameters(params, match):
    ctx = AggregationContext("classification", 3, 2, 3, list("abc"))
    with pytest.raises(ValueError, match=match):
        Uninorm(**params).check_task(ctx)


# ======================================================================================
# End to end
# ======================================================================================
def _uniform(ests, X):
    return np.mean([m.predict_proba(X) for _, m in ests], axis=0)


def _check_classifier(clf, X_test, n_classes):
    p = clf.predict_proba(X_test)
    assert p.shape == (len(X_test), n_classes)
    assert np.all(p >= 0) and np.allclose(p.sum(1), 1, atol=1e-10)
    for name, v in clf.hyperparams_.items():
        assert np.all(np.isfinite(np.asarray(v, dtype=float))), name
    return p


def test_sugeno_classifier_end_to_end(frozen_pool, cancer_pool):
    b = cancer_pool
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no convergence or hypergradient warnings
        clf = AggregatedClassifier(frozen_pool, aggregator="sugeno", random_state=0)
        clf.fit(b.X_agg, b.y_agg)
    p = _check_classifier(clf, b.X_test, 2)
    ll, ll_uni = log_loss(b.y_test, p), log_loss(b.y_test, _uniform(frozen_pool, b.X_test))
    # Measured (seed 0): 0.1143 against 0.1236 for the uniform average.
    assert ll < ll_uni, (ll, ll_uni)
    assert set(clf.hyperparams_) == {"temperature", "softness", "l2"}

    agg = clf.aggregator_
    mu = agg.capacity()
    names = [n for n, _ in frozen_pool]
    assert len(mu) == 2**5 and mu.index[-1] == tuple(names) and _is_capacity(mu.to_numpy())
    assert agg.capacity(names[:2]) == pytest.approx(mu[tuple(names[:2])])
    # Predictions are the exact Sugeno integral through the choquistic map:
    # log-odds are affine in S.
    x = np.stack([m.predict_proba(b.X_test)[:, 1] for _, m in frozen_pool], 1)
    s = sugeno_integral(x, mu.to_numpy())
    T = clf.hyperparams_["temperature"]
    beta = 0.5 + 0.2 * T * agg.params_["threshold"][0]
    np.testing.assert_allclose(np.log(p[:, 1] / p[:, 0]), (s - beta) / T, atol=1e-8)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(again.predict_proba(b.X_test), p)


def _wine_pool():
    X, y = load_wine(return_X_y=True)
    Xp, Xr, yp, yr = train_test_split(X, y, train_size=0.4, stratify=y, random_state=0)
    Xa, Xt, ya, yt = train_test_split(Xr, yr, test_size=0.5, stratify=yr, random_state=0)
    pool = {
        "lr": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "nb": GaussianNB(),
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(15)),
        "tree": DecisionTreeClassifier(max_depth=4, random_state=0),
    }
    return [(n, FrozenEstimator(m.fit(Xp, yp))) for n, m in pool.items()], Xa, ya, Xt, yt


def test_multiclass_on_wine():
    ests, Xa, ya, Xt, yt = _wine_pool()
    ll_uni = log_loss(yt, _uniform(ests, Xt))
    results = {}
    for name, agg in [
        ("sugeno", Sugeno(share="per_class")),
        ("sugeno-symmetric", Sugeno(capacity_type="symmetric")),
        ("uninorm", Uninorm()),
    ]:
        clf = AggregatedClassifier(ests, aggregator=agg, random_state=0).fit(Xa, ya)
        results[name] = log_loss(yt, _check_classifier(clf, Xt, 3))
    # Measured (seed 0): sugeno 0.0263, symmetric 0.0272, uninorm 0.0173; uniform 0.0822.
    assert all(v < ll_uni for v in results.values()), (results, ll_uni)
    assert 0 < clf.aggregator_.neutral_element_ < 1  # the last one fitted: the uninorm


def test_uninorm_classifier_end_to_end(frozen_pool, cancer_pool):
    b = cancer_pool
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf = AggregatedClassifier(frozen_pool, aggregator="uninorm", random_state=0)
        clf.fit(b.X_agg, b.y_agg)
    p = _check_classifier(clf, b.X_test, 2)
    ll, ll_uni = log_loss(b.y_test, p), log_loss(b.y_test, _uniform(frozen_pool, b.X_test))
    # Measured (seed 0): 0.1196 against 0.1236 for the uniform average.
    assert ll < ll_uni, (ll, ll_uni)
    assert set(clf.hyperparams_) == {"shrink", "l2", "neutral"}

    agg = clf.aggregator_
    w = agg.weights_
    assert isinstance(w, pd.Series) and list(w.index) == [n for n, _ in frozen_pool]
    assert (w > 0).all()
    e = agg.neutral_element_
    assert isinstance(e, float) and 0 < e < 1
    # P(y = 1) is the fitted uninorm of the positive-class probabilities.
    x = np.stack([m.predict_proba(b.X_test)[:, 1] for _, m in frozen_pool], 1)
    np.testing.assert_allclose(p[:, 1], agg.aggregate(x), rtol=1e-9, atol=1e-12)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(again.predict_proba(b.X_test), p)


def test_uninorm_min_weight_one_keeps_reinforcement(frozen_pool, cancer_pool):
    b = cancer_pool
    clf = AggregatedClassifier(
        frozen_pool, aggregator=Uninorm(min_weight=1.0), max_outer_iter=5, random_state=0
    ).fit(b.X_agg, b.y_agg)
    _check_classifier(clf, b.X_test, 2)
    assert (clf.aggregator_.weights_ >= 1.0).all()


@pytest.mark.parametrize("agg", [Sugeno(), Uninorm()], ids=["sugeno", "uninorm"])
def test_regressor_on_diabetes(agg):
    X, y = load_diabetes(return_X_y=True)
    Xp, Xr, yp, yr = train_test_split(X, y, train_size=0.4, random_state=0)
    Xa, Xt, ya, yt = train_test_split(Xr, yr, test_size=0.5, random_state=0)
    pool = {
        "lin": LinearRegression(),
        "tree": DecisionTreeRegressor(max_depth=3, random_state=0),
        "knn": KNeighborsRegressor(15),
    }
    ests = [(n, FrozenEstimator(m.fit(Xp, yp))) for n, m in pool.items()]
    reg = AggregatedRegressor(ests, aggregator=agg, max_outer_iter=10, random_state=0).fit(Xa, ya)
    pred = reg.predict(Xt)
    assert np.isfinite(pred).all()
    for name, v in reg.hyperparams_.items():
        assert np.isfinite(v), name
    mse = np.mean((pred - yt) ** 2)
    mse_uni = np.mean((np.mean([m.predict(Xt) for _, m in ests], 0) - yt) ** 2)
    # Measured (seed 0): MSE sugeno 3045, uninorm 3102; uniform average 3426.
    assert mse < 1.1 * mse_uni, (mse, mse_uni)
