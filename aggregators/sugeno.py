"""The Sugeno integral with a learned capacity, trained through a smooth relaxation.

The Sugeno integral of ``x in [0, 1]^m`` with respect to a capacity ``mu``
(``mu(empty) = 0``, ``mu(N) = 1``, ``A subset B => mu(A) <= mu(B)``) is

    S_mu(x) = max_i min(x_(i), mu(A_(i))),   x_(1) <= ... <= x_(m),

with ``A_(i) = {(i), ..., (m)}`` the models whose output is at least
``x_(i)`` (Sugeno 1974). It is the max-min ("qualitative")
counterpart of the Choquet integral: the output is either one of the inputs or
one capacity value, so it only compares numbers and never adds them. It
lies between the minimum and the maximum of the inputs.

Capacities are arrays over the ``2**m`` subsets in *binary order* (entry
``mask`` is the subset ``{i : mask >> i & 1}``); their parametrisations and
tables live in :mod:`aggregators._capacity`, shared with
:mod:`aggregators.choquet`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ._base import AggregationContext, Aggregator, Hyperparameter, Params
from ._capacity import (
    MAX_FULL_MODELS,
    capacity_columns,
    capacity_frame,
    chain_values,
    coalition_index,
    coalition_members,
    full_capacity,
    n_capacities,
    symmetric_capacity,
    symmetric_levels,
    top_sets,
)
from ._outputs import (
    affine_params,
    class_inputs,
    from_unit_interval,
    threshold_params,
    threshold_scores,
    unit_interval_buffers,
)

__all__ = ["Sugeno", "soft_sugeno_integral", "sugeno_integral", "symmetric_capacity"]

# softplus^{-1}(1): the full capacity's increments at the start (every subset
# one above its predecessors).
_SOFTPLUS_INV_1 = math.log(math.e - 1.0)


# ======================================================================================
# Pure functions
# ======================================================================================
def _check_capacity_length(x: np.ndarray, capacity: np.ndarray) -> int:
    m = x.shape[-1]
    if capacity.shape[-1] != 2**m:
        raise ValueError(
            f"a capacity over {m} inputs has 2**{m} = {2**m} entries (one per subset, "
            f"in binary order); got {capacity.shape[-1]}."
        )
    return m


def sugeno_integral(x, capacity) -> np.ndarray:
    """Exact Sugeno integral ``max_i min(x_(i), mu(A_(i)))`` over the last axis.

    Parameters
    ----------
    x : array-like of shape (..., m)
        Inputs, usually in ``[0, 1]``.
    capacity : array-like of shape (2**m,)
        ``mu`` of every subset in binary order (entry ``mask`` is the subset
        ``{i : mask >> i & 1}``). Monotonicity and normalisation are not
        checked here.

    Returns
    -------
    ndarray of shape (...)

    Examples
    --------
    >>> import numpy as np
    >>> from aggregators.sugeno import sugeno_integral
    >>> mu = np.array([0.0, 0.3, 0.6, 1.0])  # {}, {0}, {1}, {0, 1}
    >>> float(sugeno_integral([0.9, 0.2], mu))  # max(min(0.2, 1), min(0.9, 0.3))
    0.3
    """
    x = np.asarray(x, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.float64)
    _check_capacity_length(x, capacity)
    d, top = top_sets(x)  # top[..., k] = mask of the k+1 largest inputs = A_(m-k)
    return np.max(np.minimum(d, capacity[top]), axis=-1)


def _soft_min2(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``-t log((e^{-a/t} + e^{-b/t}) / 2)``: within ``[min(a, b), min(a, b) + t log 2]``."""
    # a - t softplus((a - b) / t) equals -t log(e^{-a/t} + e^{-b/t}); unlike
    # torch.logaddexp its double backward stays finite when the inputs are far apart.
    return a - t * F.softplus((a - b) / t) + t * math.log(2.0)


