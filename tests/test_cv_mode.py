"""``cv_mode``: exact cross-fitting, approximate cross-validation, or the choice between them.

The approximate validation loss (one Newton step per fold from the fit on
all rows, ``../shared/FORMULAS.md``, "Approximate cross-validation") is
compared with the exact cross-fitted loss at the same hyperparameters: the
exact fit is given the approximate fit's tuned values as fixed ones.
"""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification, make_regression
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold, ShuffleSplit
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from aggregators import AggregatedClassifier, AggregatedRegressor, SparseMoE, Sugeno
from aggregators._fit import ACV_MAX_PARAMS

CV = KFold(5, shuffle=True, random_state=0)


def _classification():
    X, y = make_classification(
        300, 8, n_informative=5, n_classes=3, random_state=0
    )
    pool = [
        ("lr", LogisticRegression(max_iter=300)),
        ("nb", GaussianNB()),
        ("tree", DecisionTreeClassifier(max_depth=3, random_state=0)),
    ]
    return AggregatedClassifier, pool, X, y


def _regression():
    X, y = make_regression(300, 6, noise=20, random_state=0)
    pool = [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=3, random_state=0))]
    return AggregatedRegressor, pool, X, y


def _fixed(hyperparams):
    """Tuned values as ``hyperparams`` takes them (a Series by model as an array)."""
    return {k: np.asarray(v) if hasattr(v, "index") else v for k, v in hyperparams.items()}


# Relative error of the approximate validation loss against exact cross-fitting at the
# approximate fit's tuned hyperparameters. Measured on these data (300 rows, 5 folds):
# 4e-4 (stacking, classifier), 1e-3 (weights, classifier and regressor), 2e-16 (stacking,
# regressor: a quadratic training loss, which one Newton step solves exactly).
@pytest.mark.parametrize(
    "make, agg, rtol",
    [
        (_classification, "stacking", 5e-3),
        (_classification, "weights", 1e-2),
        (_regression, "stacking", 1e-8),
        (_regression, "weights", 1e-2),
    ],
    ids=["clf-stacking", "clf-weights", "reg-stacking", "reg-weights"],
)
def test_approx_fits_predicts_and_matches_exact_cv(make, agg, rtol):
    Est, pool, X, y = make()
    approx = Est(pool, aggregator=agg, cv=CV, cv_mode="approx", random_state=0).fit(X, y)
    history = approx.tuning_history_
    assert history.attrs["cv_mode"] == "approx"
    assert np.isfinite(history["validation_loss"]).all()
    assert len(approx.fold_aggregators_) == 5
    pred = approx.predict(X[:7])
    assert pred.shape[0] == 7
    if Est is AggregatedClassifier:
        proba = approx.predict_proba(X[:7])
        np.testing.assert_allclose(proba.sum(1), 1.0)

    exact = Est(
        pool, aggregator=agg, cv=CV, cv_mode="exact", hyperparams=_fixed(approx.hyperparams_),
        random_state=0,
    ).fit(X, y)
    assert exact.tuning_history_.attrs["cv_mode"] == "exact"
    assert approx.validation_loss_ == pytest.approx(exact.validation_loss_, rel=rtol)
    # The refit on all rows is the same problem whichever mode tuned it, solved from
    # another start to a gradient of 1e-7: where the tuned L2 is weak (the regressor's
    # weights, l2 ~ 1.5e-4, curvature ~ 1e-2 along the weights) that fixes the
    # predictions to a few 1e-4, relatively.
    np.testing.assert_allclose(approx.predict(X[:7]), exact.predict(X[:7]), rtol=1e-3, atol=1e-6)


