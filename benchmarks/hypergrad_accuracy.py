"""Accuracy and cost of each hypergradient method of ``aggregators.hypergrad``.

Prints one table: for each method, the relative error of ``dQ/dh``

* on ridge regression against its closed form (``h = log lam``; one shared
  lambda at ``log lam = 0``, and one lambda per feature), and
* on logistic stacking (``Stacking``, per-model log-L2 vector) and learned
  weights (``LearnedWeights``: log temperature, L2, entropy) over four
  scikit-learn models' probabilities on ``load_breast_cancer``, against central
  finite differences of the validation loss at re-solved, Newton-polished
  inner optima,

with the median wall time of one call. The implicit and truncated methods are
given the inner optimum (their usual setting inside ``tune``); full reverse
mode starts from the problem's ``theta0`` and pays for its own unrolling.
Everything is float64 on the CPU.

Run: ``python benchmarks/hypergrad_accuracy.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from aggregators import LearnedWeights, Stacking
from aggregators._base import AggregationContext
from aggregators._bilevel import HyperSpace, Split, make_problem
from aggregators.hypergrad import BilevelProblem, hypergradient, solve_inner

DT = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- ridge: closed forms -------------------------------------------------------------------
def ridge_problem(n: int = 40, n_val: int = 200, p: int = 10, seed: int = 0):
    """Ridge with training singular values in [2, 10] (Hessian eigenvalues [4, 100] + lam)."""
    g = torch.Generator().manual_seed(seed)

    def orth(k):
        return torch.linalg.qr(torch.randn(k, k, generator=g, dtype=DT))[0]

    X = orth(n)[:, :p] @ torch.diag(torch.linspace(2, 10, p, dtype=DT)) @ orth(p).T
    w = torch.randn(p, generator=g, dtype=DT)
    y = X @ w + 1.5 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(n_val, p, generator=g, dtype=DT) @ torch.diag(
        torch.linspace(0.3, 1.5, p, dtype=DT)
    )
    yv = Xv @ w + 1.5 * torch.randn(n_val, generator=g, dtype=DT)

    def inner(t, h):
        return 0.5 * (X @ t - y).pow(2).sum() + 0.5 * (torch.exp(h) * t.pow(2)).sum()

    def outer(t, h):
        return (Xv @ t - yv).pow(2).mean()

    def closed_form(h):
        A = X.T @ X + torch.diag(torch.exp(h) * torch.ones(p, dtype=DT))
        th = torch.linalg.solve(A, X.T @ y)
        g_theta = 2.0 * Xv.T @ (Xv @ th - yv) / n_val
        per_feature = -torch.exp(h) * torch.linalg.solve(A, g_theta) * th
        return th, per_feature.sum().reshape(1) if h.numel() == 1 else per_feature

    return BilevelProblem(inner, outer, torch.zeros(p, dtype=DT)), closed_form


# -- aggregators over real base-model probabilities -------------------------------------
def pool_outputs():
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    X, y = load_breast_cancer(return_X_y=True)
    Xp, Xa, yp, ya = train_test_split(X, y, test_size=0.6, random_state=0, stratify=y)
    models = [
        make_pipeline(StandardScaler(), LogisticRegression(C=0.01)),
        GaussianNB(),
        DecisionTreeClassifier(max_depth=2, random_state=0),
        KNeighborsClassifier(15),
    ]
    Z = np.stack([m.fit(Xp, yp).predict_proba(Xa) for m in models], axis=1)
    idx = np.random.RandomState(0).permutation(len(ya))
    tr, va = idx[: len(ya) // 2], idx[len(ya) // 2 :]
    Zt, yt = torch.as_tensor(Z, dtype=DT), torch.as_tensor(ya)
    ctx = AggregationContext(
        task="classification", n_models=4, n_outputs=2, n_features=X.shape[1],
        model_names=["lr", "nb", "tree", "knn"], classes=np.arange(2),
    )
    return ctx, Split(Zt[tr], yt[tr]), Split(Zt[va], yt[va])


def aggregator_problem(agg, pool):
    ctx, train, val = pool
    space = HyperSpace(agg.hyperparameters(ctx), {}, torch.device("cpu"), DT)
    prob, _, _ = make_problem(agg, ctx, train, val, space)
    return prob, space.initial()


def newton_polish(prob, theta, h, steps: int = 2):
    """Dense Newton steps (least squares: the softmax intercepts have a null direction)."""
    for _ in range(steps):
        H = torch.autograd.functional.hessian(lambda t: prob.inner_loss(t, h), theta)
        g = prob.inner_grad(theta, h)
        theta = theta - torch.linalg.lstsq(H, g[:, None], rcond=1e-12).solution[:, 0]
    return theta


def exact_optimum(prob, h, theta0=None):
    theta, _, _ = solve_inner(prob, h, theta0, max_iter=5000, tol=1e-10)
    return newton_polish(prob, theta, h)


def finite_difference(prob, h, theta, eps: float):
    fd = torch.zeros_like(h)
    for i in range(h.numel()):
        e = torch.zeros_like(h)
        e[i] = eps
        qp = prob.outer_loss(exact_optimum(prob, h + e, theta), h + e)
        qm = prob.outer_loss(exact_optimum(prob, h - e, theta), h - e)
        fd[i] = (qp - qm) / (2 * eps)
    return fd


# -- the table -------------------------------------------------------------------------------
METHODS = [
    ("IFT-CG", "implicit-cg", {"max_iter": 500, "tol": 1e-12}),
    ("IFT-Neumann 10", "implicit-neumann", {"n_terms": 10}),
    ("IFT-Neumann 50", "implicit-neumann", {"n_terms": 50}),
    ("IFT-Neumann 200", "implicit-neumann", {"n_terms": 200}),
    ("reverse 100", "reverse", {"n_steps": 100}),
    ("reverse 1000", "reverse", {"n_steps": 1000}),
    ("truncated reverse K=20", "truncated-reverse", {"n_steps": 20}),
]


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main(repeats: int = 5) -> None:
    torch.manual_seed(0)
    cases = []  # (column name, problem, h, theta*, reference, note)

    prob, closed = ridge_problem()
    for name, h in [
        ("ridge lam", torch.tensor([0.0], dtype=DT)),
        ("ridge lam/feature", torch.linspace(-1.0, 2.0, 10, dtype=DT)),
    ]:
        th, ref = closed(h)
        cases.append((name, prob, h, th, ref))

    pool = pool_outputs()
    fd_notes = []
    for name, agg in [
        ("stacking l2/model", Stacking(l2=[1e-2, 1e-1, 1e-3, 3e-2])),
        ("weights T,l2,ent", LearnedWeights(temperature=0.7, l2=1e-2, entropy=1e-3)),
    ]:
        p, h = aggregator_problem(agg, pool)
        th = exact_optimum(p, h)
        t0 = time.perf_counter()
        fd = finite_difference(p, h, th, 1e-4)
        t_fd = time.perf_counter() - t0
        fd_coarse = finite_difference(p, h, th, 1e-3)
        fd_notes.append(
            f"  {name}: FD (step 1e-4, {2 * h.numel()} re-solves, {t_fd:.2f} s); "
            f"FD step 1e-3 vs 1e-4 differ by {rel_err(fd_coarse, fd):.1e} (relative)"
        )
        cases.append((name, p, h, th, fd))

    # Also the realistic implicit setting: theta from L-BFGS at the engine's default tol.
    rows = []
    for label, method, opts in [("IFT-CG at L-BFGS theta (tol 1e-7)", "implicit-cg", {})] + METHODS:
        row = [label]
        for _, p, h, th, ref in cases:
            if label.startswith("IFT-CG at L-BFGS"):
                theta, _, _ = solve_inner(p, h)
            elif method == "reverse":
                theta = p.theta0
            else:
                theta = th
            res, sec = timed(lambda: hypergradient(p, theta, h, method, **opts), repeats)
            row.append((rel_err(res.grad, ref), sec))
        rows.append(row)

    names = [c[0] for c in cases]
    w0 = max(len(r[0]) for r in rows)
    head = f"{'method':<{w0}}" + "".join(f" | {n:^21}" for n in names)
    print("Relative error of dQ/dh (median wall time per call), float64, CPU")
    print("reference: closed form for ridge, central finite differences for the aggregators")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r[0]:<{w0}}" + "".join(f" | {e:9.2e} {1e3 * s:8.2f} ms" for e, s in r[1:]))
    print()
    print("Notes:")
    print("  ridge: Hessian eigenvalues in [4, 100] + lam; reverse steps and Neumann use")
    print("  alpha = lr = 1 / lambda_max (power iteration).")
    print("\n".join(fd_notes))
    for name, p, h, th, _ in cases[2:]:
        H = torch.autograd.functional.hessian(lambda t: p.inner_loss(t, h), th)
        ev = torch.linalg.eigvalsh(H)
        pos = ev[ev > 1e-10 * ev[-1]]
        print(f"  {name}: inner Hessian condition number (nonzero eigenvalues) "
              f"{float(pos[-1] / pos[0]):.0f}; dim theta = {th.numel()}, dim h = {h.numel()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats per cell")
    main(parser.parse_args().repeats)
