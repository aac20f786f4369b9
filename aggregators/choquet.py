"""The discrete Choquet integral with a learned k-additive capacity.

The Choquet integral of inputs ``x in R^m`` (here: the base models' outputs
for one class) with respect to a capacity ``mu`` (a set function with
``mu(empty) = 0``, ``mu(N) = 1`` and ``A subset B => mu(A) <= mu(B)``) is

    C_mu(x) = sum_i (x_(i) - x_(i-1)) mu(A_(i)),   x_(1) <= ... <= x_(m),

with ``x_(0) = 0`` and ``A_(i) = {(i), ..., (m)}``; in Möbius form
``C(x) = sum_{T != empty} m(T) min_{i in T} x_i`` with ``mu(A) = sum_{B
subset A} m(B)`` (Grabisch 1997). A capacity can
express that two models are redundant (``m({i, j}) < 0``: the pair is worth
less than its parts) or complementary (``m({i, j}) > 0``: trust them when
they agree), which a weighted mean cannot.

Capacities, their Möbius masses, Shapley values and interaction indices live
in :mod:`aggregators._capacity` (binary subset order; shared with
:mod:`aggregators.sugeno`); the functions on them are re-exported here.

References
----------
M. Grabisch, "The application of fuzzy integrals in multicriteria decision
making", European Journal of Operational Research 89 (1996).
M. Grabisch, "k-order additive discrete fuzzy measures and their
representation", Fuzzy Sets and Systems 92 (1997).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from ._base import AggregationContext, Aggregator, Hyperparameter, Params
from ._capacity import (
    MAX_FULL_MODELS,
    atom_mixture_masses,
    capacity_columns,
    capacity_frame,
    capacity_to_mobius,
    chain_values,
    coalition_index,
    coalition_members,
    full_capacity,
    interaction_from_mobius,
    is_capacity,
    k_additive_atoms,
    lattice_start,
    mobius_to_capacity,
    n_capacities,
    popcount,
    shapley_from_mobius,
    sparse_mobius,
    top_sets,
    two_additive_masses,
    zeta_torch,
)
from ._outputs import (
    RHO_OFFSET,
    RHO_SCALE,
    affine_params,
    class_inputs,
    threshold_params,
    threshold_scores,
    unit_interval_buffers,
)

__all__ = [
    "Choquet",
    "capacity_to_mobius",
    "choquet_integral",
    "interaction_from_mobius",
    "is_capacity",
    "mobius_to_capacity",
    "shapley_from_mobius",
]

#: Bytes of features (inputs and pairwise minima) kept between forward passes while fitting.
_CACHE_BYTES = 3 * 2**30


def choquet_integral(x, capacity=None, *, mobius=None) -> np.ndarray:
    """Discrete Choquet integral of each row of ``x``.

    Give exactly one of ``capacity`` (sort-based formula
    ``sum_i (x_(i) - x_(i-1)) mu(A_(i))``) or ``mobius`` (dense masses are
    turned into a capacity; a sparse mapping, e.g. a 2-additive one over many
    models, is summed directly as ``sum_T m(T) min_{i in T} x_i``).

    Parameters
    ----------
    x : array-like of shape (..., m)
        Inputs; usually in ``[0, 1]``, but the formulas hold for any reals
        (the integral of a normalised capacity is translation equivariant).
    capacity : array-like of shape (2**m,) or mapping, default=None
        Capacity in binary subset order, or a mapping from tuples of model
        indices to ``mu`` of every subset.
    mobius : array-like of shape (2**m,) or mapping, default=None
        Möbius masses instead.

    Returns
    -------
    ndarray of shape (...)

    Examples
    --------
    Grabisch's (1996) students, rated in mathematics, physics and
    literature, with a capacity that makes the two sciences redundant:

    >>> import numpy as np
    >>> mu = [0, .45, .45, .5, .3, .9, .9, 1]   # {}, M, P, MP, L, ML, PL, MPL
    >>> x = np.array([[18, 16, 10], [10, 12, 18], [14, 15, 15]]) / 20
    >>> np.round(20 * choquet_integral(x, mu), 10)
    array([13.9, 13.6, 14.9])
    """
    if (capacity is None) == (mobius is None):
        raise ValueError("give exactly one of capacity and mobius.")
    x = np.asarray(x, dtype=np.float64)
    m = x.shape[-1]
    if mobius is not None and isinstance(mobius, Mapping):
        inc, vals = sparse_mobius(mobius, m)
        out = np.zeros(x.shape[:-1])
        for row, val in zip(inc, vals):
            out += val * x[..., row].min(-1)
        return out
    if capacity is not None and isinstance(capacity, Mapping):
        mu = np.zeros(2**m)
        for s, val in capacity.items():
            mu[sum(1 << int(i) for i in set(s))] = float(val)
    elif capacity is not None:
        mu = np.asarray(capacity, dtype=np.float64)
    else:
        mu = mobius_to_capacity(mobius)
    if mu.shape != (2**m,):
        raise ValueError(
            f"x has {m} columns, so the capacity needs 2**{m} = {2**m} entries; "
            f"got shape {mu.shape}."
        )
    d, top = top_sets(x)  # largest first; masks of the top-1, top-2, ... sets
    diffs = d - np.concatenate([d[..., 1:], np.zeros_like(d[..., :1])], -1)
    return (diffs * mu[top]).sum(-1)


def _pairwise_min(x: torch.Tensor) -> torch.Tensor:
    """``min(x_i, x_j)`` for ``i < j`` over the last axis, in ``triu_indices`` order."""
    m = x.shape[-1]
    parts = [torch.minimum(x[..., i : i + 1], x[..., i + 1 :]) for i in range(m - 1)]
    return torch.cat(parts, -1)


def _sorted_integral(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Sort-based Choquet integral of ``x (..., c, m)`` with ``mu (cap, 2**m)``.

    ``cap`` is 1 (shared) or ``c`` (one capacity per column ``c``).
    """
    d, vals = chain_values(x, mu)
    diffs = d - torch.cat([d[..., 1:], torch.zeros_like(d[..., :1])], -1)
    return (diffs * vals).sum(-1)