def test_approx_fold_aggregators_are_newton_steps():
    """The folds' aggregators approximate the fits on the folds' training rows."""
    Est, pool, X, y = _classification()
    approx = Est(pool, aggregator="weights", cv=CV, cv_mode="approx", random_state=0).fit(X, y)
    exact = Est(
        pool, aggregator="weights", cv=CV, hyperparams=_fixed(approx.hyperparams_),
        random_state=0,
    ).fit(X, y)
    for a, e in zip(approx.fold_aggregators_, exact.fold_aggregators_):
        np.testing.assert_allclose(a.weights_, e.weights_, atol=2e-2)


def test_auto_picks_approx_for_small_linear_aggregators():
    Est, pool, X, y = _classification()
    est = Est(pool, aggregator="stacking", cv_mode="auto", max_outer_iter=2, random_state=0)
    history = est.fit(X, y).tuning_history_
    assert history.attrs["cv_mode"] == "approx"
    assert history.attrs["cv_solver"] == "newton-step"


@pytest.mark.parametrize("cv_mode", ["exact", "auto"])
def test_regression_stacking_is_exact_in_closed_form(cv_mode):
    """A quadratic training loss: auto needs no approximation, exact no inner solve."""
    Est, pool, X, y = _regression()
    est = Est(pool, aggregator="stacking", cv_mode=cv_mode, max_outer_iter=2, random_state=0)
    history = est.fit(X, y).tuning_history_
    assert history.attrs["cv_mode"] == "exact"
    assert history.attrs["cv_solver"] == "closed-form"
    assert "closed form" in history.attrs["cv_mode_reason"]
    assert (history["inner_iter"] == 0).all()


def test_auto_picks_exact_for_weights():
    """Softmax weights are not linear in their logits: on flat losses one Newton step
    can overshoot a fold's fit (benchmarks/bench_acv.py), so auto keeps exact folds."""
    Est, pool, X, y = _classification()
    est = Est(pool, aggregator="weights", cv_mode="auto", max_outer_iter=1, random_state=0)
    history = est.fit(X, y).tuning_history_
    assert history.attrs["cv_mode"] == "exact"
    assert "linear_design" in history.attrs["cv_mode_reason"]


# Sugeno is trained through a smooth relaxation whose second derivatives are dear;
# SparseMoE's load-balancing loss is a data_penalty (statistics of a fold's rows).
@pytest.mark.parametrize(
    "aggregator, reason",
    [(Sugeno(), "second_order = False"), (SparseMoE(), "adds a data_penalty")],
    ids=["sugeno", "moe"],
)
def test_auto_picks_exact_for_sugeno_and_moe(aggregator, reason):
    Est, pool, X, y = _classification()
    est = Est(pool, aggregator=aggregator, cv_mode="auto", max_outer_iter=1, random_state=0)
    history = est.fit(X[:120], y[:120]).tuning_history_
    assert history.attrs["cv_mode"] == "exact"
    assert reason in history.attrs["cv_mode_reason"]


def test_auto_picks_exact_above_the_parameter_limit():
    X, y = make_classification(150, 30, n_informative=10, n_classes=6, random_state=0)
    pool = [(f"lr{i}", LogisticRegression(C=10.0 ** (i - 3), max_iter=300)) for i in range(6)]
    assert 6 * 6 * 6 + 6 > ACV_MAX_PARAMS  # stacking's coefficient blocks and intercept
    est = AggregatedClassifier(pool, aggregator="stacking", cv_mode="auto", max_outer_iter=1,
                               random_state=0)
    history = est.fit(X, y).tuning_history_
    assert history.attrs["cv_mode"] == "exact"
    assert "ACV_MAX_PARAMS" in history.attrs["cv_mode_reason"]


def test_single_split_is_exact():
    Est, pool, X, y = _classification()
    est = Est(pool, aggregator="weights", cv=None, cv_mode="approx", max_outer_iter=2,
              random_state=0)
    assert est.fit(X, y).tuning_history_.attrs["cv_mode"] == "exact"


def test_max_outer_iter_0_validates_nothing():
    Est, pool, X, y = _classification()
    est = Est(pool, aggregator="weights", cv_mode="approx", max_outer_iter=0, random_state=0)
    assert est.fit(X, y).tuning_history_.attrs["cv_mode"] is None


