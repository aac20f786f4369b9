"""Learnable aggregation functions over the model axis (Pellegrini et al., 2021)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ._base import (
    AggregationContext,
    Aggregator,
    Hyperparameter,
    Params,
    l2_bounds_for,
    l2_limits_for,
)
from ._outputs import affine_params, from_unit_interval, unit_interval_buffers

__all__ = ["LAF", "laf_unit"]

_EPS = 1e-6


def _log_l(logx: torch.Tensor, a: torch.Tensor, b: torch.Tensor, logw=None) -> torch.Tensor:
    """``log L_{a,b}(x) = a * log(sum_i w_i x_i^b)`` over the last axis, in log space."""
    z = b * logx if logw is None else b * logx + logw
    return a * torch.logsumexp(z, dim=-1)


def laf_unit(x, params: dict, eps: float = _EPS, weights=None) -> torch.Tensor:
    """One LAF unit over the last axis of ``x`` (Pellegrini et al. 2021, eq. 1).

    ``LAF(x) = [alpha L_ab(x) + beta L_cd(1-x)] / [gamma L_ef(x) + delta L_gh(1-x)]``
    with ``L_{a,b}(x) = (sum_i x_i^b)^a`` and inputs clamped to ``[eps, 1-eps]``.
    With ``weights``, the sums count input ``i`` ``w_i`` times,
    ``L_{a,b}(x) = (sum_i w_i x_i^b)^a``: LAF of a multiset with real
    multiplicities (integer ones equal repeating the input).

    Parameters
    ----------
    x : array-like or Tensor of shape (..., m)
    params : dict
        Exponents ``a`` ... ``h`` (>= 0) and coefficients ``alpha``, ``beta``,
        ``gamma``, ``delta``; each a scalar or broadcastable tensor.
    eps : float, default=1e-6
    weights : array-like of shape (m,), default=None
        Nonnegative multiplicities (default: every input counted once).

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
    logw = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
        if w.shape != x.shape[-1:] or bool((w < 0).any()):
            raise ValueError(
                f"weights must be {x.shape[-1]} nonnegative multiplicities, one per "
                f"input; got {weights!r}."
            )
        logw = torch.log(w)
    lx, l1x = torch.log(x), torch.log1p(-x)
    num = p["alpha"] * torch.exp(_log_l(lx, p["a"], p["b"], logw)) + p["beta"] * torch.exp(
        _log_l(l1x, p["c"], p["d"], logw)
    )
    den = p["gamma"] * torch.exp(_log_l(lx, p["e"], p["f"], logw)) + p["delta"] * torch.exp(
        _log_l(l1x, p["g"], p["h"], logw)
    )
    return num / den


#: Exponent of the starting soft max ``M_4`` and soft min ``1 - M_4(1 - x)``.
_R_START = 4.0

#: Smallest gap ``p - q`` of a Gini mean, and smallest ``r`` of a dual power
#: mean: their outer exponent ``1 / (p - q)`` stays below 100 (the geometric
#: means, gap 0, are limits).
_MIN_GAP = 1e-2

#: Scale of the class biases (keeps their curvature on the units' scale).
_RHO_BIAS = 0.1


def _inv_softplus(v: float) -> float:
    v = max(v, 1e-4)  # softplus never reaches 0; 1e-4 is 0 for every practical input
    return v + math.log(-math.expm1(-v))