# ======================================================================================
# The aggregation function
# ======================================================================================
class Choquet(Aggregator):
    """Choquet integral of the base models' outputs with a learned k-additive capacity.

    For each class ``c`` the base models' probabilities ``x = (p_1c, ...,
    p_mc)`` are aggregated by the discrete Choquet integral ``C(x) = sum_T
    m(T) min_{i in T} x_i`` with a capacity in Möbius representation ``m``,
    k-additive (``m(T) = 0`` for ``|T| > k``). ``k = 1`` is a weighted mean;
    ``k = 2`` adds one interaction per pair of models (a pair can be
    *redundant*, ``m({i,j}) < 0``, or *complementary*, ``m({i,j}) > 0``);
    ``k = m`` is a full capacity.

    Output map (choquistic regression, Tehrani et al. 2012):

    * binary classification: one integral over the positive class
      probabilities, ``P(y = 1) = sigmoid(gamma (C(x) - beta))``;
    * ``C > 2`` classes: one-vs-rest scores normalised,
      ``P(y = c) ∝ sigmoid(gamma (C_c(x) - beta_c))`` (log-scores
      ``log sigmoid(.)``);
    * regression: the standardised predictions are mapped to ``[0, 1]`` by
      one affine map per target learned on the training rows (min / max over
      rows and models, common to all models so that they stay comparable);
      the output is mapped back by the inverse map with a learnable scale
      ``a > 0`` and offset ``b``: ``y = lo + (hi - lo) (a C(x) + b)``. (The
      integral of a normalised capacity commutes with positive affine maps,
      so inputs outside ``[0, 1]`` at predict time are fine: they are not
      clipped.)

    The thresholds ``beta`` are learned with the capacity; the gain
    ``gamma = 1 / temperature`` is a hyperparameter tuned by hypergradient on
    the validation split, i.e. the scores' temperature is calibrated out of
    sample. So the choquistic map has both a learned threshold and a learned
    scale, as specified; the scale is learned at the outer level, and it *is*
    the output temperature among the tuned hyperparameters (interaction
    penalty, output temperature, L2). (A gain learned with the capacity as
    well would make a temperature redundant: the two enter only through
    their product, so the outer and inner problems would pull on the same
    direction, and the inner problem would gain a flat one.)

    **Monotonicity and normalisation are guaranteed by the parametrisation**
    (no projection):

    * ``k <= 2`` (any number of models): one free parameter per singleton
      and per pair, mapped to Möbius masses that meet the exact 2-additive
      monotonicity condition and sum to 1
      (:func:`~aggregators._capacity.two_additive_masses`). Pair masses of
      either sign are allowed, and every 2-additive capacity with positive
      monotonicity slacks is reached exactly (the others as limits). ``k =
      1`` keeps the singletons only: ``softmax(a)``, a weighted mean.
    * ``3 <= k < m`` (``m <= 12``): a softmax mixture of extreme k-additive
      capacities (:func:`~aggregators._capacity.atom_mixture_masses`): every
      k-additive belief and plausibility function and every 2-additive
      capacity, but not every k-additive capacity.
    * ``k >= m`` (full capacity, ``m <= 12``): unconstrained increments on
      the lattice through a smooth maximum
      (:func:`~aggregators._capacity.full_capacity`); every monotone capacity
      is reached (strictly monotone ones exactly, the rest as limits).

    Full or ``k >= 3`` capacities over ``m > 12`` models (``2**m`` subsets)
    are refused with a ``UserWarning`` and fall back to ``k = 2``.

    Hyperparameters tuned by hypergradient: ``temperature`` (classifiers),
    ``interaction`` (weight of ``P * sum_{|T| >= 2} m(T)**2``, ``P`` the
    number of such subsets: pulls towards an additive capacity, i.e. a
    weighted mean) and ``l2`` (on the raw parameters, taken from the start
    point, which is the uniform average for ``k <= 2`` and ``k >= m``; also
    pulls the regression output scale's logarithm towards 0).

    The validation loss they are tuned on charges each validation row
    ``1 / (n + 1)`` of the loss it would pay on an error (``n`` validation
    rows; classifiers): ``n`` rows cannot show an error rate below about
    ``1 / (n + 1)``, and without the charge a validation set that holds no
    error rewards sharpening the scores until the temperature reaches its
    floor, to be paid for at the first test error. ``validation_loss_`` is
    that charged loss.

    Parameters
    ----------
    additivity : int or "full", default=2
        ``k``: the largest coalition with a Möbius mass of its own.
    share : {"global", "per_class"}, default="global"
        One capacity for every class (or target), or one per class (or
        target). Binary classifiers always use one (positive-class) capacity.
    temperature : float, default=0.1
        Initial output temperature ``1 / gamma`` (classifiers).
    interaction : float, default=1e-2
        Initial weight of the interaction penalty.
    l2 : float, default=1e-3
        Initial L2 weight on the raw parameters.

    Attributes
    ----------
    Available on the fitted copy ``estimator.aggregator_``:
    :meth:`mobius`, :meth:`capacity`, :meth:`shapley_values`,
    :meth:`interaction_indices`.

    See Also
    --------
    choquet_integral, mobius_to_capacity, capacity_to_mobius,
    shapley_from_mobius, interaction_from_mobius

    Notes
    -----
    For ``k <= 2`` the forward pass is ``[x, F] . [m_1, m_2]`` with
    ``F`` the pairwise minima of the inputs; ``[x, F]`` does not depend on the
    parameters: while fitting it is computed once per data tensor and kept
    (up to 3 GiB), so each forward pass is one matrix-vector product. The
    inner problem's gradient and Hessian blocks are then in closed form
    (:mod:`aggregators._choquet_analytic`: the loss's curvature in each row's
    integrals contracted with the features, carried to the free parameters
    by the chain rule through the small masses map), with no autograd pass
    per parameter over the rows. For
    ``k >= 3`` the sort-based formula with the capacity on the lattice is
    used (``O(m log m)`` per row).

    References
    ----------
    M. Grabisch, "k-order additive discrete fuzzy measures and their
    representation", Fuzzy Sets and Systems 92 (1997).
    A. F. Tehrani, W. Cheng, K. Dembczynski, E. Hüllermeier, "Learning
    monotone nonlinear models using the Choquet integral", Machine Learning
    89 (2012).

    Examples
    --------
    >>> from aggregators import AggregatedClassifier
    >>> from aggregators.choquet import Choquet
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.naive_bayes import GaussianNB
    >>> from sklearn.tree import DecisionTreeClassifier
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> clf = AggregatedClassifier(
    ...     [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=3))],
    ...     aggregator=Choquet(), cv=None, random_state=0).fit(X, y)
    >>> round(float(clf.aggregator_.shapley_values().sum()), 6)
    1.0
    """

    short_name = "choquet"
    # The integral takes minima (and, for k >= 3, a sort) of its inputs.
    smooth_in_outputs = False
    # The temperature scales a score in [-1, 1]: on validation rows without
    # an error, the plain loss falls all the way to the temperature's floor.
    charge_unseen_errors = True

    def __init__(
        self,
        additivity=2,
        *,
        share: str = "global",
        temperature: float = 0.1,
        interaction: float = 1e-2,
        l2: float = 1e-3,
    ):
        self.additivity = additivity
        self.share = share
        self.temperature = temperature
        self.interaction = interaction
        self.l2 = l2

    # -- structure -----------------------------------------------------------------
    def _requested_k(self, m: int) -> int:
        k = self.additivity
        if isinstance(k, str):
            if k != "full":
                raise ValueError(f"additivity must be a positive int or 'full'; got {k!r}.")
            return m
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"additivity must be a positive int or 'full'; got {k!r}.")
        return min(int(k), m)

    def _k(self, m: int) -> int:
        """Effective additivity: ``>= 3`` needs the lattice, so ``m <= 12``."""
        k = self._requested_k(m)
        return 2 if (k >= 3 and m > MAX_FULL_MODELS) else k

    def check_task(self, ctx: AggregationContext) -> None:
        if self.share not in ("global", "per_class"):
            raise ValueError(f"share must be 'global' or 'per_class'; got {self.share!r}.")
        m = ctx.n_models
        k = self._requested_k(m)
        if k >= 3 and m > MAX_FULL_MODELS:
            what = "a full capacity" if k >= m else f"a {k}-additive capacity"
            warnings.warn(
                f"{what} over {m} models has 2**{m} subsets; capacities with k >= 3 "
                f"are learned for at most {MAX_FULL_MODELS} models. Using a 2-additive "
                "capacity instead (additivity=2 silences this).",
                UserWarning,
                stacklevel=3,
            )

    # -- declared interface ----------------------------------------------------------
    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        hp = [Hyperparameter("l2", self.l2, 1e-6, 1e2, penalty=True)]
        if self._k(ctx.n_models) >= 2:
            hp.insert(0, Hyperparameter("interaction", self.interaction, 1e-6, 1e2,
                                           penalty=True))
        if ctx.task == "classification":
            hp.insert(0, Hyperparameter("temperature", self.temperature, 1e-3, 1e3))
        return hp

    def fit_buffers(self, ctx, Z, y, X=None) -> Params:
        return unit_interval_buffers(ctx, Z)

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        m = ctx.n_models
        k = self._k(m)
        cap = n_capacities(self.share, ctx)
        if self._uses_lattice(m):
            # mu(A) = |A| / m: the uniform average.
            start = torch.as_tensor(lattice_start(m), device=ctx.device, dtype=ctx.dtype)
            params = {"capacity_raw": start.repeat(cap, 1)}
        elif k <= 2:
            # a = 0, p = 0: equal singleton masses, no interaction: the uniform average.
            params = {"singleton_raw": ctx.zeros(cap, m)}
            if k == 2:
                params["pair_raw"] = ctx.zeros(cap, m * (m - 1) // 2)
        else:
            params = {"capacity_raw": ctx.zeros(cap, k_additive_atoms(m, k)[1])}
        params.update(threshold_params(ctx) if ctx.task == "classification" else affine_params(ctx))
        return params

    def _uses_lattice(self, m: int) -> bool:
        return self._k(m) >= m and m >= 3

    @staticmethod
    def _masses(params: Params, m: int) -> torch.Tensor:
        """Möbius masses ``(cap, P)`` of the singletons and pairs (``k <= 2``)."""
        return two_additive_masses(params["singleton_raw"], params.get("pair_raw"), m)

    def _sparse_masses(self, params: Params, m: int) -> torch.Tensor:
        """Möbius masses ``(cap, P)`` over the subsets of :func:`k_additive_atoms` (not full)."""
        if "singleton_raw" in params:
            return self._masses(params, m)
        return atom_mixture_masses(params["capacity_raw"], m, self._k(m))

    def _capacity_lattice(self, params: Params, m: int) -> torch.Tensor:
        """Dense capacity ``(cap, 2**m)`` (full, or ``k >= 3``)."""
        if self._uses_lattice(m):
            return full_capacity(params["capacity_raw"], m)
        masses = self._sparse_masses(params, m)
        masks = torch.as_tensor(k_additive_atoms(m, self._k(m))[5], device=masses.device)
        dense = masses.new_zeros(masses.shape[0], 2**m).index_add(1, masks, masses)
        return zeta_torch(dense)

    def _interaction_masses(self, params: Params, m: int) -> torch.Tensor:
        """Möbius masses of the subsets with ``|T| >= 2``, ``(cap, P)``."""
        if self._uses_lattice(m):
            mob = zeta_torch(full_capacity(params["capacity_raw"], m), inverse=True)
            size = torch.as_tensor(popcount(np.arange(2**m)), device=mob.device)
            return mob[:, size >= 2]
        return self._sparse_masses(params, m)[:, m:]

    # -- the integral --------------------------------------------------------------
    def _integral(self, params: Params, x: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
        """Choquet integral of ``x (n, c, m)`` -> ``(n, c)``."""
        m = x.shape[-1]
        if "singleton_raw" not in params:
            return _sorted_integral(x, self._capacity_lattice(params, m))
        masses = self._masses(params, m)  # (cap, m [+ m(m-1)/2])
        # Linear in the masses: one product with the features [x, pairwise minima].
        # (An elementwise x * masses would cost the Hessian's probes a copy of x
        # each in the backward of the backward; a matrix product does not.)
        feats = self._features(x, Z, masses.shape[1] > m)
        if masses.shape[0] == 1:
            return feats @ masses[0]
        return torch.einsum("ncp,cp->nc", feats, masses)

    def _features(self, x: torch.Tensor, Z: torch.Tensor, pairs: bool) -> torch.Tensor:
        """``(n, c, m [+ m(m-1)/2])``: ``x`` and, with ``pairs``, its pairwise minima."""
        if not pairs:
            return x
        # The features do not depend on the parameters; while fitting, the same
        # data tensor goes through hundreds of forward passes, so they are
        # computed once per tensor (looked up by identity, dropped with it).
        if not torch.is_grad_enabled():
            return torch.cat([x, _pairwise_min(x)], -1)
        cache = self.__dict__.setdefault("_feature_cache", {})
        key = id(Z)
        hit = cache.get(key)
        if hit is not None and hit[0]() is Z and hit[1].shape[:-1] == x.shape[:-1]:
            return hit[1]
        feats = torch.cat([x, _pairwise_min(x)], -1)
        used = sum(v[1].numel() * v[1].element_size() for v in cache.values())
        if used + feats.numel() * feats.element_size() <= _CACHE_BYTES:
            cache[key] = (weakref.ref(Z), feats)
            weakref.finalize(Z, cache.pop, key, None)
        return feats

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_feature_cache", None)  # weak references do not pickle
        return state

    def forward(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        if self._classifier:
            c = self._integral(params, class_inputs(Z, self._binary), Z)
            return threshold_scores(c, params["threshold"], hyper["temperature"], self._binary)
        lo, span = params["x_low"], params["x_span"]
        c_z = self._integral(params, Z.transpose(1, 2), Z)  # integral of standardised outputs
        # lo + span * (a * C(x) + b) with x = (z - lo) / span and C(x) = (C(z) - lo) / span.
        scale = torch.exp(RHO_SCALE * params["log_scale"])
        return lo + scale * (c_z - lo) + RHO_OFFSET * span * params["offset"]

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        m = self.n_models_
        sq = sum(params[k].pow(2).sum() for k in ("singleton_raw", "pair_raw") if k in params)
        if "capacity_raw" in params:
            raw = params["capacity_raw"]
            ref = (
                torch.as_tensor(lattice_start(m), device=raw.device, dtype=raw.dtype)
                if self._uses_lattice(m) else 0.0
            )
            sq = sq + (raw - ref).pow(2).sum()
        if not self._classifier:  # the log of the regression output scale
            sq = sq + (RHO_SCALE * params["log_scale"]).pow(2).sum()
        pen = 0.5 * hyper["l2"][0] * sq
        if "interaction" in hyper:
            inter = self._interaction_masses(params, m)
            pen = pen + hyper["interaction"][0] * inter.shape[1] * inter.pow(2).sum(1).mean()
        return pen

    # -- readable views of the fitted state ---------------------------------------
    def _fitted_capacity_params(self) -> Params:
        self._check_fitted()
        return {
            k: torch.as_tensor(v, dtype=torch.float64)
            for k, v in self.params_.items()
            if k in ("singleton_raw", "pair_raw", "capacity_raw")
        }

    def _mobius_table(self) -> tuple[list, np.ndarray]:
        """``(subsets as index tuples, masses (cap, P))`` of the fitted capacity."""
        params = self._fitted_capacity_params()
        m = self.n_models_
        with torch.no_grad():
            if self._uses_lattice(m):
                cap = full_capacity(params["capacity_raw"], m)
                mob = zeta_torch(cap, inverse=True).numpy()[:, 1:]
                return list(coalition_index(list(range(m)), range(1, 2**m))), mob
            return list(k_additive_atoms(m, self._k(m))[0]), self._sparse_masses(params, m).numpy()

    def _capacity_columns(self) -> list | None:
        n_cap = next(iter(self._fitted_capacity_params().values())).shape[0]
        return capacity_columns(n_cap, self.classes_)

    def _frame(self, values: np.ndarray, index, name: str):
        return capacity_frame(values, index, name, self._capacity_columns())

    def mobius(self) -> pd.Series | pd.DataFrame:
        """Möbius masses of the fitted capacity, indexed by coalition.

        Returns
        -------
        Series or DataFrame
            Index: tuples of base-model names (every subset with a mass of its
            own: ``|T| <= k``); one column per class when capacities are per
            class.
        """
        sets, vals = self._mobius_table()
        names = self.model_names_
        index = pd.Index([tuple(names[i] for i in s) for s in sets], tupleize_cols=False)
        return self._frame(vals, index, "mobius")

    def capacity(self, coalition=None):
        """The fitted capacity ``mu``.

        Parameters
        ----------
        coalition : iterable of str, default=None
            Base-model names; when given, ``mu`` of that one coalition (a
            float, or a Series by class). When omitted, ``mu`` of every subset
            (needs at most 20 models).

        Returns
        -------
        float, Series or DataFrame
        """
        sets, vals = self._mobius_table()
        names = self.model_names_
        cols = self._capacity_columns()
        if coalition is not None:
            members = coalition_members(names, coalition)
            inside = np.array([set(s) <= members for s in sets])
            mu = vals[:, inside].sum(1)
            return float(mu[0]) if cols is None else pd.Series(mu, index=cols, name="capacity")
        m = len(names)
        if m > 20:
            raise ValueError(
                f"the capacity of all 2**{m} coalitions is too large to list; ask for "
                "one coalition with capacity(coalition=[...]), or use mobius()."
            )
        dense = np.zeros((vals.shape[0], 2**m))
        masks = [sum(1 << i for i in s) for s in sets]
        dense[:, masks] = vals
        mu = mobius_to_capacity(dense)
        return self._frame(mu, coalition_index(names, range(2**m)), "capacity")

    def shapley_values(self) -> pd.Series | pd.DataFrame:
        """Shapley value of each base model, ``phi_i = sum_{T containing i} m(T) / |T|``.

        Returns
        -------
        Series or DataFrame
            Indexed by base-model name, summing to 1 (a column per class when
            capacities are per class).
        """
        sets, vals = self._mobius_table()
        m = len(self.model_names_)
        out = np.stack([shapley_from_mobius(dict(zip(sets, v)), m) for v in vals])
        return self._frame(out, pd.Index(self.model_names_), "shapley")

    def interaction_indices(self, output=None) -> pd.DataFrame:
        """Pairwise Shapley interaction indices, models x models.

        ``I_ij = sum_{T containing i, j} m(T) / (|T| - 1)``: negative for a
        redundant pair, positive for a complementary one; 0 on the diagonal.

        Parameters
        ----------
        output : label, default=None
            The class (or target) whose capacity to use when capacities are
            per class; default: the mean of the per-class indices.

        Returns
        -------
        DataFrame
        """
        sets, vals = self._mobius_table()
        names = self.model_names_
        m = len(names)
        mats = np.stack([interaction_from_mobius(dict(zip(sets, v)), m) for v in vals])
        cols = self._capacity_columns()
        if output is None:
            mat = mats.mean(0)
        else:
            if cols is None or output not in cols:
                raise ValueError(
                    f"output={output!r} names no per-class capacity; capacities: "
                    f"{cols if cols is not None else 'one, shared'}."
                )
            mat = mats[cols.index(output)]
        return pd.DataFrame(mat, index=names, columns=names)