@pytest.mark.parametrize(
    "params, err, match",
    [
        ({"cv_mode": "fast"}, ValueError, "cv_mode"),
        ({"cv_mode": None}, ValueError, "cv_mode"),
        ({"cv_mode": "approx", "aggregator": SparseMoE()}, ValueError, "data_penalty"),
        ({"cv_mode": "approx", "cv": ShuffleSplit(3, test_size=0.2, random_state=0)},
         ValueError, "not a partition"),
    ],
    ids=["unknown", "none", "row-statistics", "overlapping-splits"],
)
def test_bad_cv_mode(params, err, match):
    Est, pool, X, y = _classification()
    est = Est(pool, aggregator="weights", max_outer_iter=1, random_state=0).set_params(**params)
    with pytest.raises(err, match=match):
        est.fit(X[:120], y[:120])


def test_auto_with_overlapping_splits_is_exact():
    Est, pool, X, y = _classification()
    est = Est(pool, aggregator="stacking", cv=ShuffleSplit(3, test_size=0.2, random_state=0),
              cv_mode="auto", max_outer_iter=1, random_state=0)
    history = est.fit(X[:120], y[:120]).tuning_history_
    assert history.attrs["cv_mode"] == "exact"


@pytest.mark.parametrize("make", [_classification, _regression], ids=["clf", "reg"])
def test_cv_mode_is_a_parameter(make):
    Est, pool, _, _ = make()
    est = Est(pool)
    assert est.get_params()["cv_mode"] == "exact"  # the default: bench_acv.py (seeds 0-2) kept it
    twin = clone(est.set_params(cv_mode="approx"))
    assert twin.get_params()["cv_mode"] == "approx"
    assert twin.set_params(cv_mode="auto").cv_mode == "auto"


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_linear_design_path_equals_the_generic_path(task):
    """Stacking declares its design matrix: approximate CV then takes the linear path,
    whose validation loss, hypergradient and fold predictions equal the generic one's."""
    import torch

    from aggregators import Stacking
    from aggregators._base import AggregationContext
    from aggregators._bilevel import HyperSpace, Split, make_acv_problem
    from aggregators.hypergrad import hypergradient, solve_inner

    class Generic(Stacking):
        def linear_design(self, buffers, Z, X=None):
            return None

    g = torch.Generator().manual_seed(0)
    n, m = 150, 3
    c = 3 if task == "classification" else 1
    Z = torch.rand(n, m, c, generator=g, dtype=torch.float64)
    if task == "classification":
        Z = Z / Z.sum(2, keepdim=True)
        y = torch.randint(0, c, (n,), generator=g)
    else:
        y = Z.mean(1) + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    X = torch.randn(n, 2, generator=g, dtype=torch.float64)
    ctx = AggregationContext(
        task=task, n_models=m, n_outputs=c, n_features=2, model_names=["a", "b", "c"],
        classes=np.arange(c) if task == "classification" else None,
        device=torch.device("cpu"), dtype=torch.float64, generator=g, n_train=120,
    )
    full, ids = Split(Z, y, X), torch.arange(n) % 5
    results = []
    for agg in (Stacking(passthrough=True), Generic(passthrough=True)):
        agg.bind(ctx)
        assert (agg.linear_design({"x_mean": X.mean(0), "x_scale": X.std(0)}, Z, X) is None) \
            == isinstance(agg, Generic)
        space = HyperSpace(agg.hyperparameters(ctx), {}, ctx.device, ctx.dtype)
        problem, packer, buffers, fold_params = make_acv_problem(agg, ctx, full, ids, space)
        u = space.initial()
        theta, _, _ = solve_inner(problem, u, tol=1e-12)
        res = hypergradient(problem, theta, u, "implicit-cg", tol=1e-12)
        preds = torch.stack([
            agg.forward({**packer.unflatten(t), **buffers}, space.values(u), Z, X)
            for t in fold_params(theta, u)
        ])
        if task == "classification":  # class scores are defined up to a common shift
            preds = preds.log_softmax(-1)
        results.append((res.value, res.grad, preds))
    (v1, g1, p1), (v2, g2, p2) = results
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(p1, p2, rtol=1e-8, atol=1e-10)


