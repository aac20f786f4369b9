"""Learnable aggregation functions over the model axis (Pellegrini et al., 2021)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ._base import AggregationContext, Aggregator, Hyperparameter, Params

__all__ = ["LAF", "laf_unit"]

_EPS = 1e-6


def _log_l(logx: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log L_{a,b}(x) = a * log(sum_i x_i^b)`` over the last axis, in log space."""
    return a * torch.logsumexp(b * logx, dim=-1)


def laf_unit(x, params: dict, eps: float = _EPS) -> torch.Tensor:
    """One LAF unit over the last axis of ``x`` (FORMULAS.md).

    ``LAF(x) = [alpha L_ab(x) + beta L_cd(1-x)] / [gamma L_ef(x) + delta L_gh(1-x)]``
    with ``L_{a,b}(x) = (sum_i x_i^b)^a`` and inputs clamped to ``[eps, 1-eps]``.

    Parameters
    ----------
    x : array-like or Tensor of shape (..., m)
    params : dict
        Exponents ``a`` ... ``h`` (>= 0) and coefficients ``alpha``, ``beta``,
        ``gamma``, ``delta``; each a scalar or broadcastable tensor.
    eps : float, default=1e-6

    Returns
    -------
    Tensor of shape (...)

    Examples
    --------
    >>> import torch
    >>> from aggregators.laf import laf_unit
    >>> mean = dict(a=1, b=1, c=0, d=0, e=1, f=0, g=0, h=0,
    ...             alpha=1, beta=0, gamma=1, delta=0)
    >>> round(float(laf_unit(torch.tensor([0.2, 0.4, 0.9], dtype=torch.float64), mean)), 12)
    0.5
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.double()
    x = x.clamp(eps, 1 - eps)
    p = {k: torch.as_tensor(v, dtype=x.dtype, device=x.device) for k, v in params.items()}
    lx, l1x = torch.log(x), torch.log1p(-x)
    num = p["alpha"] * torch.exp(_log_l(lx, p["a"], p["b"])) + p["beta"] * torch.exp(
        _log_l(l1x, p["c"], p["d"])
    )
    den = p["gamma"] * torch.exp(_log_l(lx, p["e"], p["f"])) + p["delta"] * torch.exp(
        _log_l(l1x, p["g"], p["h"])
    )
    return num / den


# Starting units: mean, soft max, soft min, and mean again (to break symmetry
# while starting close to the average). Exponents in the order a..h.
_STARTS = [
    dict(a=1.0, b=1.0, c=0.0, d=0.0, e=1.0, f=0.0, g=0.0, h=0.0, alpha=1.0, beta=0.0),
    dict(a=1 / 4, b=4.0, c=0.0, d=0.0, e=0.0, f=0.0, g=0.0, h=0.0, alpha=1.0, beta=0.0),
    dict(a=0.0, b=0.0, c=1 / 4, d=4.0, e=0.0, f=0.0, g=0.0, h=0.0, alpha=1.0, beta=-1.0),
]
_EXPONENTS = "abcdefgh"


def _inv_softplus(v: float) -> float:
    v = max(v, 1e-4)  # softplus never reaches 0; 1e-4 is 0 for every practical input
    return v + math.log(-math.expm1(-v))


class LAF(Aggregator):
    """A convex mixture of learnable aggregation functions over the base models.

    Each unit is a LAF (Pellegrini et al. 2021) applied, class by class, to
    the base models' probabilities: it can express the mean, the max, the min
    and their mixtures and ratios. The class score is the mixture
    ``s_c = sum_u w_u LAF_u(p_{., c})`` and the class log-scores are
    ``log(s_c) / T``. Exponents are kept non-negative by a softplus, the
    denominator coefficients ``gamma, delta`` too (so the denominator never
    changes sign); ``alpha, beta`` are free. Units start as the mean, a soft
    max, a soft min and the mean, mixed mostly towards the mean.

    Regressors: the standardised predictions are mapped to ``(0, 1)`` by a
    sigmoid, aggregated, and mapped back by ``scale * logit(s) + offset``
    with learned ``scale`` and ``offset``.

    Hyperparameters tuned by hypergradient: ``l2`` (pulls every unit's
    parameters towards its start) and, for classifiers, the output
    ``temperature``.

    Parameters
    ----------
    n_units : int, default=4
        Number of LAF units (at least 1; the starts cycle through mean, max,
        min).
    l2 : float, default=1e-2
        Initial L2 weight.
    temperature : float, default=1.0
        Initial output temperature.
    temperature_bounds : tuple of float, default=(0.5, 2.0)
    eps : float, default=1e-6
        Inputs are clamped to ``[eps, 1 - eps]``.

    References
    ----------
    G. Pellegrini, A. Tibo, P. Frasconi, A. Passerini, M. Jaeger. Learning
    Aggregation Functions. IJCAI 2021.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.naive_bayes import GaussianNB
    >>> from aggregators import AggregatedClassifier
    >>> from aggregators.laf import LAF
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = AggregatedClassifier(
    ...     [("lr", LogisticRegression(max_iter=500)), ("nb", GaussianNB())],
    ...     aggregator=LAF(), random_state=0).fit(X, y)
    >>> clf.aggregator_.unit_weights_.shape
    (4,)
    """

    short_name = "laf"

    def __init__(
        self,
        n_units: int = 4,
        l2: float = 1e-2,
        temperature: float = 1.0,
        temperature_bounds: tuple = (0.5, 2.0),
        eps: float = _EPS,
    ):
        self.n_units = n_units
        self.l2 = l2
        self.temperature = temperature
        self.temperature_bounds = temperature_bounds
        self.eps = eps

    def check_task(self, ctx: AggregationContext) -> None:
        if not isinstance(self.n_units, (int, np.integer)) or self.n_units < 1:
            raise ValueError(f"n_units must be a positive integer; got {self.n_units!r}.")

    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        hp = [Hyperparameter("l2", self.l2, 1e-6, 1e2)]
        if ctx.task == "classification":
            lo, hi = self.temperature_bounds
            hp.append(Hyperparameter("temperature", self.temperature, lo, hi))
        return hp

    def _start(self, ctx: AggregationContext) -> Params:
        params = self._start_tensors(ctx.device, ctx.dtype)
        if ctx.task == "regression":
            params["scale"] = ctx.full((ctx.n_outputs,), 1.0)
            params["offset"] = ctx.zeros(ctx.n_outputs)
        return params

    def _start_tensors(self, device, dtype) -> Params:
        starts = [_STARTS[u % len(_STARTS)] for u in range(self.n_units)]
        raw_exp = [[_inv_softplus(s[k]) for k in _EXPONENTS] for s in starts]
        coef = [[s["alpha"], s["beta"]] for s in starts]
        den = [[_inv_softplus(1.0), _inv_softplus(0.0)] for _ in starts]
        mix = [2.0 if u == 0 else 0.0 for u in range(self.n_units)]
        t = lambda v: torch.tensor(v, device=device, dtype=dtype)  # noqa: E731
        return {"raw_exp": t(raw_exp), "coef": t(coef), "raw_den": t(den), "mix": t(mix)}

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        return self._start(ctx)

    def _units(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Every unit on ``x`` of shape (n, m, c): returns (n, c, units)."""
        ex = F.softplus(params["raw_exp"])  # (U, 8)
        den = F.softplus(params["raw_den"])  # (U, 2)
        x = x.clamp(self.eps, 1 - self.eps).transpose(1, 2).unsqueeze(-2)  # (n, c, 1, m)
        lx, l1x = torch.log(x), torch.log1p(-x)
        a, b, c, d, e, f, g, h = (ex[:, i, None] for i in range(8))  # each (U, 1)
        l_ab = torch.exp(_log_l(lx, a[:, 0], b))  # (n, c, U)
        l_cd = torch.exp(_log_l(l1x, c[:, 0], d))
        l_ef = torch.exp(_log_l(lx, e[:, 0], f))
        l_gh = torch.exp(_log_l(l1x, g[:, 0], h))
        num = params["coef"][:, 0] * l_ab + params["coef"][:, 1] * l_cd
        return num / (den[:, 0] * l_ef + den[:, 1] * l_gh + 1e-12)

    def forward(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        w = torch.softmax(params["mix"], 0)
        if "temperature" in hyper:
            s = (self._units(params, Z) * w).sum(-1)  # (n, c)
            return torch.log(s.clamp_min(self.eps)) / hyper["temperature"][0]
        s = (self._units(params, torch.sigmoid(Z)) * w).sum(-1)
        s = s.clamp(self.eps, 1 - self.eps)
        return params["scale"] * torch.logit(s) + params["offset"]

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        # Pull towards the starting units (mean, soft max, soft min), not towards 0.
        start = self._start_tensors(params["coef"].device, params["coef"].dtype)
        pen = sum((params[k] - start[k]).pow(2).sum() for k in start)
        return 0.5 * hyper["l2"][0] * pen

    # -- fitted views --------------------------------------------------------------
    @property
    def unit_weights_(self) -> np.ndarray:
        """Mixture weight of each unit."""
        m = np.asarray(self.params_["mix"])
        w = np.exp(m - m.max())
        return w / w.sum()

    @property
    def units_(self) -> pd.DataFrame:
        """Each unit's exponents a..h, coefficients and mixture weight."""
        ex = np.log1p(np.exp(np.asarray(self.params_["raw_exp"])))
        den = np.log1p(np.exp(np.asarray(self.params_["raw_den"])))
        coef = np.asarray(self.params_["coef"])
        df = pd.DataFrame(ex, columns=list(_EXPONENTS))
        df["alpha"], df["beta"] = coef[:, 0], coef[:, 1]
        df["gamma"], df["delta"] = den[:, 0], den[:, 1]
        df["weight"] = self.unit_weights_
        return df
