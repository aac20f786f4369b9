"""Learnable representable uninorms (Melnikov & Hüllermeier, ECML PKDD 2016).

A uninorm ``U: [0, 1]^2 -> [0, 1]`` is associative, commutative, monotone and
has a neutral element ``e`` (``U(x, e) = x``); it is conjunctive on
``[0, e]^2`` (``U <= min``: two weak supports weaken each other) and
disjunctive on ``[e, 1]^2`` (``U >= max``: two strong supports reinforce each
other), and lies between min and max elsewhere (Yager & Rybalov 1996).
*Representable* uninorms are ``U(x, y) = g^{-1}(g(x) + g(y))`` with an
increasing additive generator ``g``, ``g(e) = 0``. Here

    g(x) = logit(x) - logit(e),

the cross-ratio family: ``U(x, y) = (1 - e) x y / ((1 - e) x y + e (1 - x)(1 - y))``
(``e = 1/2``: ``x y / (x y + (1 - x)(1 - y))``). Its log-odds add up, so for
probabilities it is Bayes' rule for conditionally independent experts with
prior odds ``e / (1 - e)``. On the corners ``{(0, 1), (1, 0)}`` (where
``g`` gives ``-inf + inf``) the conjunctive convention ``U = 0`` is used.

The n-ary *weighted* form scales each generator value by ``w_i >= 0``:
``U_w(x) = g^{-1}(sum_i w_i g(x_i))``. With every ``w_i = 1`` it is the n-ary
uninorm (associativity); with every ``w_i >= 1`` it is still conjunctive on
``[0, e]^m`` and disjunctive on ``[e, 1]^m``; with ``sum_i w_i = 1`` it is an
averaging function (a weighted mean of log-odds). It is monotone for any
weights, and an input equal to ``e`` never changes the output.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ._base import AggregationContext, Aggregator, Hyperparameter, Params
from ._outputs import (
    affine_params,
    from_unit_interval,
    logistic_log_scores,
    unit_interval_scale,
)

__all__ = ["Uninorm", "uninorm", "weighted_uninorm"]


def _check_e(e) -> np.ndarray:
    e = np.asarray(e, dtype=np.float64)
    if np.any(~(e > 0)) or np.any(~(e < 1)):
        raise ValueError(f"the neutral element e must lie in (0, 1); got {e!r}.")
    return e


def uninorm(x, y, e=0.5) -> np.ndarray:
    """Representable (cross-ratio) uninorm with neutral element ``e``.

    ``U(x, y) = (1 - e) x y / ((1 - e) x y + e (1 - x)(1 - y))``, i.e.
    ``logit U = logit x + logit y - logit e``, with ``U(0, 1) = U(1, 0) = 0``.

    Parameters
    ----------
    x, y : array-like
        Inputs in ``[0, 1]`` (broadcast together).
    e : float or array-like, default=0.5
        Neutral element in ``(0, 1)``.

    Returns
    -------
    ndarray

    Examples
    --------
    >>> from aggregators.uninorm import uninorm
    >>> float(uninorm(0.3, 0.5))  # e = 1/2 is neutral
    0.3
    >>> round(float(uninorm(0.8, 0.8)), 6)  # two supports reinforce each other
    0.941176
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    e = _check_e(e)
    # Products of x and y first: the result is then exactly commutative in floats.
    num = (1 - e) * (x * y)
    den = num + e * ((1 - x) * (1 - y))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    return np.where(den > 0, out, 0.0)  # den = 0 only on the corners {(0, 1), (1, 0)}