# -- exact cross-fitting in closed form (regression stacking) -------------------------
def _iterative(monkeypatch):
    import aggregators._fit as fit_module

    monkeypatch.setattr(fit_module, "LINEAR_CLOSED_FORM", False)


def _regression_data(n_targets=1):
    X, y = make_regression(
        240, 6, n_targets=n_targets, noise=20, random_state=1
    )
    pool = [
        ("ridge", Ridge()),
        ("tree", DecisionTreeRegressor(max_depth=3, random_state=0)),
        ("shallow", DecisionTreeRegressor(max_depth=1, random_state=0)),
    ]
    return pool, X, y


@pytest.mark.parametrize(
    "options",
    [{}, {"aggregator": "stacking_passthrough"}, {"sample_weight": True}, {"cv": None},
     {"cv": ShuffleSplit(3, test_size=0.3, random_state=0)}],
    ids=["default", "passthrough", "weighted", "single-split", "overlapping-splits"],
)
def test_closed_form_equals_iterative_folds(options, monkeypatch):
    """At the same (fixed) hyperparameters the closed-form splits give the iterative
    inner solves' validation loss and fold fits; tuned, the same hyperparameters."""
    from aggregators import Stacking

    pool, X, y = _regression_data()
    options = dict(options)
    fit_params = {}
    if options.pop("sample_weight", False):
        fit_params["sample_weight"] = np.random.default_rng(0).uniform(0.2, 2.0, len(y))
    options["aggregator"] = (
        Stacking(passthrough=True) if options.pop("aggregator", None) else "stacking"
    )
    hyper = {"l2": np.array([1e-3, 3e-2, 1.0])}
    if not isinstance(options["aggregator"], str):
        hyper["l2_passthrough"] = 0.2
    kwargs = dict(random_state=0, max_inner_iter=500, **options)
    closed = AggregatedRegressor(pool, hyperparams=hyper, **kwargs).fit(X, y, **fit_params)
    tuned = AggregatedRegressor(pool, **kwargs).fit(X, y, **fit_params)
    assert closed.tuning_history_.attrs["cv_solver"] == "closed-form"
    _iterative(monkeypatch)
    iterative = AggregatedRegressor(pool, hyperparams=hyper, **kwargs).fit(X, y, **fit_params)
    assert iterative.tuning_history_.attrs["cv_solver"] == "iterative"
    assert closed.validation_loss_ == pytest.approx(iterative.validation_loss_, rel=1e-8)
    for a, b in zip(closed.fold_aggregators_, iterative.fold_aggregators_):
        np.testing.assert_allclose(a.coef_.to_numpy(), b.coef_.to_numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(closed.predict(X[:9]), iterative.predict(X[:9]), rtol=1e-7)
    # Tuned, the two meet within the tuner's tolerance only: HOAG solves the
    # iterative folds loosely in its first steps, which moves its path a little.
    tuned_iter = AggregatedRegressor(pool, **kwargs).fit(X, y, **fit_params)
    assert tuned.validation_loss_ <= tuned_iter.validation_loss_ * (1 + 1e-4)
    np.testing.assert_allclose(tuned.predict(X[:9]), tuned_iter.predict(X[:9]), rtol=1e-3)


def test_closed_form_hypergradient_equals_iterative():
    """Validation loss and hypergradient of the closed-form problem against the
    iterative folds' (inner solves to 1e-12, implicit hypergradient by a direct solve)."""
    import torch

    from aggregators import Stacking
    from aggregators._base import AggregationContext
    from aggregators._bilevel import HyperSpace, Split, make_fold_problems, make_linear_cv_problem
    from aggregators.hypergrad import hypergradient, solve_inner

    pool, X, y = _regression_data()
    Z = np.column_stack([clone(m).fit(X[:120], y[:120]).predict(X) for _, m in pool])
    Z = (Z - y.mean()) / y.std()
    dt = torch.float64
    full = Split(
        torch.as_tensor(Z[:, :, None], dtype=dt),
        torch.as_tensor(((y - y.mean()) / y.std())[:, None], dtype=dt),
        torch.as_tensor(X, dtype=dt),
    )
    splits = list(CV.split(X))
    for agg in (Stacking(), Stacking(passthrough=True)):
        ctx = AggregationContext(
            task="regression", n_models=3, n_outputs=1, n_features=X.shape[1],
            model_names=["a", "b", "c"], classes=None, device=torch.device("cpu"), dtype=dt,
            generator=torch.Generator().manual_seed(0), n_train=192,
        )
        specs = agg.hyperparameters(ctx)
        space = HyperSpace(specs, {}, torch.device("cpu"), dt)
        u = space.initial() + torch.linspace(-1.0, 2.0, space.initial().numel(), dtype=dt)
        closed, solutions, _, reason = make_linear_cv_problem(agg, ctx, full, splits, space)
        assert closed is not None, reason
        ref = hypergradient(closed, closed.theta0, u, "implicit-cg")
        joint, split, _ = make_fold_problems(
            agg, ctx, [(full.take(torch.as_tensor(tr)), full.take(torch.as_tensor(va)))
                       for tr, va in splits], space,
        )
        theta, _, converged = solve_inner(joint, u, joint.theta0, tol=1e-12, solver="newton")
        assert converged
        it = hypergradient(joint, theta, u, "implicit-cg", tol=1e-14, max_iter=1000)
        assert float(ref.value) == pytest.approx(float(it.value), rel=1e-10)
        torch.testing.assert_close(ref.grad, it.grad, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(
            solutions(u).detach(), torch.stack(split(theta)), rtol=1e-8, atol=1e-10
        )


@pytest.mark.parametrize(
    "make, n_targets, solver",
    [(_classification, 1, "iterative"), (_regression_data, 2, "iterative")],
    ids=["classification", "multi-target"],
)
def test_closed_form_only_for_one_target_squared_loss(make, n_targets, solver):
    """Cross-entropy is not quadratic; several targets have no single design (each
    target its own coefficients): both keep the iterative folds."""
    if make is _classification:
        Est, pool, X, y = make()
    else:
        Est = AggregatedRegressor
        pool, X, y = make(n_targets)
    est = Est(pool, aggregator="stacking", max_outer_iter=1, random_state=0).fit(X, y)
    assert est.tuning_history_.attrs["cv_solver"] == solver


def test_approx_asked_for_keeps_the_newton_step():
    Est, pool, X, y = _regression()
    est = Est(pool, aggregator="stacking", cv=CV, cv_mode="approx", max_outer_iter=1,
              random_state=0)
    assert est.fit(X, y).tuning_history_.attrs["cv_solver"] == "newton-step"


def test_closed_form_in_float32():
    """The checks of the design and the penalty allow float32's rounding."""
    pool, X, y = _regression_data()
    fits = [
        AggregatedRegressor(pool, aggregator="stacking", dtype=dtype, max_outer_iter=3,
                            random_state=0).fit(X, y)
        for dtype in ("float32", "float64")
    ]
    assert [f.tuning_history_.attrs["cv_solver"] for f in fits] == ["closed-form"] * 2
    assert fits[0].validation_loss_ == pytest.approx(fits[1].validation_loss_, rel=1e-4)


def test_closed_form_split_without_weight_is_an_error():
    pool, X, y = _regression_data()
    sw = np.r_[np.ones(len(y) // 2), np.zeros(len(y) - len(y) // 2)]
    with pytest.raises(ValueError, match="total sample weight of 0"):
        AggregatedRegressor(pool, aggregator="stacking", cv=KFold(2), random_state=0).fit(
            X, y, sample_weight=sw)


@pytest.mark.parametrize("passthrough", [False, True], ids=["stacking", "passthrough"])
def test_closed_form_refit_keeps_its_fit(monkeypatch, passthrough):
    """After closed-form tuning the fit on all rows is the closed form's: kept
    without an inner solve, the same numbers the solve returns from it."""
    import aggregators._fit as fit_module
    from aggregators import Stacking

    pool, X, y = _regression_data()
    calls = []
    solve = fit_module.solve_inner

    def counting(*args, **kwargs):
        calls.append(1)
        return solve(*args, **kwargs)

    monkeypatch.setattr(fit_module, "solve_inner", counting)
    make = lambda: AggregatedRegressor(  # noqa: E731
        pool, aggregator=Stacking(passthrough=passthrough), cv=CV, max_outer_iter=3,
        random_state=0,
    ).fit(X, y)
    kept = make()
    assert kept.tuning_history_.attrs["cv_solver"] == "closed-form"
    assert not calls
    refit = fit_module._refit
    monkeypatch.setattr(
        fit_module, "_refit",
        lambda *a, warm_is_fit=False, **kw: refit(*a, warm_is_fit=False, **kw),
    )
    solved = make()
    assert calls  # the inner solve ran, from the closed-form fit
    for name, value in solved.aggregator_.params_.items():
        np.testing.assert_array_equal(kept.aggregator_.params_[name], value)
    np.testing.assert_array_equal(kept.predict(X), solved.predict(X))


def test_full_fit_reuses_the_splits_penalty_checks():
    """linear_full_fit with the splits' solutions gives the fit it gives alone (to
    round-off: with the splits' penalty terms the solve runs in numpy on the host)."""
    import torch

    from aggregators import Stacking
    from aggregators._base import AggregationContext
    from aggregators._bilevel import (
        HyperSpace,
        Split,
        linear_full_fit,
        make_linear_cv_problem,
    )

    pool, X, y = _regression_data()
    Z = np.column_stack([clone(m).fit(X[:120], y[:120]).predict(X) for _, m in pool])
    dt = torch.float64
    full = Split(
        torch.as_tensor(((Z - y.mean()) / y.std())[:, :, None], dtype=dt),
        torch.as_tensor(((y - y.mean()) / y.std())[:, None], dtype=dt),
        torch.as_tensor(X, dtype=dt),
    )
    agg = Stacking(passthrough=True)
    ctx = AggregationContext(
        task="regression", n_models=3, n_outputs=1, n_features=X.shape[1],
        model_names=["a", "b", "c"], classes=None, device=torch.device("cpu"), dtype=dt,
        generator=torch.Generator().manual_seed(0), n_train=192,
    )
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), dt)
    _, solutions, _, reason = make_linear_cv_problem(agg, ctx, full, list(CV.split(X)), space)
    assert solutions.penalty_kind == "diagonal" and solutions.penalty_terms is not None, reason
    u = space.initial() + 0.7
    alone = linear_full_fit(agg, ctx, full, space, u)
    torch.testing.assert_close(
        linear_full_fit(agg, ctx, full, space, u, like=solutions), alone, rtol=1e-12, atol=1e-14
    )


def _stored_pool(n_rows, n_models, n_classes, seed):
    """Stored predictions of models of varied skill (bench_sweep's generator, smaller)."""
    from base_models import PrecomputedModel

    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_rows)
    pool = []
    for m in range(n_models):
        z = rng.uniform(0.5, 1.5) * rng.standard_normal((n_rows, n_classes))
        z[np.arange(n_rows), y] += rng.uniform(0.5, 2.5)
        P = np.exp(z - z.max(1, keepdims=True))
        pool.append((f"m{m}", PrecomputedModel(P / P.sum(1, keepdims=True), key_column=0,
                                               classes=np.arange(n_classes))))
    return pool, np.arange(n_rows, dtype=float)[:, None], y


@pytest.mark.parametrize(
    "max_params, rows_per_param, large_max, mode, reason",
    [
        (10, 5, 400, "approx", "ACV_LARGE_N_ROWS_PER_PARAM"),  # 30 parameters, 10 rows each
        (10, 20, 400, "exact", "fewer than ACV_LARGE_N_ROWS_PER_PARAM"),
        (10, 5, 20, "exact", "ACV_MAX_PARAMS"),  # above the large-n rule's own limit
        (200, 5, 400, "approx", "linear in its 30 parameters, without buffers"),
    ],
)
def test_auto_large_n_rule(monkeypatch, max_params, rows_per_param, large_max, mode, reason):
    """Above ACV_MAX_PARAMS, auto still approximates a linear design when rows outnumber
    parameters by ACV_LARGE_N_ROWS_PER_PARAM, up to ACV_LARGE_N_MAX_PARAMS."""
    import aggregators._fit as fit_module

    monkeypatch.setattr(fit_module, "ACV_MAX_PARAMS", max_params)
    monkeypatch.setattr(fit_module, "ACV_LARGE_N_ROWS_PER_PARAM", rows_per_param)
    monkeypatch.setattr(fit_module, "ACV_LARGE_N_MAX_PARAMS", large_max)
    pool, X, y = _stored_pool(300, 3, 3, 0)  # 3 x (3 x 3 + 1) = 30 parameters
    est = AggregatedClassifier(pool, aggregator="stacking", cv_mode="auto", max_outer_iter=1,
                               random_state=0)
    history = est.fit(X, y).tuning_history_
    assert history.attrs["cv_mode"] == mode
    assert reason in history.attrs["cv_mode_reason"]


def test_auto_on_many_rows_tunes_as_exact_and_is_deterministic(monkeypatch):
    """The large-n path (approximate CV from ACV_LARGE_N_ROWS_PER_PARAM rows per
    parameter) reaches exact cross-fitting's tuned validation loss, and its fits repeat."""
    import aggregators._fit as fit_module

    # The rule as it stands for a few hundred parameters, on 30 (a fit of seconds).
    monkeypatch.setattr(fit_module, "ACV_MAX_PARAMS", 10)
    pool, X, y = _stored_pool(8000, 3, 3, 1)  # 30 parameters, 267 rows each
    assert 8000 >= fit_module.ACV_LARGE_N_ROWS_PER_PARAM * 30
    fits = {
        mode: AggregatedClassifier(pool, aggregator="stacking", cv_mode=mode, random_state=0)
        .fit(X, y)
        for mode in ("auto", "exact")
    }
    assert fits["auto"].tuning_history_.attrs["cv_mode"] == "approx"
    assert "ACV_LARGE_N_ROWS_PER_PARAM" in fits["auto"].tuning_history_.attrs["cv_mode_reason"]
    approx, exact = fits["auto"].validation_loss_, fits["exact"].validation_loss_
    assert approx == pytest.approx(exact, rel=2e-2)
    # The exact folds at the approximate fit's tuned values: the approximation's error.
    at_tuned = AggregatedClassifier(
        pool, aggregator="stacking", cv_mode="exact", random_state=0,
        hyperparams=_fixed(fits["auto"].hyperparams_),
    ).fit(X, y)
    assert approx == pytest.approx(at_tuned.validation_loss_, rel=1e-2)
    again = AggregatedClassifier(pool, aggregator="stacking", cv_mode="auto",
                                 random_state=0).fit(X, y)
    assert again.validation_loss_ == fits["auto"].validation_loss_
    np.testing.assert_array_equal(again.predict_proba(X[:50]), fits["auto"].predict_proba(X[:50]))
