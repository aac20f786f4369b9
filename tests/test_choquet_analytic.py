"""Closed-form inner derivatives of 2-additive ``Choquet`` problems (``_choquet_analytic``).

The inner loss, its gradient, Hessian blocks and the mixed product in the
hyperparameters equal autograd on the problem's own losses to 1e-10 in
float64: binary, multiclass, regression (one and two targets), global and
per-class capacities, k = 1 and k = 2, weighted rows; the masses map's
Jacobian and curvature equal autograd's; the hypergradient agrees; and a
whole fit tunes to the same numbers with and without them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier

import aggregators._bilevel as bilevel
import aggregators._choquet_analytic as choquet_analytic
from aggregators import AggregatedClassifier
from aggregators._base import AggregationContext
from aggregators._bilevel import HyperSpace, Split, make_fold_problems, make_problem
from aggregators._capacity import two_additive_masses
from aggregators.choquet import Choquet
from aggregators.hypergrad._newton import block_sizes, hessian_blocks

from test_analytic import (  # noqa: E402
    ATOL, DT, _folds, _plain, assert_closed_forms_equal_autograd,
    assert_hypergradient_equals_autograd,
)


def _data(task, n_outputs, weighted, n=80, m=4, device="cpu"):
    rng = np.random.default_rng(1)
    if task == "classification":
        Z = rng.dirichlet(np.full(n_outputs, 0.7), size=(n, m))
        # Labels drawn from the models' mean: informative scores, finite thresholds.
        mean = Z.mean(1)
        y = torch.as_tensor((rng.uniform(size=(n, 1)) > mean.cumsum(1)).sum(1))
    else:
        Z = rng.normal(size=(n, m, n_outputs))
        y = torch.as_tensor(rng.normal(size=(n, n_outputs)), dtype=DT)
    w = torch.as_tensor(rng.uniform(0.2, 2.0, n), dtype=DT) if weighted else None
    dev = torch.device(device)
    full = Split(torch.as_tensor(Z, dtype=DT).to(dev), y.to(dev), None,
                 None if w is None else w.to(dev))
    ctx = AggregationContext(
        task=task, n_models=m, n_outputs=n_outputs, n_features=3,
        model_names=[f"m{i}" for i in range(m)], dtype=DT, device=dev,
        generator=torch.Generator().manual_seed(0), n_train=int(0.8 * n),
    )
    return full, ctx


CASES = [
    ("classification", 2, False, Choquet()),
    ("classification", 5, False, Choquet()),
    ("classification", 3, True, Choquet(share="per_class")),
    ("classification", 4, False, Choquet(1)),
    ("classification", 3, True, Choquet(1, share="per_class")),
    ("regression", 1, False, Choquet()),
    ("regression", 2, True, Choquet(share="per_class", l2=0.3)),
    ("regression", 1, True, Choquet(1)),
]
IDS = ["binary", "five-classes", "per-class-weighted", "k1", "k1-per-class",
       "regression", "regression-two-targets-per-class", "regression-k1"]


def _space(agg, ctx):
    return HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)


@pytest.mark.parametrize("task, n_outputs, weighted, agg", CASES, ids=IDS)
def test_callables_equal_autograd(task, n_outputs, weighted, agg):
    full, ctx = _data(task, n_outputs, weighted)
    space = _space(agg, ctx)
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), space)
    assert joint.inner_hessian is not None and joint.mixed_product is not None
    plain = _plain(joint)
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(joint.theta0.numel(), generator=gen, dtype=DT)
    v = torch.randn(theta.numel(), generator=gen, dtype=DT)
    u = space.initial() + torch.linspace(-0.5, 1.0, space.initial().numel(), dtype=DT)

    assert joint.inner_hvp is None  # on purpose: see _choquet_analytic
    assert_closed_forms_equal_autograd(joint, plain, theta, v, u)

    assert_hypergradient_equals_autograd(joint, plain, u, tol=1e-8, max_iter=500)


@pytest.mark.parametrize("k", [1, 2])
def test_mass_chain_equals_autograd(k):
    gen = torch.Generator().manual_seed(0)
    m, cap = 5, 3
    a = 2 * torch.randn(cap, m, generator=gen, dtype=DT)
    q = 3 * torch.randn(cap, m * (m - 1) // 2, generator=gen, dtype=DT) if k == 2 else None
    chain = choquet_analytic.mass_chain(a, q, m)
    u = a if q is None else torch.cat([a, q], 1)
    P = u.shape[1]
    g = torch.randn(cap, P, generator=gen, dtype=DT)

    def masses(uu):
        return two_additive_masses(uu[:m][None], None if q is None else uu[m:][None], m)[0]

    torch.testing.assert_close(chain.mu, two_additive_masses(a, q, m), rtol=0, atol=1e-14)
    for b in range(cap):
        J = torch.autograd.functional.jacobian(masses, u[b])
        S = torch.autograd.functional.hessian(lambda uu: masses(uu) @ g[b], u[b])
        torch.testing.assert_close(chain.jacobian()[b], J, rtol=0, atol=1e-10)
        gN, g_u = chain.grad(g)
        torch.testing.assert_close(g_u[b], J.T @ g[b], rtol=0, atol=1e-10)
        torch.testing.assert_close(chain.curvature(g, gN)[b], S, rtol=0, atol=1e-10)


def test_refit_problem_and_lattice():
    full, ctx = _data("classification", 3, False)
    agg = Choquet()
    problem, _, _ = make_problem(agg, ctx, full, None, _space(agg, ctx))
    assert problem.inner_hessian is not None
    # k >= 3 keeps autograd: the integral is not linear in a small mass vector.
    agg3 = Choquet("full")
    joint, _, _ = make_fold_problems(agg3, ctx, _folds(full), _space(agg3, ctx))
    assert joint.inner_hessian is None and joint.inner_value_grad is None


class _SquaredChoquet(Choquet):
    """A forward pass of its own: the closed form does not describe it."""

    def forward(self, params, hyper, Z, X=None):
        return 2.0 * super().forward(params, hyper, Z, X)


def test_not_attached_to_a_subclass_with_its_own_forward():
    full, ctx = _data("classification", 3, False)
    agg = _SquaredChoquet()
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), _space(agg, ctx))
    assert joint.inner_value_grad is None


@pytest.mark.parametrize("params", [{}, {"share": "per_class"}], ids=["global", "per-class"])
def test_whole_fit_matches_autograd(monkeypatch, params):
    X, y = make_classification(300, 6, n_informative=4, n_classes=3, random_state=0)
    pool = [(n, FrozenEstimator(e.fit(X[:150], y[:150]))) for n, e in [
        ("lr", LogisticRegression(max_iter=500)), ("nb", GaussianNB()),
        ("tree", DecisionTreeClassifier(max_depth=3, random_state=0))]]
    fits, attached = {}, {}
    real = bilevel.attach_choquet_derivatives
    for on in (True, False):
        monkeypatch.setattr(choquet_analytic, "CHOQUET_ANALYTIC", on)
        answers = []
        monkeypatch.setattr(bilevel, "attach_choquet_derivatives",
                            lambda *a, **k: answers.append(real(*a, **k)) or answers[-1])
        clf = AggregatedClassifier(pool, aggregator=Choquet(**params), random_state=0)
        fits[on] = clf.fit(X[150:], y[150:])
        attached[on] = "" in answers
    # The closed form served the first fit (and only it): the two are not the same path.
    assert attached == {True: True, False: False}
    closed, auto = fits[True], fits[False]
    assert closed.tuning_history_.attrs["exact_hessian"]
    np.testing.assert_allclose(closed.validation_loss_, auto.validation_loss_, rtol=1e-6)
    np.testing.assert_allclose(closed.predict_proba(X[:150]), auto.predict_proba(X[:150]),
                               rtol=1e-5, atol=1e-7)


def test_not_attached_above_the_feature_bound(monkeypatch):
    full, ctx = _data("classification", 3, False)
    monkeypatch.setattr(choquet_analytic, "MAX_FEATURE_ENTRIES", 100)
    agg = Choquet()
    joint, _, _ = make_fold_problems(agg, ctx, _folds(full), _space(agg, ctx))
    assert joint.inner_value_grad is None and joint.inner_hessian is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("share", ["global", "per_class"])
def test_callables_equal_autograd_on_cuda(share):
    full, ctx = _data("classification", 4, True, device="cuda")
    agg = Choquet(share=share)
    space = HyperSpace(agg.hyperparameters(ctx), {}, ctx.device, DT)
    folds = [(full.take(tr.to(ctx.device)), full.take(va.to(ctx.device)))
             for tr, va in ((torch.arange(0, 60), torch.arange(60, 80)),
                            (torch.arange(20, 80), torch.arange(0, 20)))]
    joint, _, _ = make_fold_problems(agg, ctx, folds, space)
    assert joint.inner_hessian is not None
    plain = _plain(joint)
    theta = 0.1 * torch.arange(joint.theta0.numel(), dtype=DT, device=ctx.device).sin()
    u = space.initial() + 0.5
    torch.testing.assert_close(joint.inner_value_grad(theta, u)[1],
                               plain.inner_grad(theta, u), rtol=0, atol=ATOL)
    with torch.enable_grad():
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(plain.inner_loss(th, u), th, create_graph=True)
        ref = hessian_blocks(g, th, block_sizes(plain, theta))
    torch.testing.assert_close(joint.inner_hessian(theta, u), ref.detach(), rtol=0, atol=ATOL)