def weighted_uninorm(x, e=0.5, weights=None, axis=-1) -> np.ndarray:
    """n-ary weighted representable uninorm ``g^{-1}(sum_i w_i g(x_i))``.

    ``g(x) = logit(x) - logit(e)``. With unit weights this is the n-ary
    uninorm (``uninorm`` folded over the inputs). An input ``x_i = 0`` with
    ``w_i > 0`` makes the output 0 (conjunctive convention, also when
    another input is 1); otherwise an input 1 with ``w_i > 0`` makes it 1.
    Inputs with ``w_i = 0`` are ignored.

    Parameters
    ----------
    x : array-like of shape (..., m, ...)
        Inputs in ``[0, 1]``; ``axis`` runs over the inputs.
    e : float, default=0.5
        Neutral element in ``(0, 1)``.
    weights : array-like of shape (m,), default=None
        Nonnegative weights; ``None``: all 1.
    axis : int, default=-1

    Returns
    -------
    ndarray

    Examples
    --------
    >>> from aggregators.uninorm import weighted_uninorm
    >>> round(float(weighted_uninorm([0.8, 0.8, 0.5])), 6)
    0.941176
    >>> round(float(weighted_uninorm([0.8, 0.2], weights=[2.0, 1.0])), 6)
    0.8
    """
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    e = float(_check_e(e))
    w = np.ones(x.shape[-1]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (x.shape[-1],) or np.any(~(w >= 0)):
        raise ValueError(
            f"weights must be {x.shape[-1]} nonnegative numbers, one per input; got {weights!r}."
        )
    active = w > 0
    xa, wa = x[..., active], w[active]
    with np.errstate(divide="ignore"):
        g = np.log(xa) - np.log1p(-xa) - (math.log(e) - math.log1p(-e))
    zero = np.any(xa == 0, axis=-1)
    one = np.any(xa == 1, axis=-1)
    inner = np.where((xa == 0) | (xa == 1), 0.0, g)
    s = (wa * inner).sum(-1) + math.log(e) - math.log1p(-e)
    out = 1.0 / (1.0 + np.exp(-s))
    return np.where(zero, 0.0, np.where(one, 1.0, out))


class Uninorm(Aggregator):
    """Weighted representable uninorm of the base models' probabilities.

    For each class ``c`` with base probabilities ``p_ic``, shrunk towards
    1/2 as ``x_i = s + (1 - 2 s) p_ic``, the aggregate is

        U(x) = g^{-1}(sum_i w_i g(x_i)),  g(x) = logit(x) - logit(e),

    i.e. ``logit U = logit(e) + sum_i w_i (logit(x_i) - logit(e))``, with a
    learned neutral element ``e in (0, 1)`` (shared by all classes) and
    learned per-model weights ``w_i = min_weight + exp(a_i)``. A model that
    outputs ``e`` has no effect; models above ``e`` push the output up,
    models below it push it down, and (for ``sum_i w_i > 1``) agreeing models
    reinforce each other beyond any single one: conjunctive below ``e``,
    disjunctive above. ``sum_i w_i < 1`` shrinks towards ``e`` (averaging and
    tempering). With ``min_weight=1`` every ``w_i >= 1``, so the aggregate is
    guaranteed to be conjunctive on ``[0, e]^m`` and disjunctive on
    ``[e, 1]^m``; with all ``w_i = 1`` it is an n-ary uninorm.

    Output map: binary classifiers aggregate the positive class and use
    ``P(y = 1) = U(p_11, ..., p_m1)`` directly (log-scores ``[0, logit
    U]``; aggregating the negative class instead gives the same model with
    neutral element ``1 - e``). With ``C > 2`` classes ``P(y = c) ∝ U_c``
    (log-scores ``log U_c``). Regressors: the standardised predictions are
    mapped into ``(0, 1)`` by one affine map per target fitted on the
    training rows (minimum and maximum over rows and models, widened by
    ``margin`` on each side), and the output mapped back as ``lo + span (a U
    + b)`` with learned ``a > 0`` and ``b``.

    Start: ``w_i = min_weight + 1 / m`` and ``e = e_0`` (for ``min_weight=0``
    the average of the models' log-odds). Hyperparameters tuned by
    hypergradient: ``shrink`` (``s`` above: base models that output exact 0
    or 1, such as pure tree leaves, have infinite log-odds, and one of them
    would decide the aggregate alone; ``s`` bounds every ``|g(x_i)|`` by
    ``log((1 - s) / s)`` plus ``|logit e|``, and its tuning sets how far a
    confident model is trusted), ``l2`` (pulls ``log(w_i - min_weight)`` towards
    ``log(1 / m)``, i.e. towards equal weights summing to about 1) and
    ``neutral`` (pulls ``logit(e)`` towards ``logit(e_0)``, ``e_0 = 1 /
    n_classes`` for classifiers, ``1 / 2`` for regressors, or
    ``neutral_prior``; it also pins ``e`` down where the data cannot: when
    ``sum_i w_i = 1``, ``e`` has no effect).

    Parameters
    ----------
    min_weight : float, default=0.0
        Lower bound of every weight (``>= 0``).
    neutral_prior : float or "auto", default="auto"
        ``e_0``: the start of ``e`` and the value ``neutral`` pulls it to.
    l2 : float, default=1e-2
        Initial L2 weight on the log-weights.
    neutral : float, default=1e-2
        Initial weight of the pull of ``logit(e)`` towards ``logit(e_0)``.
    shrink : float, default=1e-2
        Initial ``s``.
    shrink_bounds : tuple of float, default=(1e-6, 0.2)
        Range ``s`` is tuned in (log scale).
    margin : float, default=0.05
        Regressors: widening of the training range, as a fraction of it.

    Attributes
    ----------
    neutral_element_ : float
        On the fitted copy ``estimator.aggregator_``: the learned ``e``.
    weights_ : Series
        The learned ``w_i``, indexed by base-model name.

    See Also
    --------
    uninorm, weighted_uninorm

    References
    ----------
    V. Melnikov, E. Hüllermeier, "Learning to aggregate using uninorms",
    ECML PKDD 2016, LNCS 9852, pp. 756-771.
    R. R. Yager, A. Rybalov, "Uninorm aggregation operators", Fuzzy Sets and
    Systems 80 (1996).

    Examples
    --------
    >>> from aggregators import AggregatedClassifier
    >>> from aggregators.uninorm import Uninorm
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.naive_bayes import GaussianNB
    >>> from sklearn.tree import DecisionTreeClassifier
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> clf = AggregatedClassifier(
    ...     [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=3))],
    ...     aggregator=Uninorm(), cv=None, random_state=0).fit(X, y)
    >>> list(clf.aggregator_.weights_.index)
    ['nb', 'tree']
    >>> 0 < clf.aggregator_.neutral_element_ < 1
    True
    """

    short_name = "uninorm"

    def __init__(
        self,
        *,
        min_weight: float = 0.0,
        neutral_prior="auto",
        l2: float = 1e-2,
        neutral: float = 1e-2,
        shrink: float = 1e-2,
        shrink_bounds: tuple = (1e-6, 0.2),
        margin: float = 0.05,
    ):
        self.min_weight = min_weight
        self.neutral_prior = neutral_prior
        self.l2 = l2
        self.neutral = neutral
        self.shrink = shrink
        self.shrink_bounds = shrink_bounds
        self.margin = margin

    def check_task(self, ctx: AggregationContext) -> None:
        if not (isinstance(self.min_weight, (int, float)) and self.min_weight >= 0):
            raise ValueError(f"min_weight must be a number >= 0; got {self.min_weight!r}.")
        if self.neutral_prior != "auto" and not (
            isinstance(self.neutral_prior, (int, float)) and 0 < self.neutral_prior < 1
        ):
            raise ValueError(
                f"neutral_prior must be 'auto' or a number in (0, 1); got "
                f"{self.neutral_prior!r}."
            )
        lo, hi = self.shrink_bounds
        if not (0 < lo <= hi < 0.5):
            raise ValueError(
                f"shrink_bounds must be (low, high) with 0 < low <= high < 0.5; got "
                f"{self.shrink_bounds!r}."
            )

    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        lo, hi = self.shrink_bounds
        return [
            Hyperparameter("shrink", self.shrink, lo, hi),
            Hyperparameter("l2", self.l2, 1e-6, 1e2, penalty=True),
            Hyperparameter("neutral", self.neutral, 1e-6, 1e2, penalty=True),
        ]

    def _prior(self, ctx: AggregationContext) -> float:
        if self.neutral_prior != "auto":
            return float(self.neutral_prior)
        return 1.0 / ctx.n_outputs if ctx.task == "classification" else 0.5

    def fit_buffers(self, ctx, Z, y, X=None) -> Params:
        e0 = self._prior(ctx)
        out = {
            "prior_logit": ctx.full((1,), math.log(e0) - math.log1p(-e0)),
        }
        if ctx.task == "regression":
            lo, span = unit_interval_scale(Z)
            out["x_low"] = lo - self.margin * span
            out["x_span"] = span * (1 + 2 * self.margin)
        return out

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        return {
            "log_weight": ctx.full((ctx.n_models,), -math.log(ctx.n_models)),
            "neutral_logit": ctx.zeros(1),  # logit(e) - logit(e_0)
            **(affine_params(ctx) if ctx.task == "regression" else {}),
        }

    def _logit_u(self, params: Params, hyper: Params, x: torch.Tensor) -> torch.Tensor:
        """``logit U`` of ``x (n, m, c)`` over the model axis -> ``(n, c)``."""
        s = hyper["shrink"][0]
        x = s + (1 - 2 * s) * x.clamp(0.0, 1.0)
        c = params["prior_logit"] + params["neutral_logit"]  # logit(e), (1,)
        w = self.min_weight + torch.exp(params["log_weight"])  # (m,)
        g = torch.log(x) - torch.log1p(-x) - c
        return c + torch.einsum("nmc,m->nc", g, w)

    def forward(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        if self._classifier:
            x = Z[:, :, 1:2] if self._binary else Z
            return logistic_log_scores(self._logit_u(params, hyper, x), self._binary)
        lo, span = params["x_low"], params["x_span"]
        u = torch.sigmoid(self._logit_u(params, hyper, (Z - lo) / span))
        return from_unit_interval(params, u)

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        ref = -math.log(params["log_weight"].shape[0])  # equal weights summing to 1
        pen = 0.5 * hyper["l2"][0] * (params["log_weight"] - ref).pow(2).sum()
        pen = pen + 0.5 * hyper["neutral"][0] * params["neutral_logit"].pow(2).sum()
        if not self._classifier:
            pen = pen + 0.5 * hyper["l2"][0] * (
                params["log_scale"].pow(2).sum() + params["offset"].pow(2).sum()
            )
        return pen

    # -- readable views of the fitted state ---------------------------------------
    @property
    def neutral_element_(self) -> float:
        """The learned neutral element ``e``."""
        self._check_fitted()
        c = float(self.buffers_["prior_logit"][0] + self.params_["neutral_logit"][0])
        return float(1.0 / (1.0 + math.exp(-c)))

    @property
    def weights_(self) -> pd.Series:
        """The learned weights ``w_i``, indexed by base-model name."""
        self._check_fitted()
        w = self.min_weight + np.exp(np.asarray(self.params_["log_weight"], dtype=np.float64))
        return pd.Series(w, index=self.model_names_, name="weight")

    def aggregate(self, x) -> np.ndarray:
        """The fitted weighted uninorm of ``x`` (..., m), over the last axis.

        Inputs are shrunk by the tuned ``s`` first, as in the forward pass.

        Parameters
        ----------
        x : array-like of shape (..., n_models)
            Inputs in ``[0, 1]`` (e.g. one class's probabilities).

        Returns
        -------
        ndarray of shape (...)
        """
        self._check_fitted()
        s = float(self.hyperparams_["shrink"])
        x = s + (1 - 2 * s) * np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
        return weighted_uninorm(x, self.neutral_element_, self.weights_.to_numpy())
