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
    smooth_kth_excluding,
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


def _soft_kth_by_subsets(values, k, tau):
    """``S_k - S_{k-1}`` with ``S_j = tau log sum_{|T| = j} exp(sum(T) / tau)``, by enumeration."""
    from itertools import combinations

    def S(j):
        if j == 0:
            return 0.0
        sums = np.array([sum(c) for c in combinations(values, j)]) / tau
        return tau * (sums.max() + np.log(np.exp(sums - sums.max()).sum()))

    return S(k) - S(k - 1)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smooth_kth_excluding_by_subsets_and_limit(k):
    H = torch.tensor([[3.0, 1.0, 2.0, 0.0, -0.5], [0.2, 0.1, 0.3, 0.2, 5.0]], dtype=torch.float64)
    for tau in (0.3, 2.0):
        soft = smooth_kth_excluding(H, k, torch.tensor(tau, dtype=torch.float64)).numpy()
        for r in range(2):
            for i in range(5):
                others = [float(H[r, j]) for j in range(5) if j != i]
                assert soft[r, i] == pytest.approx(_soft_kth_by_subsets(others, k, tau), abs=1e-12)
    # tau -> 0: Shazeer's hard k-th largest of the others.
    tiny = smooth_kth_excluding(H, k, torch.tensor(1e-4, dtype=torch.float64))
    np.testing.assert_allclose(tiny.numpy(), kth_excluding(H, k).numpy(), atol=1e-3)
    # Far apart values (1e3 / tau = 1e4) neither overflow nor take log(0).
    far = torch.tensor([[0.0, 1000.0, -1000.0, 5.0]], dtype=torch.float64)
    np.testing.assert_allclose(
        smooth_kth_excluding(far, 2, torch.tensor(0.1, dtype=torch.float64)).numpy(),
        [[5.0, 0.0, 5.0, 0.0]], atol=1e-9,
    )


def test_smooth_kth_excluding_has_second_derivatives():
    """The training relaxation is smooth: first and second derivatives check out."""
    g = torch.Generator().manual_seed(0)
    H = torch.randn((3, 5), generator=g, dtype=torch.float64, requires_grad=True)
    tau = (0.2 + torch.rand((3, 5), generator=g, dtype=torch.float64)).requires_grad_()
    for k in (1, 2, 4):
        f = lambda H, tau: smooth_kth_excluding(H, k, tau)  # noqa: E731
        assert torch.autograd.gradcheck(f, (H, tau))
        assert torch.autograd.gradgradcheck(f, (H, tau))


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


def test_smooth_training_loss_gets_newton_steps(specialists):
    """Declared smooth, with batched second derivatives: the engine forms exact Hessian blocks."""
    pool, X_agg, y_agg, *_ = specialists
    est = AggregatedClassifier(pool, aggregator=SparseMoE(k=2), **FAST).fit(X_agg, y_agg)
    assert est.tuning_history_.attrs["exact_hessian"] is True


def test_penalty_includes_the_bias_l2():
    """``0.5 gate_l2 |W|^2 + 0.5 bias_l2 |b|^2``: the biases have a finite optimum."""
    g = torch.Generator().manual_seed(0)
    params = {"w_gate": torch.randn((3, 4), generator=g, dtype=torch.float64),
              "b_gate": torch.randn(4, generator=g, dtype=torch.float64)}
    hyper = {"gate_l2": torch.tensor([0.7], dtype=torch.float64)}
    W, b = params["w_gate"], params["b_gate"]
    for bias_l2 in (0.0, 1e-2, 0.3):
        got = float(SparseMoE(bias_l2=bias_l2).penalty(params, hyper))
        want = 0.5 * 0.7 * float(W.pow(2).sum()) + 0.5 * bias_l2 * float(b.pow(2).sum())
        assert got == pytest.approx(want, rel=1e-12)


def test_only_gate_l2_is_tuned_by_default(specialists):
    pool, X_agg, y_agg, *_ = specialists
    moe = SparseMoE(k=2, temperature=0.7, noise_scale=0.3, load_weight=1e-2)
    hist = AggregatedClassifier(pool, aggregator=moe, **FAST).fit(X_agg, y_agg).tuning_history_
    held = {"temperature": 0.7, "noise_scale": 0.3, "load_weight": 1e-2}
    for name, value in held.items():
        np.testing.assert_allclose(hist[name], value, rtol=1e-12)
    assert hist["gate_l2"].nunique() > 1
    # A range, given to the aggregator or to the estimator, tunes a held one.
    ranged = AggregatedClassifier(
        pool, aggregator=SparseMoE(k=2, temperature_bounds=(0.1, 4.0)), **FAST
    ).fit(X_agg, y_agg).tuning_history_
    assert ranged["temperature"].nunique() > 1
    via_estimator = AggregatedClassifier(
        pool, aggregator=SparseMoE(k=2), tune_ranges={"noise_scale": (0.05, 1.0, "log")}, **FAST
    ).fit(X_agg, y_agg).tuning_history_
    assert via_estimator["noise_scale"].nunique() > 1
    with pytest.raises(ValueError, match="'temperature' must lie in"):
        AggregatedClassifier(
            pool, aggregator=SparseMoE(temperature=10.0), **FAST
        ).fit(X_agg, y_agg)


def test_tuning_keeps_to_its_budget_of_outer_evaluations(specialists):
    pool, X_agg, y_agg, *_ = specialists
    fit = lambda agg, **kw: AggregatedClassifier(  # noqa: E731
        pool, aggregator=agg, **{**FAST, **kw}).fit(X_agg, y_agg).tuning_history_
    assert SparseMoE.outer_budget == 3
    assert 2 <= len(fit(SparseMoE(k=2), max_outer_iter=20)) <= 3
    assert len(fit(SparseMoE(k=2), max_outer_iter=1)) <= 2  # 2 * max_outer_iter if fewer


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
        ({"bias_l2": -1.0}, ValueError, "bias_l2 must be a finite number >= 0"),
        ({"bias_l2": "0.1"}, ValueError, "bias_l2 must be a finite number >= 0"),
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
