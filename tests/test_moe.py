"""SparseMoE: the gating formulas, exact top-k routing, sparse inference, learned routing.

The specialist task: four regions (quadrants of the first two features); in
region ``r`` the label is the sign of feature ``2 + r``, and expert ``r`` is a
logistic regression trained on its own region only, so the owner of each
row is known.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LinearRegression, LogisticRegression

from aggregators import AggregatedClassifier, AggregatedRegressor, SparseMoE
from aggregators.moe import (
    cv_squared,
    keep_top_k_softmax,
    kth_excluding,
    load_probability,
    noisy_logits,
    top_k_mask,
)

FAST = {"cv": None, "max_outer_iter": 3, "random_state": 0}


def _regions(n, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    owner = (X[:, 0] > 0).astype(int) * 2 + (X[:, 1] > 0).astype(int)
    y = (X[np.arange(n), 2 + owner] > 0).astype(int)
    return X, y, owner


@pytest.fixture(scope="module")
def specialists():
    X, y, owner = _regions(2000, 0)
    pool = [
        (f"e{r}", FrozenEstimator(LogisticRegression().fit(X[owner == r], y[owner == r])))
        for r in range(4)
    ]
    X_agg, y_agg, _ = _regions(600, 1)
    X_test, y_test, owner_test = _regions(1000, 2)
    return pool, X_agg, y_agg, X_test, y_test, owner_test


def _gate_mask(est, X):
    agg = est.aggregator_
    params, hyper = agg._fitted_tensors(torch.device("cpu"), torch.float64)
    with torch.no_grad():
        return agg.route(params, hyper, torch.as_tensor(X, dtype=torch.float64)).numpy()


# -- the formulas on small fixed arrays ---------------------------------------------
def test_kth_excluding_by_hand():
    H = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    # k=1: the largest of the others; k=2: the second largest of the others.
    np.testing.assert_array_equal(kth_excluding(H, 1).numpy(), [[2.0, 3.0, 3.0, 3.0]])
    np.testing.assert_array_equal(kth_excluding(H, 2).numpy(), [[1.0, 2.0, 1.0, 2.0]])
    assert torch.isinf(kth_excluding(H, 4)).all()  # k = m: always in the top k


def test_cv_squared_uses_population_variance():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert float(cv_squared(v)) == pytest.approx(np.var([1, 2, 3, 6]) / 3.0**2, rel=1e-6)
    assert float(cv_squared(torch.full((5,), 2.0))) == 0.0


def test_keep_top_k_softmax_is_softmax_over_the_kept():
    logits = torch.tensor([[0.5, 2.0, 1.0, -1.0]], dtype=torch.float64)
    G = keep_top_k_softmax(logits, 2)
    expected = np.exp([2.0, 1.0]) / np.exp([2.0, 1.0]).sum()
    np.testing.assert_allclose(G.numpy()[0], [0.0, expected[0], expected[1], 0.0], rtol=1e-12)
    assert (top_k_mask(logits, 2).sum(1) == 2).all()


def test_load_estimate_matches_monte_carlo():
    """P(x, i) = how often expert i is in the top k when only its own noise is drawn again."""
    g = torch.Generator().manual_seed(0)
    n, m, k, draws = 6, 5, 2, 20000
    clean = torch.randn((n, m), generator=g, dtype=torch.float64)
    std = 0.2 + torch.rand((n, m), generator=g, dtype=torch.float64)
    H = noisy_logits(clean, std, g)  # one draw of everyone's noise, then fixed
    P = load_probability(clean, H, std, k)
    freq = torch.zeros(n, m, dtype=torch.float64)
    for i in range(m):
        Hs = H[None].repeat(draws, 1, 1)  # (draws, n, m)
        eps = torch.randn((draws, n), generator=g, dtype=torch.float64)
        Hs[:, :, i] = clean[:, i] + eps * std[:, i]
        rank_ok = top_k_mask(Hs.reshape(-1, m), k).reshape(draws, n, m)[:, :, i]
        freq[:, i] = rank_ok.double().mean(0)
    se = (P * (1 - P) / draws).sqrt()
    assert ((freq - P).abs() <= 5 * se + 1e-3).all()


# -- the estimator ----------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_routing_respects_k_exactly(specialists, k):
    pool, X_agg, y_agg, X_test, _, _ = specialists
    est = AggregatedClassifier(pool, aggregator=SparseMoE(k=k), **FAST).fit(X_agg, y_agg)
    proba = est.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-12)
    assert (_gate_mask(est, X_test).sum(1) == k).all()
    routing = est.last_routing_
    assert isinstance(routing, pd.Series) and list(routing.index) == [n for n, _ in pool]
    assert routing.sum() == k * len(X_test)
    est.predict(X_test, dense=True)
    assert (est.last_routing_ == len(X_test)).all()


@pytest.mark.parametrize("k", [1, 4])
def test_sparse_and_dense_predictions_identical(specialists, k):
    pool, X_agg, y_agg, X_test, _, _ = specialists
    est = AggregatedClassifier(pool, aggregator=SparseMoE(k=k), **FAST).fit(X_agg, y_agg)
    sparse = est.predict_proba(X_test)
    dense = est.predict_proba(X_test, dense=True)
    # Unrouted experts get a gate weight of exactly 0; only the base models'
    # own floating point may depend on the batch size.
    np.testing.assert_allclose(sparse, dense, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(est.predict(X_test), est.predict(X_test, dense=True))


def test_gate_learns_the_owners(specialists):
    pool, X_agg, y_agg, X_test, y_test, owner = specialists
    est = AggregatedClassifier(pool, aggregator=SparseMoE(k=1), **FAST).fit(X_agg, y_agg)
    routed_to_owner = _gate_mask(est, X_test)[np.arange(len(owner)), owner].mean()
    assert routed_to_owner > 0.9
    assert (est.predict(X_test) == y_test).mean() > 0.9


def test_load_balance_improves_with_its_weight():
    # One expert is good everywhere, three are weak: without balancing the
    # gate sends most rows to the good one.
    from base_models import CallableModel

    def strong(Z):
        own = (Z[:, 0] > 0).astype(int) * 2 + (Z[:, 1] > 0).astype(int)
        p = 1 / (1 + np.exp(-4 * Z[np.arange(len(Z)), 2 + own]))
        return np.c_[1 - p, p]

    def weak(col):
        return lambda Z: np.c_[1 - (p := 1 / (1 + np.exp(-Z[:, col]))), p]

    pool = [("strong", CallableModel(strong, classes=[0, 1]))]
    pool += [(f"weak{c}", CallableModel(weak(c), classes=[0, 1])) for c in (2, 3, 4)]
    X_agg, y_agg, _ = _regions(600, 4)
    cv2 = {}
    for w in (1e-4, 1.0):
        hp = {"load_weight": w, "gate_l2": 1e-2, "noise_scale": 0.5, "temperature": 1.0}
        est = AggregatedClassifier(
            pool, aggregator=SparseMoE(k=1), hyperparams=hp, **FAST
        ).fit(X_agg, y_agg)
        est.predict(X_agg)
        counts = est.last_routing_.to_numpy(float)
        cv2[w] = counts.var() / counts.mean() ** 2
    assert cv2[1.0] < 0.5 * cv2[1e-4]


def test_mlp_gate_and_regression():
    X, _, owner = _regions(800, 5)
    t = X[np.arange(len(X)), 2 + owner]  # regression target: the owner's feature
    pool = []
    for r in range(4):
        sel = owner == r
        pool.append((f"e{r}", FrozenEstimator(LinearRegression().fit(X[sel], t[sel]))))
    est = AggregatedRegressor(pool, aggregator=SparseMoE(k=1, gate="mlp", hidden=8), **FAST)
    pred = est.fit(X, t).predict(X)
    assert pred.shape == t.shape
    assert est.last_routing_.sum() == len(X)
    assert np.mean((pred - t) ** 2) < 0.5 * np.var(t)


def test_gate_reading_outputs_predicts_densely(specialists):
    pool, X_agg, y_agg, X_test, _, _ = specialists
    est = AggregatedClassifier(
        pool, aggregator=SparseMoE(k=1, gate_inputs="X+outputs"), **FAST
    ).fit(X_agg, y_agg)
    est.predict(X_test)
    assert (est.last_routing_ == len(X_test)).all()


def test_routing_with_pandas_rows(specialists):
    pool, X_agg, y_agg, X_test, _, _ = specialists
    cols = [f"f{i}" for i in range(6)]
    df = pd.DataFrame(X_agg, columns=cols, index=np.arange(len(X_agg)) * 7)
    est = AggregatedClassifier(pool, aggregator=SparseMoE(k=2), **FAST).fit(df, y_agg)
    test_df = pd.DataFrame(X_test, columns=cols)
    np.testing.assert_allclose(
        est.predict_proba(test_df), est.predict_proba(test_df, dense=True), rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize(
    "params, err, match",
    [
        ({"k": 0}, ValueError, "k must be between 1 and the number of base models"),
        ({"k": 5}, ValueError, r"k must be between 1 and the number of base models \(4\)"),
        ({"k": 1.5}, TypeError, "k must be an int"),
        ({"gate": "tree"}, ValueError, "gate must be 'linear' or 'mlp'"),
        ({"gate_inputs": "Z"}, ValueError, "gate_inputs must be"),
    ],
)
def test_bad_parameters(specialists, params, err, match):
    pool, X_agg, y_agg, *_ = specialists
    with pytest.raises(err, match=match):
        AggregatedClassifier(pool, aggregator=SparseMoE(**params), **FAST).fit(X_agg, y_agg)


def test_last_routing_before_predict_and_dict_unchanged(specialists):
    pool, X_agg, y_agg, X_test, _, _ = specialists
    est = AggregatedClassifier(pool, aggregator="moe", **FAST).fit(X_agg, y_agg)
    assert (est.last_routing_ == 0).all()
    before = dict(vars(est))
    est.predict(X_test)  # updates last_routing_ in place (scikit-learn's check_dict_unchanged)
    assert vars(est) == before and est.last_routing_.sum() == 2 * len(X_test)