class LAF(Aggregator):
    """A mixture of averaging learnable aggregation functions over the base models.

    Each unit is a LAF (Pellegrini et al. 2021) applied, class by class, to
    the base models' probabilities ``x = (p_1c, ..., p_mc)``, with
    ``L_{a,b}(x) = (sum_i w_i x_i^b)^a`` (see :func:`laf_unit`). The units
    are the LAFs that are *averaging* (between the min and the max of their
    inputs, so their mixture is a probability-like score):

    * **Gini means** ``G_{p,q}(x) = L_{a,p}(x) / L_{a,q}(x)``,
      ``a = 1 / (p - q)``, ``p > q >= 0``: the mean (``p = 1, q = 0``),
      power means ``M_r`` (``q = 0``) from the geometric mean
      (``r -> 0``) to the max (``r -> inf``), Lehmer means (``p - q = 1``);
    * **dual power means** ``1 - M_r(1 - x) = [L_{1/r,0}(x) - L_{1/r,r}(1 - x)]
      / L_{1/r,0}(x)``: from the mean (``r = 1``) to the min (``r -> inf``).

    They start as the mean, ``M_4`` (a soft max) and ``1 - M_4(1 - x)`` (a
    soft min), cycling for more units, and are mixed,
    ``s_c = sum_u v_u LAF_u(x)``, ``v = softmax``. The sums count model
    ``i`` ``w_i`` times (learned multiplicities ``w = m softmax(omega)``, all
    1 at the start): a LAF is a function of the multiset of its inputs, and
    real multiplicities let it lean on the better models, which a function
    symmetric in the models cannot (``weighted=False`` keeps the paper's
    symmetric units). Class log-scores are ``(log s_c + b_c) / T``, with
    learned biases ``b`` and the temperature ``T`` tuned: at the start
    (mean unit, ``T = 1``) this is close to the uniform average of the
    models' probabilities.

    Why only averaging units, not the paper's free unit
    ``[alpha L_ab(x) + beta L_cd(1-x)] / [gamma L_ef(x) + delta L_gh(1-x)]``
    with 12 free parameters: with a fixed number of models there is nothing to
    count, and the free unit's scale is unbounded. With ``log(s)`` as
    log-scores a free unit can learn a constant offset (``beta L_{c,d}`` with
    ``c = 0``) that makes ``s <= 0`` on rows unlike the training ones, each
    costing tens of nats; behind a logistic output (as Choquet's) it can
    instead grow far outside ``[0, 1]``. An averaging unit stays between the
    smallest and the largest input, so its logarithm is a probability-like
    score on any row. The temperature floor ``T >= 0.5`` is
    :class:`LearnedWeights`': the validation folds reward sharpening the
    ensemble, which costs most on test rows where every model is wrong.

    Regressors: the standardised predictions are mapped to ``[0, 1]`` by one
    affine map per target learned on the training rows (shared by the
    models; inputs clamped to ``[eps, 1 - eps]``), aggregated, and mapped
    back by the inverse map with a learned scale and offset.

    Hyperparameters tuned by hypergradient: ``l2`` (pulls every parameter
    towards its start: the units towards mean / soft max / soft min, the
    multiplicities towards 1, the biases towards 0) and, for classifiers,
    the output ``temperature``.

    Parameters
    ----------
    n_units : int, default=3
        Number of LAF units (at least 1; the starts cycle through mean, soft
        max, soft min).
    weighted : bool, default=True
        Learn one multiplicity per base model (shared by the units and
        classes); ``False``: every model counts once.
    l2 : float, default=1e-2
        Initial L2 weight.
    temperature : float, default=1.0
        Initial output temperature ``T`` (classifiers).
    temperature_bounds : tuple of float, default=(0.5, 2.0)
        Range ``T`` is tuned in (see above for the floor).
    l2_bounds : tuple of float or None, default=None
        Range the L2 weight is tuned in (log scale). ``None``: :class:`Stacking`'s
        rule, ``(0.1 / n_train, 100)`` with ``n_train`` the rows each inner
        problem is fitted on: the floor follows the amount of data, so large
        sets may be regularised weakly (at the price of slower tuning there).
        As for :class:`Stacking`, the default floor bounds the tuning only: a
        weight given may lie anywhere in ``(0, 100]``.
    eps : float, default=1e-6
        Inputs are clamped to ``[eps, 1 - eps]``.

    Attributes
    ----------
    Available on the fitted copy ``estimator.aggregator_``: ``units_`` (each
    unit as a LAF: exponents, coefficients, mixture weight),
    ``unit_weights_``, ``model_weights_``.

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
    (3,)
    >>> round(float(clf.aggregator_.model_weights_.sum()), 6)
    1.0
    """

    short_name = "laf"
    # Its units' powers and logarithms make second derivatives dear: a
    # Hessian block costs tens of gradients, while L-BFGS needs about ten
    # iterations per solve, so Newton steps would slow the fit down.
    second_order = False
    # Each outer evaluation is an iterative inner solve and a conjugate-gradient
    # hypergradient, both first-order: stacking's budget of outer evaluations.
    outer_budget = 8

    def __init__(
        self,
        n_units: int = 3,
        *,
        weighted: bool = True,
        l2: float = 1e-2,
        temperature: float = 1.0,
        temperature_bounds: tuple = (0.5, 2.0),
        l2_bounds: tuple | None = None,
        eps: float = _EPS,
    ):
        self.n_units = n_units
        self.weighted = weighted
        self.l2 = l2
        self.temperature = temperature
        self.temperature_bounds = temperature_bounds
        self.l2_bounds = l2_bounds
        self.eps = eps

    def check_task(self, ctx: AggregationContext) -> None:
        if (
            isinstance(self.n_units, bool)
            or not isinstance(self.n_units, (int, np.integer))
            or self.n_units < 1
        ):
            raise ValueError(f"n_units must be a positive integer; got {self.n_units!r}.")
        if not isinstance(self.weighted, (bool, np.bool_)):
            raise TypeError(f"weighted must be True or False; got {self.weighted!r}.")

    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        hp = [
            Hyperparameter(
                "l2", self.l2, *l2_bounds_for(ctx, self.l2_bounds),
                limits=l2_limits_for(self.l2_bounds), penalty=True,
            )
        ]
        if ctx.task == "classification":
            lo, hi = self.temperature_bounds
            hp.insert(0, Hyperparameter("temperature", self.temperature, lo, hi))
        return hp

    def fit_buffers(self, ctx, Z, y, X=None) -> Params:
        return unit_interval_buffers(ctx, Z)

    # -- the units -----------------------------------------------------------------
    def _kinds(self) -> np.ndarray:
        """``True`` for the dual power means (every third unit), ``False`` for Gini means."""
        return np.arange(self.n_units) % 3 == 2

    def _start_tensors(self, n_models: int, device, dtype) -> Params:
        """The starting point of the unit parameters (also the L2's centre)."""
        dual = self._kinds()
        # Gini units: (q, p - q) -- the mean (0, 1), then M_4 (0, 4), ...
        gini = [(0.0, 1.0) if u % 3 == 0 else (0.0, _R_START) for u in np.flatnonzero(~dual)]
        t = lambda v: torch.tensor(v, device=device, dtype=dtype)  # noqa: E731
        params = {
            "gini_raw": t([[_inv_softplus(q), _inv_softplus(g - _MIN_GAP)] for q, g in gini])
            .reshape(-1, 2),
            "dual_raw": t([_inv_softplus(_R_START - _MIN_GAP)] * int(dual.sum())),
            "mix": t([2.0 if u == 0 else 0.0 for u in range(self.n_units)]),
        }
        if self.weighted:
            params["model_logits"] = torch.zeros(n_models, device=device, dtype=dtype)
        return params

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        params = self._start_tensors(ctx.n_models, ctx.device, ctx.dtype)
        if ctx.task == "classification":
            params["bias"] = ctx.zeros(ctx.n_outputs)
        else:
            params.update(affine_params(ctx))
        return params

    @staticmethod
    def _exponents(params: Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p, q)`` of the Gini units and ``r`` of the dual units."""
        g = F.softplus(params["gini_raw"])
        q = g[:, 0]
        return q + _MIN_GAP + g[:, 1], q, _MIN_GAP + F.softplus(params["dual_raw"])

    def _units(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Every unit on ``x`` of shape (n, m, c): returns (n, c, units)."""
        p, q, r = self._exponents(params)
        kinds = self._kinds()
        x = x.clamp(self.eps, 1 - self.eps).transpose(1, 2)  # (n, c, m)
        lw = params.get("model_logits")
        w = None if lw is None else lw.shape[0] * torch.softmax(lw, 0)
        m = x.shape[-1]

        def log_power_sums(logs, ex):
            # log sum_i w_i x_i^b for every exponent b in ex (any shape), with
            # x_i^b = e^{b top} e^{b (log x_i - top)}, top = max_i log x_i: every
            # exponential is at most 1 and the largest input's is 1, so nothing
            # overflows or underflows to 0. The shift does not depend on the
            # parameters, so nothing of it is differentiated.
            top = logs.amax(-1, keepdim=True)  # (n, c, 1)
            shifted = (logs - top).reshape(*logs.shape[:-1], *([1] * ex.dim()), m)
            powers = torch.exp(ex[..., None] * shifted)  # (n, c, *ex.shape, m)
            sums = powers.sum(-1) if w is None else powers @ w
            return torch.log(sums) + ex * top.reshape(*top.shape[:-1], *([1] * ex.dim()))

        # Gini units read x through two power sums each (exponents p and q);
        # dual units read 1 - x through one, sum_i w_i (1 - x_i)^r: their
        # other sum has exponent 0 and is sum_i w_i = m whatever the
        # multiplicities, so it costs no exponentials.
        out = []
        if p.numel():
            ls = log_power_sums(torch.log(x), torch.stack([p, q], -1))  # (n, c, Ug, 2)
            out.append(torch.exp((ls[..., 0] - ls[..., 1]) / (p - q)))
        if r.numel():
            ls = log_power_sums(torch.log1p(-x), r)  # (n, c, Ud)
            out.append(1 - torch.exp((ls - math.log(m)) / r))
        # Back to unit order: the Gini units first, then the dual ones, placed
        # by indexing (batches under torch.vmap; masked_scatter has no rule).
        order = torch.as_tensor(
            np.argsort(np.concatenate([np.flatnonzero(~kinds), np.flatnonzero(kinds)])),
            device=x.device,
        )
        return torch.cat(out, -1)[..., order]

    def _mixture(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return self._units(params, x) @ torch.softmax(params["mix"], 0)  # (n, c)

    def forward(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        if self._classifier:
            # The units are averaging, so s >= min_i x_i >= eps; the clamp only
            # guards rounding.
            s = self._mixture(params, Z).clamp_min(self.eps)
            return (torch.log(s) + _RHO_BIAS * params["bias"]) / hyper["temperature"][0]
        s = self._mixture(params, (Z - params["x_low"]) / params["x_span"])  # clamped by _units
        return from_unit_interval(params, s)

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        # Towards the starting units (mean, soft max, soft min) and equal
        # multiplicities, not towards 0.
        lw = params.get("model_logits")
        start = self._start_tensors(
            0 if lw is None else lw.shape[0], params["mix"].device, params["mix"].dtype
        )
        sq = sum((params[k] - start[k]).pow(2).sum() for k in start)
        for k in ("bias", "log_scale", "offset"):
            if k in params:
                sq = sq + params[k].pow(2).sum()
        return 0.5 * hyper["l2"][0] * sq

    # -- fitted views --------------------------------------------------------------
    @property
    def unit_weights_(self) -> np.ndarray:
        """Mixture weight of each unit."""
        self._check_fitted()
        m = np.asarray(self.params_["mix"])
        w = np.exp(m - m.max())
        return w / w.sum()

    @property
    def model_weights_(self) -> pd.Series:
        """Learned multiplicity of each base model, normalised to sum to 1."""
        self._check_fitted()
        lw = self.params_.get("model_logits")
        if lw is None:
            w = np.full(self.n_models_, 1.0 / self.n_models_)
        else:
            w = np.exp(np.asarray(lw) - np.max(lw))
            w = w / w.sum()
        return pd.Series(w, index=self.model_names_, name="multiplicity")

    @property
    def units_(self) -> pd.DataFrame:
        """Each unit as a LAF: ``kind``, exponents a..h, alpha..delta, mixture weight.

        With :func:`laf_unit` and ``weights = n_models * model_weights_``
        these parameters reproduce every unit.
        """
        self._check_fitted()
        params = {k: torch.as_tensor(v) for k, v in self.params_.items()}
        p, q, r = (v.numpy() for v in self._exponents(params))
        dual = self._kinds()
        rows = []
        gi = iter(zip(p, q))
        di = iter(r)
        for is_dual in dual:
            if is_dual:
                rr = float(next(di))
                rows.append(dict(kind="dual power mean", a=1 / rr, b=0.0, c=1 / rr, d=rr,
                                 e=1 / rr, f=0.0, g=0.0, h=0.0, alpha=1.0, beta=-1.0,
                                 gamma=1.0, delta=0.0))
            else:
                pp, qq = (float(v) for v in next(gi))
                a = 1 / (pp - qq)
                rows.append(dict(kind="Gini mean", a=a, b=pp, c=0.0, d=0.0, e=a, f=qq,
                                 g=0.0, h=0.0, alpha=1.0, beta=0.0, gamma=1.0, delta=0.0))
        df = pd.DataFrame(rows)
        df["weight"] = self.unit_weights_
        return df
