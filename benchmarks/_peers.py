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

References
----------
R. Caruana, A. Niculescu-Mizil, G. Crew, A. Ksikes, "Ensemble selection from
libraries of models", ICML 2004.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

__all__ = [
    "EPS",
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
