"""Peer baselines of ``bench_vs_sklearn.py`` that work on stored probabilities.

Every function here takes the base models' class probabilities on the
aggregation rows, ``P`` of shape ``(n_models, n_rows, n_classes)`` (columns in
the order of ``classes``), and the labels encoded as ``0 .. n_classes - 1``,
and returns a weight vector over the models. The ensemble's probabilities on
new rows are ``sum_m w_m P_m`` (:func:`blend`).

* :func:`best_single` — the model with the lowest log-loss (a one-hot weight).
* :func:`uniform` — equal weights.
* :func:`caruana_selection` — greedy ensemble selection with replacement
  (Caruana et al., 2004), the method AutoGluon's ``WeightedEnsembleModel``
  uses.
* :func:`softmax_weights_lbfgs` — convex weights ``softmax(a)`` minimising the
  log-loss, fitted by SciPy's L-BFGS-B with the analytic gradient; no
  regularisation, no tuning.

The regression counterparts (``*_sq``) take the models' predictions ``P`` of
shape ``(n_models, n_rows, n_targets)`` and real targets ``y`` of shape
``(n_rows, n_targets)``, and minimise the mean squared error instead.

:class:`BbaiLogisticClassifier` and :class:`BbaiRidgeRegressor` wrap bbai's
GLMs (optional; tuned by approximate leave-one-out CV, Burn 2020) as
scikit-learn estimators, so that they can be a stacking's final estimator.
The rest of the module holds what several benchmarks share: the torch
warm-up, the library's version, and a timer.

References
----------
R. Caruana, A. Niculescu-Mizil, G. Crew, A. Ksikes, "Ensemble selection from
libraries of models", ICML 2004.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

__all__ = [
    "EPS",
    "BbaiLogisticClassifier",
    "BbaiRidgeRegressor",
    "best_single_sq",
    "caruana_selection_sq",
    "convex_weights_sq",
    "bbai_available",
    "library_version",
    "load_average",
    "rmse",
    "timed",
    "warm_up",
    "best_single",
    "blend",
    "caruana_selection",
    "log_loss_encoded",
    "softmax_weights_lbfgs",
    "uniform",
]

#: Probabilities are clipped to ``[EPS, 1]`` before the logarithm, as
#: ``sklearn.metrics.log_loss`` does with the float64 machine epsilon.
EPS = float(np.finfo(np.float64).eps)


def log_loss_encoded(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of encoded labels ``y`` under ``proba``.

    Parameters
    ----------
    proba : ndarray of shape (n_rows, n_classes)
    y : ndarray of int of shape (n_rows,)

    Returns
    -------
    float
    """
    p = proba[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(p, EPS, 1.0))))