def _soft_max(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t log(mean_k e^{v_k / t})`` over the last axis: within ``[max - t log m, max]``."""
    return t * (torch.logsumexp(v / t, dim=-1) - math.log(v.shape[-1]))


def _chain_levels(x: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs sorted descending and the capacity of the chain of top sets.

    Parameters
    ----------
    x : Tensor of shape (..., c, m)
    mu : Tensor of shape (cap, 2**m) (a dense capacity) or (cap, m + 1)
        (symmetric levels ``q_0 .. q_m``); ``cap`` is 1 or ``c``.

    Returns
    -------
    d, levels : Tensors of shape (..., c, m)
        ``d[..., k]`` the (k+1)-th largest input, ``levels[..., k]`` the
        capacity of the set of the k+1 largest.
    """
    m = x.shape[-1]
    cap, size = mu.shape
    if size == m + 1 and m != 1:  # symmetric: the level only depends on |A| (m=1: both)
        d = torch.sort(x, dim=-1, descending=True).values
        lv = mu[:, 1:]  # (cap, m)
        return d, lv.expand(*d.shape[:-2], cap, m) if cap > 1 else lv[0].expand_as(d)
    return chain_values(x, mu)


def soft_sugeno_integral(x, capacity, softness=None) -> torch.Tensor:
    """Sugeno integral in torch, exact or smoothed by log-sum-exp.

    The smooth version replaces ``min(a, b)`` by ``-t log((e^{-a/t} +
    e^{-b/t}) / 2)`` and ``max_k v_k`` by ``t log(mean_k e^{v_k/t})``; it is
    differentiable in the inputs and the capacity everywhere and differs
    from the exact integral by at most ``t * max(log 2, log m)``: it tends to
    the exact value as ``t = softness -> 0``.

    Parameters
    ----------
    x : Tensor of shape (..., m)
    capacity : Tensor of shape (2**m,) or (m + 1,)
        A dense capacity in binary order, or the levels ``q_0 .. q_m`` of a
        symmetric one (told apart by length; for ``m <= 1`` they coincide).
    softness : float or Tensor, default=None
        Temperature ``t`` of the relaxation; ``None`` or 0: exact max-min.

    Returns
    -------
    Tensor of shape (...)
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.double()
    capacity = torch.as_tensor(capacity, dtype=x.dtype, device=x.device)
    d, lv = _chain_levels(x.unsqueeze(-2), capacity.reshape(1, -1))
    d, lv = d.squeeze(-2), lv.squeeze(-2)
    if softness is None or (not torch.is_tensor(softness) and softness == 0):
        return torch.minimum(d, lv).amax(-1)
    t = torch.as_tensor(softness, dtype=x.dtype, device=x.device)
    return _soft_max(_soft_min2(d, lv, t), t)


# ======================================================================================
# The aggregation function
# ======================================================================================
class Sugeno(Aggregator):
    """Sugeno integral of the base models' outputs with a learned capacity.

    For each class the base models' probabilities ``x`` are aggregated by
    ``S(x) = max_i min(x_(i), mu(A_(i)))``: "there is a coalition ``A`` of
    models, all at least ``alpha`` confident, with ``mu(A) >= alpha``". The
    capacity is

    * ``"full"`` (``m <= 12``): one value per coalition, monotone and
      normalised **by the parametrisation**: ``nu(A) = smax_{i in A}
      nu(A - {i}) + softplus(r_A)`` with a smooth maximum ``smax >= max``,
      ``mu = nu / nu(N)`` (every strictly monotone capacity is reached
      exactly, the others as limits);
    * ``"symmetric"``: ``mu(A) = q_{|A|}`` with ``q = cumsum(softmax(r))``
      (so ``q_m = 1`` and ``q`` is nondecreasing exactly); the integral is
      then an ordered weighted maximum, one parameter per model.

    Both start near ``mu(A) = |A| / m`` (the symmetric one exactly, the full
    one with equal increments). A full capacity over more than 12 models is
    refused with a ``UserWarning`` and the symmetric one is used.

    **Training and prediction.** ``min`` and ``max`` have gradients only at
    one input, so the capacity is trained through a smooth relaxation:
    ``min(a, b) -> -t log((e^{-a/t} + e^{-b/t}) / 2)`` and ``max_k v_k -> t
    log(mean_k e^{v_k / t})``, within ``t max(log 2, log m)`` of the exact
    integral. The softness ``t`` is a hyperparameter tuned by hypergradient
    (on the smooth validation loss). With ``exact=True`` (default) the
    estimator's predictions (forward passes without autograd) use the exact
    max-min integral; ``exact=False`` predicts with the relaxation it was
    trained with.

    **Output map** (as the choquistic regression of :class:`Choquet`):

    * binary classification: one integral over the positive class
      probabilities, ``P(y = 1) = sigmoid((S(x) - beta) / T)``;
    * ``C > 2`` classes: ``P(y = c) ∝ sigmoid((S_c(x) - beta_c) / T)``
      (log-scores ``log sigmoid(.)``, normalised by the softmax);
    * regression: standardised predictions are mapped to ``[0, 1]`` by one
      affine map per target fitted on the training rows (minimum and maximum
      over rows and models) and clipped there (the Sugeno integral compares
      inputs with capacity values, so it does not commute with affine maps);
      the output is ``lo + span (a S(x) + b)`` with learned ``a > 0`` and
      ``b``.

    The thresholds ``beta`` are learned with the capacity; the output
    temperature ``T`` is a hyperparameter.

    Hyperparameters tuned by hypergradient: ``temperature`` (classifiers),
    ``softness`` and ``l2`` (on the raw capacity parameters, taken from
    their start, and on the output map's parameters).

    Parameters
    ----------
    capacity_type : {"full", "symmetric"}, default="full"
        The family of capacities learned (see above).
    share : {"global", "per_class"}, default="global"
        One capacity for every class (or target), or one per class (binary
        classifiers always use one, for the positive class).
    exact : bool, default=True
        Predict with the exact max-min integral (else with the relaxation).
    softness : float, default=0.02
        Initial temperature ``t`` of the relaxation, in units of the inputs
        (probabilities).
    softness_bounds : tuple of float, default=(1e-3, 0.1)
        Range ``t`` is tuned in. The upper bound keeps the relaxation the
        model is trained with within ``0.1 log m`` of the exact integral it
        predicts with.
    temperature : float, default=0.1
        Initial output temperature ``T`` (classifiers).
    l2 : float, default=1e-3
        Initial L2 weight.

    Attributes
    ----------
    Available on the fitted copy ``estimator.aggregator_``:
    :meth:`capacity`, :meth:`capacity_levels` (symmetric).

    See Also
    --------
    sugeno_integral, soft_sugeno_integral, aggregators.choquet.Choquet

    References
    ----------
    M. Sugeno, "Theory of fuzzy integrals and its applications", PhD thesis,
    Tokyo Institute of Technology (1974).
    M. Grabisch, C. Labreuche, "A decade of application of the Choquet and
    Sugeno integrals in multi-criteria decision aid", 4OR 6 (2008).

    Examples
    --------
    >>> from aggregators import AggregatedClassifier
    >>> from aggregators.sugeno import Sugeno
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.naive_bayes import GaussianNB
    >>> from sklearn.tree import DecisionTreeClassifier
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> clf = AggregatedClassifier(
    ...     [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=3))],
    ...     aggregator=Sugeno(), cv=None, random_state=0).fit(X, y)
    >>> clf.aggregator_.capacity().round(6).loc[[("nb", "tree")]].tolist()
    [1.0]
    """

    short_name = "sugeno"
    # The soft max-min over all 2**m subsets makes second derivatives dear:
    # a Hessian block costs about as many gradients as it has rows, more
    # than L-BFGS spends on a whole solve.
    second_order = False
    # Each outer evaluation is an iterative inner solve and a conjugate-gradient
    # hypergradient, both first-order: stacking's budget of outer evaluations.
    outer_budget = 8

    def __init__(
        self,
        capacity_type: str = "full",
        *,
        share: str = "global",
        exact: bool = True,
        softness: float = 0.02,
        softness_bounds: tuple = (1e-3, 0.1),
        temperature: float = 0.1,
        l2: float = 1e-3,
    ):
        self.capacity_type = capacity_type
        self.share = share
        self.exact = exact
        self.softness = softness
        self.softness_bounds = softness_bounds
        self.temperature = temperature
        self.l2 = l2

    # -- structure -----------------------------------------------------------------
    def _kind(self, m: int) -> str:
        return "symmetric" if (self.capacity_type == "symmetric" or m > MAX_FULL_MODELS) else "full"

    def check_task(self, ctx: AggregationContext) -> None:
        if self.capacity_type not in ("full", "symmetric"):
            raise ValueError(
                f"capacity_type must be 'full' or 'symmetric'; got {self.capacity_type!r}."
            )
        if self.share not in ("global", "per_class"):
            raise ValueError(f"share must be 'global' or 'per_class'; got {self.share!r}.")
        lo, hi = self.softness_bounds
        if not (0 < lo <= hi):
            raise ValueError(
                f"softness_bounds must be (low, high) with 0 < low <= high; got "
                f"{self.softness_bounds!r}."
            )
        if self.capacity_type == "full" and ctx.n_models > MAX_FULL_MODELS:
            warnings.warn(
                f"a full capacity over {ctx.n_models} models has 2**{ctx.n_models} "
                f"subsets; it is learned for at most {MAX_FULL_MODELS} models. Using a "
                "symmetric capacity instead (capacity_type='symmetric' silences this).",
                UserWarning,
                stacklevel=3,
            )

    # -- declared interface ----------------------------------------------------------
    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        lo, hi = self.softness_bounds
        hp = [
            Hyperparameter("softness", self.softness, lo, hi),
            Hyperparameter("l2", self.l2, 1e-6, 1e2, penalty=True),
        ]
        if ctx.task == "classification":
            hp.insert(0, Hyperparameter("temperature", self.temperature, 1e-3, 1e3))
        return hp

    def fit_buffers(self, ctx, Z, y, X=None) -> Params:
        return unit_interval_buffers(ctx, Z)

    def _start(self, kind: str, cap: int, m: int, device, dtype) -> torch.Tensor:
        if kind == "full":
            # Equal increments: nu(A) close to |A|, mu(A) close to |A| / m.
            return torch.full((cap, 2**m - 1), _SOFTPLUS_INV_1, device=device, dtype=dtype)
        return torch.zeros(cap, m, device=device, dtype=dtype)  # q_k = k / m

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        m = ctx.n_models
        cap = n_capacities(self.share, ctx)
        kind = self._kind(m)
        key = "capacity_raw" if kind == "full" else "levels_raw"
        params = {key: self._start(kind, cap, m, ctx.device, ctx.dtype)}
        params.update(threshold_params(ctx) if ctx.task == "classification" else affine_params(ctx))
        return params

    def _capacity_tensor(self, params: Params) -> torch.Tensor:
        """Dense capacity ``(cap, 2**m)`` or symmetric levels ``(cap, m + 1)``."""
        if "capacity_raw" in params:
            return full_capacity(params["capacity_raw"], self.n_models_)
        return symmetric_levels(params["levels_raw"])

    def _integral(self, params: Params, hyper: Params, x: torch.Tensor) -> torch.Tensor:
        """Sugeno integral of ``x (n, c, m)`` -> ``(n, c)``, exact or relaxed."""
        d, lv = _chain_levels(x, self._capacity_tensor(params))
        if self.exact and not torch.is_grad_enabled():
            return torch.minimum(d, lv).amax(-1)
        t = hyper["softness"][0]
        return _soft_max(_soft_min2(d, lv, t), t)

    def forward(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        if self._classifier:
            s = self._integral(params, hyper, class_inputs(Z, self._binary))
            return threshold_scores(s, params["threshold"], hyper["temperature"], self._binary)
        lo, span = params["x_low"], params["x_span"]
        x = ((Z - lo) / span).clamp(0.0, 1.0).transpose(1, 2)  # (n, targets, m)
        return from_unit_interval(params, self._integral(params, hyper, x))

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        if "capacity_raw" in params:
            sq = (params["capacity_raw"] - _SOFTPLUS_INV_1).pow(2).sum()
        else:
            sq = params["levels_raw"].pow(2).sum()
        for k in ("threshold", "log_scale", "offset"):
            if k in params:
                sq = sq + params[k].pow(2).sum()
        return 0.5 * hyper["l2"][0] * sq

    # -- readable views of the fitted state ---------------------------------------
    def _fitted_capacity(self) -> np.ndarray:
        self._check_fitted()
        params = {
            k: torch.as_tensor(v, dtype=torch.float64)
            for k, v in self.params_.items()
            if k in ("capacity_raw", "levels_raw")
        }
        with torch.no_grad():
            return self._capacity_tensor(params).numpy()

    def capacity(self, coalition=None):
        """The fitted capacity ``mu`` (monotone, ``mu(N) = 1``).

        Parameters
        ----------
        coalition : iterable of str, default=None
            Base-model names; when given, ``mu`` of that coalition (a float, or
            a Series by class when capacities are per class).

        Returns
        -------
        float, Series or DataFrame
            Without ``coalition``: indexed by coalition (tuples of model names,
            binary order), one column per class when capacities are per class.
        """
        mu = self._fitted_capacity()
        names = self.model_names_
        m = len(names)
        if mu.shape[1] == m + 1 and m > 1:
            mu = symmetric_capacity(mu) if m <= 20 else mu
            if mu.shape[1] != 2**m:
                raise ValueError(
                    f"the capacity of all 2**{m} coalitions is too large to list; use "
                    "capacity_levels() (symmetric capacity) or capacity(coalition=[...])."
                )
        cols = capacity_columns(mu.shape[0], self.classes_)
        if coalition is not None:
            mask = sum(1 << i for i in coalition_members(names, coalition))
            vals = mu[:, mask]
            return float(vals[0]) if cols is None else pd.Series(vals, index=cols, name="capacity")
        return capacity_frame(mu, coalition_index(names, range(2**m)), "capacity", cols)

    def capacity_levels(self) -> pd.Series | pd.DataFrame:
        """``mu`` as a function of the coalition size (symmetric capacities only).

        Returns
        -------
        Series or DataFrame
            Indexed by coalition size ``0 .. m``.
        """
        q = self._fitted_capacity()
        m = len(self.model_names_)
        if q.shape[1] != m + 1 or m == 1:
            raise ValueError(
                "capacity_levels() describes symmetric capacities; this one is full: "
                "use capacity()."
            )
        cols = capacity_columns(q.shape[0], self.classes_)
        return capacity_frame(q, pd.RangeIndex(m + 1, name="size"), "capacity", cols)