def blend(P: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted average ``sum_m w_m P_m`` of the models' probabilities.

    Parameters
    ----------
    P : ndarray of shape (n_models, n_rows, n_classes)
    w : ndarray of shape (n_models,)

    Returns
    -------
    ndarray of shape (n_rows, n_classes)
    """
    return np.tensordot(np.asarray(w, dtype=float), P, axes=1)


def best_single(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One-hot weight on the model with the lowest log-loss on ``(P, y)``."""
    losses = [log_loss_encoded(p, y) for p in P]
    w = np.zeros(len(P))
    w[int(np.argmin(losses))] = 1.0
    return w


def uniform(P: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Equal weights (nothing is fitted)."""
    return np.full(len(P), 1.0 / len(P))


def caruana_selection(P: np.ndarray, y: np.ndarray, n_rounds: int = 50) -> np.ndarray:
    """Greedy ensemble selection with replacement (Caruana et al., 2004).

    Starting from an empty ensemble, each round adds (again, if already
    chosen) the model whose addition gives the lowest log-loss of the
    averaged probabilities; the weights are the selection counts divided by
    ``n_rounds``. As in AutoGluon's implementation, the running sum is
    updated incrementally, so a round costs one blend per model; ties go to
    the first model (deterministic, where AutoGluon draws at random).

    Parameters
    ----------
    P : ndarray of shape (n_models, n_rows, n_classes)
    y : ndarray of int of shape (n_rows,)
    n_rounds : int, default=50

    Returns
    -------
    ndarray of shape (n_models,)
        Non-negative weights summing to one.
    """
    n_models = len(P)
    rows = np.arange(len(y))
    # Only the true-class column enters the log-loss of a blend.
    P_true = P[:, rows, y]  # (n_models, n_rows)
    running = np.zeros(len(y))
    counts = np.zeros(n_models)
    for k in range(1, n_rounds + 1):
        cand = (running[None, :] + P_true) / k  # every model tried at once
        losses = -np.mean(np.log(np.clip(cand, EPS, 1.0)), axis=1)
        best = int(np.argmin(losses))
        counts[best] += 1
        running += P_true[best]
    return counts / n_rounds


def softmax_weights_lbfgs(
    P: np.ndarray, y: np.ndarray, *, max_iter: int = 500, tol: float = 1e-10
) -> np.ndarray:
    """Convex weights ``softmax(a)`` minimising the log-loss, by L-BFGS-B.

    The objective ``-mean_i log(sum_m w_m P_m[i, y_i])`` is convex in ``w``
    (not in ``a``, but the softmax map has no spurious minima here); it is
    started at the uniform average and given its exact gradient. No penalty
    and no hyperparameter: this is the untuned counterpart of hyperagg's
    ``LearnedWeights``.

    Parameters
    ----------
    P : ndarray of shape (n_models, n_rows, n_classes)
    y : ndarray of int of shape (n_rows,)
    max_iter : int, default=500
    tol : float, default=1e-10
        ``ftol`` / ``gtol`` of SciPy's L-BFGS-B.

    Returns
    -------
    ndarray of shape (n_models,)
    """
    P_true = P[:, np.arange(len(y)), y]  # (n_models, n_rows)

    def fun(a: np.ndarray) -> tuple[float, np.ndarray]:
        e = np.exp(a - a.max())
        w = e / e.sum()
        p = np.clip(w @ P_true, EPS, None)
        loss = -np.mean(np.log(p))
        g_w = -np.mean(P_true / p, axis=1)  # d loss / d w
        g_a = w * (g_w - w @ g_w)  # softmax Jacobian
        return float(loss), g_a

    res = minimize(
        fun, np.zeros(len(P)), jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter, "ftol": tol, "gtol": tol},
    )
    e = np.exp(res.x - res.x.max())
    return e / e.sum()


# -- regression ----------------------------------------------------------------------
def _as_3d(P: np.ndarray) -> np.ndarray:
    P = np.asarray(P, dtype=float)
    return P[:, :, None] if P.ndim == 2 else P


def _as_2d(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    return y[:, None] if y.ndim == 1 else y


def chosen_aggregator(est) -> str:
    """The aggregation function a fitted estimator holds, by the name ``candidates_``
    gives it under ``aggregator="auto"`` (``"single"`` for the best single model,
    which is greedy selection of one round), else its short name."""
    cands = getattr(est, "candidates_", None)
    if cands is not None:
        return str(cands.index[cands["chosen"]][0])
    agg = est.aggregator_
    return getattr(agg, "short_name", None) or type(agg).__name__


def rmse(pred: np.ndarray, y: np.ndarray) -> float:
    """Root mean squared error over all rows and targets."""
    return float(np.sqrt(np.mean((_as_2d(pred) - _as_2d(y)) ** 2)))


def best_single_sq(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One-hot weight on the model with the lowest mean squared error."""
    P, y = _as_3d(P), _as_2d(y)
    losses = np.mean((P - y[None]) ** 2, axis=(1, 2))
    w = np.zeros(len(P))
    w[int(np.argmin(losses))] = 1.0
    return w


def caruana_selection_sq(P: np.ndarray, y: np.ndarray, n_rounds: int = 50) -> np.ndarray:
    """Greedy ensemble selection with replacement on the mean squared error.

    As :func:`caruana_selection`, with the squared error of the averaged
    predictions as the criterion (what AutoGluon uses for regression).
    """
    P, y = _as_3d(P), _as_2d(y)
    running = np.zeros_like(y)
    counts = np.zeros(len(P))
    for k in range(1, n_rounds + 1):
        cand = (running[None] + P) / k
        losses = np.mean((cand - y[None]) ** 2, axis=(1, 2))
        best = int(np.argmin(losses))
        counts[best] += 1
        running += P[best]
    return counts / n_rounds


def convex_weights_sq(
    P: np.ndarray, y: np.ndarray, *, max_iter: int = 500, tol: float = 1e-10
) -> np.ndarray:
    """Convex weights ``softmax(a)`` minimising the mean squared error, by L-BFGS-B.

    The regression counterpart of :func:`softmax_weights_lbfgs`: untuned,
    unregularised, started at the uniform average.
    """
    P, y = _as_3d(P), _as_2d(y)
    flat = P.reshape(len(P), -1)  # (n_models, n_rows * n_targets)
    target = y.ravel()

    def fun(a: np.ndarray) -> tuple[float, np.ndarray]:
        e = np.exp(a - a.max())
        w = e / e.sum()
        resid = w @ flat - target
        loss = np.mean(resid**2)
        g_w = 2.0 * flat @ resid / len(target)
        return float(loss), w * (g_w - w @ g_w)

    res = minimize(
        fun, np.zeros(len(P)), jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter, "ftol": tol, "gtol": tol},
    )
    e = np.exp(res.x - res.x.max())
    return e / e.sum()


# -- bbai's GLMs as scikit-learn estimators ------------------------------------------
class BbaiLogisticClassifier(ClassifierMixin, BaseEstimator):
    """bbai's ``LogisticRegression`` with its C tuned by approximate LOO-CV.

    bbai's estimators have ``get_params`` but no scikit-learn tags, which
    ``StackingClassifier`` needs; this adapter only forwards ``fit`` and
    ``predict_proba``.
    """

    def fit(self, X, y):
        from bbai.glm import LogisticRegression

        self.model_ = LogisticRegression().fit(np.asarray(X, dtype=float), y)
        self.classes_ = np.asarray(self.model_.classes_)
        self.C_ = self.model_.C_
        return self

    def predict_proba(self, X):
        return self.model_.predict_proba(np.asarray(X, dtype=float))

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class BbaiRidgeRegressor(RegressorMixin, BaseEstimator):
    """bbai's ``RidgeRegression`` with its alpha tuned by exact LOO-CV."""

    def fit(self, X, y):
        from bbai.glm import RidgeRegression

        self.model_ = RidgeRegression().fit(np.asarray(X, dtype=float), y)
        self.alpha_ = self.model_.alpha_
        return self

    def predict(self, X):
        return self.model_.predict(np.asarray(X, dtype=float))


def bbai_available() -> str | None:
    """``None`` if bbai imports, else why not (its rows are then skipped)."""
    try:
        import bbai.glm  # noqa: F401
    except ImportError as e:
        return f"bbai not importable ({e}); its rows are skipped"
    return None


# -- shared by the benchmarks --------------------------------------------------------
def timed(fit: Callable, repeats: int = 3, short: float = 1.0):
    """Run ``fit()`` once (the result evaluated); repeat fits under ``short``
    seconds up to ``repeats`` times in all. Returns ``(result, median seconds,
    runs, warning categories)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        result = fit()
        times = [time.perf_counter() - t0]
        while times[0] < short and len(times) < repeats:
            t0 = time.perf_counter()
            fit()
            times.append(time.perf_counter() - t0)
    kinds = sorted({w.category.__name__ for w in caught})
    return result, statistics.median(times), len(times), kinds


def warm_up(seed: int = 0) -> float:
    """One small untimed fit of each of our default, stacking and weights,
    so that torch's one-time start-up cost (first autograd and L-BFGS calls,
    about 1 s) is not charged to the first method timed."""
    from sklearn.datasets import make_classification
    from sklearn.frozen import FrozenEstimator
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB

    from aggregators import AggregatedClassifier

    X, y = make_classification(
        150, 5, n_informative=3, n_redundant=0, n_classes=3, random_state=seed
    )
    pool = [
        ("lr", FrozenEstimator(LogisticRegression().fit(X, y))),
        ("nb", FrozenEstimator(GaussianNB().fit(X, y))),
    ]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AggregatedClassifier(pool, random_state=seed).fit(X, y)
        for agg in ("stacking", "weights"):
            AggregatedClassifier(pool, aggregator=agg, random_state=seed).fit(X, y)
    return time.perf_counter() - t0


def library_version() -> str:
    """Commit of the checkout, and whether the library has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "aggregators", "base_models"], cwd=root,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted library changes" if dirty else "")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
