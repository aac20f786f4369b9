"""The discrete Choquet integral with a learned k-additive capacity.

The Choquet integral of inputs ``x in R^m`` (here: the base models' outputs
for one class) with respect to a capacity ``mu`` (a set function with
``mu(empty) = 0``, ``mu(N) = 1`` and ``A subset B => mu(A) <= mu(B)``) is

    C_mu(x) = sum_i (x_(i) - x_(i-1)) mu(A_(i)),   x_(1) <= ... <= x_(m),

with ``x_(0) = 0`` and ``A_(i) = {(i), ..., (m)}``; in Möbius form
``C(x) = sum_{T != empty} m(T) min_{i in T} x_i`` with ``mu(A) = sum_{B
subset A} m(B)`` (Grabisch; ``../shared/FORMULAS.md``). A capacity can
express that two models are redundant (``m({i, j}) < 0``: the pair is worth
less than its parts) or complementary (``m({i, j}) > 0``: trust them when
they agree), which a weighted mean cannot.

Capacities are stored as arrays over the ``2**m`` subsets of the models in
*binary order*: entry ``mask`` is the subset ``{i : mask >> i & 1}``, so for
three models the order is ``{}, {0}, {1}, {0,1}, {2}, {0,2}, {1,2}, {0,1,2}``.
Sparse (k-additive) Möbius masses can also be given as a mapping from tuples
of model indices to masses.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from itertools import combinations
from typing import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ._base import AggregationContext, Aggregator, Hyperparameter, Params, unit_interval_scale

__all__ = [
    "Choquet",
    "capacity_to_mobius",
    "choquet_integral",
    "interaction_from_mobius",
    "is_capacity",
    "mobius_to_capacity",
    "shapley_from_mobius",
]

#: Largest number of models for which a full (or k >= 3) capacity is learned.
MAX_FULL_MODELS = 12

#: Bytes of pairwise-minimum features kept between forward passes while fitting.
_CACHE_BYTES = 3 * 2**30

# Temperature of the smooth maximum over a subset's predecessors in the full
# capacity's parametrisation (see _full_capacity).
_LATTICE_T = 0.1

# Scales of the output map's parameters (see Choquet._gain_threshold): they
# keep the inner Hessian's diagonal within ~2 orders of magnitude.
_RHO_THRESHOLD, _RHO_SCALE, _RHO_OFFSET = 0.2, 0.05, 0.1


# ======================================================================================
# Pure functions on capacities (numpy, float64)
# ======================================================================================
def _models_in(length: int) -> int:
    m = int(round(math.log2(length))) if length > 0 else -1
    if m < 0 or 2**m != length:
        raise ValueError(
            f"a dense capacity or Möbius array has 2**m entries (one per subset, in "
            f"binary order); got {length}."
        )
    return m


def _popcount(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks, dtype=np.int64)
    out = np.zeros_like(masks)
    for b in range(63):
        if not (masks >> b).any():
            break
        out += (masks >> b) & 1
    return out


def _subset_transform(v: np.ndarray, inverse: bool) -> np.ndarray:
    """Zeta (``inverse=False``) or Möbius transform over the last axis (2**m)."""
    v = np.array(v, dtype=np.float64, copy=True)
    m = _models_in(v.shape[-1])
    lead = v.shape[:-1]
    for b in range(m):
        w = v.reshape(*lead, -1, 2, 2**b)
        if inverse:
            w[..., 1, :] -= w[..., 0, :]
        else:
            w[..., 1, :] += w[..., 0, :]
    return v


def mobius_to_capacity(mobius) -> np.ndarray:
    """Capacity ``mu(A) = sum_{B subset A} m(B)`` from Möbius masses.

    Parameters
    ----------
    mobius : array-like of shape (..., 2**m) or mapping
        Dense masses in binary subset order, or a mapping from tuples of model
        indices to masses (missing subsets have mass 0; ``m`` is then the
        largest index plus one).

    Returns
    -------
    ndarray of shape (..., 2**m)
    """
    return _subset_transform(_dense_mobius(mobius), inverse=False)


def capacity_to_mobius(capacity) -> np.ndarray:
    """Möbius masses ``m(A) = sum_{B subset A} (-1)^{|A - B|} mu(B)`` of a capacity.

    Parameters
    ----------
    capacity : array-like of shape (..., 2**m)
        Dense capacity in binary subset order.

    Returns
    -------
    ndarray of shape (..., 2**m)
    """
    return _subset_transform(np.asarray(capacity, dtype=np.float64), inverse=True)


def _dense_mobius(mobius, n_models: int | None = None) -> np.ndarray:
    if isinstance(mobius, Mapping):
        sets = [tuple(int(i) for i in s) for s in mobius]
        m = n_models if n_models is not None else 1 + max(max(s) for s in sets if s)
        if m > 24:
            raise ValueError(f"a dense array over 2**{m} subsets is too large.")
        out = np.zeros(2**m)
        for s, val in zip(sets, mobius.values()):
            out[sum(1 << i for i in set(s))] += float(val)
        return out
    return np.asarray(mobius, dtype=np.float64)


def _sparse_mobius(mobius, n_models: int | None = None):
    """``(incidence (P, m) bool, masses (P,))`` of the nonempty subsets given."""
    if isinstance(mobius, Mapping):
        sets = [tuple(sorted(set(int(i) for i in s))) for s in mobius]
        vals = np.array([float(v) for v in mobius.values()])
        m = n_models if n_models is not None else 1 + max(max(s) for s in sets if s)
        inc = np.zeros((len(sets), m), dtype=bool)
        for p, s in enumerate(sets):
            inc[p, list(s)] = True
        keep = inc.any(1)
        return inc[keep], vals[keep]
    v = np.asarray(mobius, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"expected one Möbius vector of shape (2**m,); got {v.shape}.")
    m = _models_in(v.shape[0])
    masks = np.arange(1, 2**m)
    inc = ((masks[:, None] >> np.arange(m)) & 1).astype(bool)
    return inc, v[1:]


def shapley_from_mobius(mobius, n_models: int | None = None) -> np.ndarray:
    """Shapley values ``phi_i = sum_{T containing i} m(T) / |T|``.

    Parameters
    ----------
    mobius : array-like of shape (2**m,) or mapping
        Dense masses (binary order) or a mapping from tuples of model indices.
    n_models : int, default=None
        Number of models when ``mobius`` is a mapping (default: largest index + 1).

    Returns
    -------
    ndarray of shape (m,)
        They sum to ``sum_T m(T)`` (1 for a normalised capacity) and are
        nonnegative for a monotone one.
    """
    inc, vals = _sparse_mobius(mobius, n_models)
    size = inc.sum(1)
    return (vals / size) @ inc.astype(np.float64)


def interaction_from_mobius(mobius, n_models: int | None = None) -> np.ndarray:
    """Pairwise Shapley interaction ``I_ij = sum_{T containing i, j} m(T) / (|T| - 1)``.

    Parameters
    ----------
    mobius : array-like of shape (2**m,) or mapping
    n_models : int, default=None

    Returns
    -------
    ndarray of shape (m, m)
        Symmetric; ``I_ij < 0`` for a redundant pair, ``> 0`` for a
        complementary one. The diagonal is set to 0 (the index is defined for
        pairs only).
    """
    inc, vals = _sparse_mobius(mobius, n_models)
    size = inc.sum(1)
    keep = size >= 2
    B = inc[keep].astype(np.float64)
    w = vals[keep] / (size[keep] - 1)
    out = (B * w[:, None]).T @ B
    np.fill_diagonal(out, 0.0)
    return out


def is_capacity(capacity, atol: float = 1e-10) -> bool:
    """Whether a dense array is a normalised monotone capacity (all subsets checked)."""
    mu = np.asarray(capacity, dtype=np.float64)
    m = _models_in(mu.shape[-1])
    if abs(mu[0]) > atol or abs(mu[-1] - 1.0) > atol:
        return False
    masks = np.arange(2**m)
    for b in range(m):
        without = masks[(masks >> b) & 1 == 0]
        if np.any(mu[without | (1 << b)] < mu[without] - atol):
            return False
    return True


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
    The worked example of Grabisch (``../shared/FORMULAS.md``):

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
        inc, vals = _sparse_mobius(mobius, m)
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
    order = np.argsort(-x, axis=-1, kind="stable")  # largest first
    d = np.take_along_axis(x, order, -1)
    top = np.cumsum(1 << order, axis=-1)  # masks of the top-1, top-2, ... sets
    diffs = d - np.concatenate([d[..., 1:], np.zeros_like(d[..., :1])], -1)
    return (diffs * mu[top]).sum(-1)


# ======================================================================================
# torch building blocks
# ======================================================================================
def _zeta_torch(v: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Out-of-place (autograd-friendly) zeta / Möbius transform over the last axis."""
    m = int(round(math.log2(v.shape[-1])))
    lead = v.shape[:-1]
    for b in range(m):
        w = v.reshape(*lead, -1, 2, 2**b)
        lo, hi = w[..., 0, :], w[..., 1, :]
        hi = hi - lo if inverse else hi + lo
        v = torch.stack([lo, hi], -2).reshape(*lead, -1)
    return v


@functools.lru_cache(maxsize=32)
def _atoms(m: int, k: int):
    """Extreme capacities the k-additive parametrisation mixes, as Möbius masses.

    Coordinates: every subset ``T`` with ``1 <= |T| <= k`` (by size, then
    lexicographic; for ``k = 2`` the singletons then the pairs in
    ``torch.triu_indices`` order). Atoms: the dictator ``x_i`` (mass 1 on
    ``{i}``), and for each ``|S| >= 2`` the minimum over ``S`` (mass 1 on
    ``S``) and the maximum over ``S`` (mass ``(-1)^{|T|+1}`` on each
    nonempty ``T subset S``).
    """
    sets = [s for j in range(1, k + 1) for s in combinations(range(m), j)]
    index = {s: p for p, s in enumerate(sets)}
    atom_idx, set_idx, coef = [], [], []
    a = 0
    for i in range(m):
        atom_idx.append(a), set_idx.append(index[(i,)]), coef.append(1.0)
        a += 1
    for s in sets[m:]:
        atom_idx.append(a), set_idx.append(index[s]), coef.append(1.0)  # min_S
        a += 1
        for j in range(1, len(s) + 1):  # max_S
            for t in combinations(s, j):
                atom_idx.append(a), set_idx.append(index[t]), coef.append((-1.0) ** (j + 1))
        a += 1
    masks = np.array([sum(1 << i for i in s) for s in sets], dtype=np.int64)
    return (
        sets,
        a,
        np.asarray(atom_idx, dtype=np.int64),
        np.asarray(set_idx, dtype=np.int64),
        np.asarray(coef),
        masks,
    )


def _pair_index(m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the pairs ``i < j`` in ``torch.triu_indices`` order."""
    rc = torch.triu_indices(m, m, 1, device=device)
    return rc[0], rc[1]


@functools.lru_cache(maxsize=16)
def _lattice(m: int):
    """Subsets by level (cardinality): the predecessors of each for the full capacity.

    Returns ``(levels, pos)``: ``levels[l-1]`` is an index array ``(n_l, l)``
    into the level-ordered concatenation of levels ``1 .. l-1`` (with a
    leading 0 for the empty set) giving ``A - {i}`` for every ``i in A``;
    ``pos[mask]`` is the place of ``mask`` in the level-ordered vector with
    the empty set first.
    """
    masks = np.arange(2**m)
    size = _popcount(masks)
    order = np.lexsort((masks, size))  # by size, then mask; order[0] = empty set
    pos = np.empty(2**m, dtype=np.int64)
    pos[order] = np.arange(2**m)
    levels = []
    for ell in range(1, m + 1):
        lvl = order[size[order] == ell]
        bits = (lvl[:, None] >> np.arange(m)) & 1
        preds = np.stack(
            [pos[mask ^ (1 << np.flatnonzero(b))] for mask, b in zip(lvl, bits)]
        )
        levels.append(preds)
    return levels, pos


def _full_capacity(raw: torch.Tensor, m: int) -> torch.Tensor:
    """Monotone normalised capacity (binary order) from unconstrained increments.

    ``nu(A) = smax_{i in A} nu(A - {i}) + softplus(raw_A)``, ``nu(empty) = 0``,
    ``mu = nu / nu(N)``, with the smooth maximum ``smax(v) = tau log sum_i
    e^{v_i / tau} >= max(v)`` (``tau = 0.1``, in units of ``nu``, whose
    levels are about 1 apart): every subset is above all of its predecessors,
    so ``mu`` is monotone, and dividing by ``nu(N) > 0`` normalises it.

    A hard max has a kink wherever two predecessors tie -- at the uniform
    start, every subset -- and L-BFGS stalls there: measured on the
    benchmark's breast_cancer pool (6 models, 136 rows), the inner solve
    stopped after 50 iterations with a gradient of 5e-4 at ``T = 0.1`` (167
    iterations, 2.5e-3 at ``T = 0.03``), never reaching its tolerance 1e-7,
    so the implicit hypergradients were taken at a non-optimum; with the
    smooth maximum it converges in 78 (90) iterations.

    Every strictly monotone capacity is still reached exactly: scale it by
    ``c`` so large that every gap ``c (mu(A) - max_i mu(A - {i}))`` exceeds
    ``tau log m``, the most by which ``smax`` exceeds ``max``, and take
    ``softplus(raw_A)`` the rest of the gap. The others are limits.
    """
    levels, pos = _lattice(m)
    inc = F.softplus(raw)
    vals = [raw.new_zeros(*raw.shape[:-1], 1)]
    off = 0
    for preds in levels:
        n_l = preds.shape[0]
        prev = torch.cat(vals, -1)
        idx = torch.as_tensor(preds, device=raw.device)
        best = _LATTICE_T * torch.logsumexp(prev[..., idx] / _LATTICE_T, -1)
        vals.append(best + inc[..., off : off + n_l])
        off += n_l
    nu = torch.cat(vals, -1)[..., torch.as_tensor(pos, device=raw.device)]
    return nu / nu[..., -1:]


@functools.lru_cache(maxsize=16)
def _lattice_start(m: int) -> np.ndarray:
    """Increments (level order, ``2**m - 1``) for which :func:`_full_capacity` is ``|A| / m``.

    At level ``l`` every subset has ``l`` predecessors worth ``l - 1``, whose
    smooth maximum is ``l - 1 + tau log l``; the increment ``1 - tau log l``
    (positive for ``m <= 12``) brings the subset to exactly ``l``.
    """
    levels, _ = _lattice(m)
    out = []
    for ell, preds in enumerate(levels, start=1):
        step = 1.0 - _LATTICE_T * math.log(ell)
        out.append(np.full(preds.shape[0], step + math.log(-math.expm1(-step))))
    return np.concatenate(out)


def _pairwise_min(x: torch.Tensor) -> torch.Tensor:
    """``min(x_i, x_j)`` for ``i < j`` over the last axis, in ``triu_indices`` order."""
    m = x.shape[-1]
    parts = [torch.minimum(x[..., i : i + 1], x[..., i + 1 :]) for i in range(m - 1)]
    return torch.cat(parts, -1)


def _sorted_integral(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Sort-based Choquet integral of ``x (..., c, m)`` with ``mu (cap, 2**m)``.

    ``cap`` is 1 (shared) or ``c`` (one capacity per column ``c``).
    """
    d, order = torch.sort(x, dim=-1, descending=True)
    top = torch.cumsum(torch.bitwise_left_shift(torch.ones_like(order), order), -1)
    diffs = d - torch.cat([d[..., 1:], torch.zeros_like(d[..., :1])], -1)
    cap, size = mu.shape
    if cap == 1:
        vals = mu[0][top]
    else:
        offs = torch.arange(cap, device=x.device).mul_(size)[:, None]
        vals = mu.reshape(-1)[top + offs]
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
    penalty, output temperature, L2). (A gain learned with the capacity as well would make a
    temperature redundant: the two enter only through their product. Such a
    variant, with the L2 pulling ``log gamma`` towards ``-log temperature``,
    drove the temperature to its bound and fitted 3 to 6 times slower for the
    same test log-loss on the bundled datasets.)

    **Monotonicity and normalisation are guaranteed by the parametrisation**
    (no projection):

    * ``k = 2`` (any number of models): singleton parameters ``a_i`` and
      free pair parameters ``p_ij``; with ``s_i = exp(a_i)`` and the smooth
      ``phi(t) = tau softplus(t / tau) >= max(0, t)``, ``tau = 1 / (m - 1)``:
      ``m({i,j}) = p_ij / Z`` and ``m({i}) = (s_i + sum_j phi(-p_ij)) / Z``,
      ``Z = sum_i s_i + sum_{i<j} (p_ij + 2 phi(-p_ij))`` (> 0).
      Because ``phi(-p) >= max(0, -p)``, the exact 2-additive
      monotonicity condition ``m({i}) + sum_j min(0, m({i,j})) >= s_i / Z >
      0`` holds, and the ``phi`` terms cancel in the total, so ``sum_T
      m(T) = 1`` exactly. Pair masses of either sign are allowed (a softmax
      over nonnegative masses would give only belief functions, without
      redundancy). **Every** 2-additive capacity whose monotonicity slacks
      ``m({i}) + sum_j min(0, m({i,j}))`` are all positive is reached
      exactly (take ``p = c m({i,j})``, ``s_i = c m({i}) - sum_j
      phi(-c m({i,j}))`` for a large enough ``c``; then ``Z = c``); those
      with a zero slack (e.g. exactly the minimum of two models) are limits.
      Unlike a softmax over the ``m**2`` extreme 2-additive capacities
      (dictators, pairwise minima and maxima), this has one parameter per
      Möbius mass, so the inner problem has no flat directions of size
      ``m**2 / 2`` for L-BFGS to crawl along. ``k = 1`` keeps the
      singletons only: ``softmax(a)``, a weighted mean.
    * ``3 <= k < m`` (``m <= 12``): a softmax mixture of extreme
      k-additive capacities: the dictators ``x_i`` and the minimum and the
      maximum over every ``S`` with ``2 <= |S| <= k``. Every mixture is a
      valid k-additive capacity; the set reached is the convex hull of those
      atoms, which holds every k-additive belief function, every k-additive
      plausibility function and every 2-additive capacity, but **not** every
      k-additive capacity for ``k >= 3`` (their polytope has other vertices;
      for ``k = 2`` the dictators, minima and maxima are all its vertices).
    * ``k >= m`` (full capacity, ``m <= 12``): unconstrained increments on
      the lattice, ``nu(A) = smax_{i in A} nu(A - {i}) + softplus(r_A)``
      with a smooth maximum ``smax >= max`` (log-sum-exp, temperature 0.1;
      a hard max stalls L-BFGS at its kinks), ``mu = nu / nu(N)``. Every
      monotone capacity is reached (strictly monotone ones exactly, the rest
      as limits).

    Full or ``k >= 3`` capacities over ``m > 12`` models (``2**m`` subsets)
    are refused with a ``UserWarning`` and fall back to ``k = 2``.

    Hyperparameters tuned by hypergradient: ``temperature`` (classifiers),
    ``interaction`` (weight of ``P * sum_{|T| >= 2} m(T)**2``, ``P`` the
    number of such subsets: pulls towards an additive capacity, i.e. a
    weighted mean) and ``l2`` (on the raw parameters, measured from the start
    point, which is the uniform average for ``k <= 2`` and ``k >= m``; also
    pulls the regression output scale's logarithm towards 0).

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
    For ``k <= 2`` the forward pass is ``x . m_1 + F . m_2`` with
    ``F`` the pairwise minima of the inputs, which do not depend on the
    parameters: while fitting they are computed once per data tensor and kept
    (up to 3 GiB), so each L-BFGS step is one matrix-vector product. For
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

    def _n_capacities(self, task: str, n_outputs: int) -> int:
        binary = task == "classification" and n_outputs == 2
        return n_outputs if (self.share == "per_class" and not binary) else 1

    # -- declared interface ----------------------------------------------------------
    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        hp = [Hyperparameter("l2", self.l2, 1e-6, 1e2)]
        if self._k(ctx.n_models) >= 2:
            hp.insert(0, Hyperparameter("interaction", self.interaction, 1e-6, 1e2))
        if ctx.task == "classification":
            hp.insert(0, Hyperparameter("temperature", self.temperature, 1e-3, 1e3))
        return hp

    def fit_buffers(self, ctx, Z, y, X=None) -> Params:
        if ctx.task == "classification":
            return {}
        lo, span = unit_interval_scale(Z)
        return {"x_low": lo, "x_span": span}

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        m, c = ctx.n_models, ctx.n_outputs
        k = self._k(m)
        cap = self._n_capacities(ctx.task, c)
        if self._uses_lattice(m):
            # mu(A) = |A| / m: the uniform average.
            start = torch.as_tensor(_lattice_start(m), device=ctx.device, dtype=ctx.dtype)
            params = {"capacity_raw": start.repeat(cap, 1)}
        elif k <= 2:
            # a = 0, p = 0: equal singleton masses, no interaction: the uniform average.
            params = {"singleton_raw": ctx.zeros(cap, m)}
            if k == 2:
                params["pair_raw"] = ctx.zeros(cap, m * (m - 1) // 2)
        else:
            params = {"capacity_raw": ctx.zeros(cap, _atoms(m, k)[1])}
        if ctx.task == "classification":
            n_beta = 1 if c == 2 else c
            params["threshold"] = ctx.zeros(n_beta)
        else:
            params["log_scale"] = ctx.zeros(c)
            params["offset"] = ctx.zeros(c)
        return params

    def _uses_lattice(self, m: int) -> bool:
        return self._k(m) >= m and m >= 3

    def _n_models_of(self, params: Params) -> int:
        """Number of models from the shapes of the capacity parameters."""
        if "singleton_raw" in params:
            return params["singleton_raw"].shape[-1]
        n = params["capacity_raw"].shape[-1]
        if (n + 1) & n == 0 and self._uses_lattice(n.bit_length()):
            return n.bit_length()  # 2**m - 1 increments: the full capacity
        for m in range(4, MAX_FULL_MODELS + 1):
            # For a fixed k the number of atoms grows with m: one match at most.
            if 3 <= self._k(m) < m and _atoms(m, self._k(m))[1] == n:
                return m
        raise ValueError(f"cannot tell the number of models from {n} capacity parameters.")

    @staticmethod
    def _masses(params: Params, m: int) -> torch.Tensor:
        """Möbius masses ``(cap, P)`` of the singletons and pairs (``k <= 2``).

        ``s_i = exp(a_i)``, pair parameters ``p_ij`` free, ``phi(t) = tau
        softplus(t / tau)`` with ``tau = 1 / (m - 1)``:
        ``m({i,j}) = p_ij / Z``, ``m({i}) = (s_i + sum_j phi(-p_ij)) / Z``,
        ``Z = sum_i s_i + sum_{i<j} (p_ij + 2 phi(-p_ij))``. Since
        ``phi(-p) >= max(0, -p)``, ``m({i}) + sum_j min(0, m({i,j})) >=
        s_i / Z > 0``: the k=2 monotonicity condition holds. The ``phi`` terms
        cancel in ``sum_T m(T)``, so the masses sum to 1 exactly. (``tau``
        keeps the slack spent at ``p = 0`` to ``log 2`` per model, so that
        ``a`` and ``p`` move the masses on similar scales.)
        """
        a = params["singleton_raw"]
        shift = a.amax(-1, keepdim=True)  # every term is scaled by exp(-shift); Z cancels it
        s = torch.exp(a - shift)
        if "pair_raw" not in params or m < 2:
            return s / s.sum(-1, keepdim=True)
        q = params["pair_raw"]
        tau = 1.0 / (m - 1)
        scale = torch.exp(-shift)
        p = q * scale
        sp = tau * F.softplus(-q / tau) * scale
        rows, cols = _pair_index(m, a.device)
        slack = s.index_add(1, rows, sp).index_add(1, cols, sp)
        z = s.sum(-1, keepdim=True) + (p + 2 * sp).sum(-1, keepdim=True)
        return torch.cat([slack, p], -1) / z

    def _sparse_masses(self, params: Params, m: int) -> torch.Tensor:
        """Möbius masses ``(cap, P)`` over the subsets of :func:`_atoms` (not full)."""
        if "singleton_raw" in params:
            return self._masses(params, m)
        raw = params["capacity_raw"]
        sets, _, atom_idx, set_idx, coef, _ = _atoms(m, self._k(m))
        dev = raw.device
        w = torch.softmax(raw, dim=-1)
        contrib = w[..., torch.as_tensor(atom_idx, device=dev)] * torch.as_tensor(
            coef, device=dev, dtype=raw.dtype
        )
        out = raw.new_zeros(raw.shape[0], len(sets))
        return out.index_add(1, torch.as_tensor(set_idx, device=dev), contrib)

    def _capacity_lattice(self, params: Params, m: int) -> torch.Tensor:
        """Dense capacity ``(cap, 2**m)`` (full, or ``k >= 3``)."""
        if self._uses_lattice(m):
            return _full_capacity(params["capacity_raw"], m)
        masses = self._sparse_masses(params, m)
        masks = torch.as_tensor(_atoms(m, self._k(m))[5], device=masses.device)
        dense = masses.new_zeros(masses.shape[0], 2**m).index_add(1, masks, masses)
        return _zeta_torch(dense)

    def _interaction_masses(self, params: Params, m: int) -> torch.Tensor:
        """Möbius masses of the subsets with ``|T| >= 2``, ``(cap, P)``."""
        if self._uses_lattice(m):
            mob = _zeta_torch(_full_capacity(params["capacity_raw"], m), inverse=True)
            size = torch.as_tensor(_popcount(np.arange(2**m)), device=mob.device)
            return mob[:, size >= 2]
        return self._sparse_masses(params, m)[:, m:]

    # -- the integral --------------------------------------------------------------
    def _integral(self, params: Params, x: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
        """Choquet integral of ``x (n, c, m)`` -> ``(n, c)``."""
        m = x.shape[-1]
        if "singleton_raw" not in params:
            return _sorted_integral(x, self._capacity_lattice(params, m))
        masses = self._masses(params, m)  # (cap, m [+ m(m-1)/2])
        out = (x * masses[:, :m]).sum(-1)
        if masses.shape[1] > m:
            m2 = masses[:, m:]
            feats = self._pair_features(x, Z)
            if m2.shape[0] == 1:
                out = out + feats @ m2[0]
            else:
                out = out + torch.einsum("ncp,cp->nc", feats, m2)
        return out

    def _pair_features(self, x: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
        # The pairwise minima do not depend on the parameters; while fitting, the
        # same data tensor goes through hundreds of forward passes, so they are
        # computed once per tensor (looked up by identity, dropped with it).
        if not torch.is_grad_enabled():
            return _pairwise_min(x)
        cache = self.__dict__.setdefault("_feature_cache", {})
        key = id(Z)
        hit = cache.get(key)
        if hit is not None and hit[0]() is Z and hit[1].shape[:-1] == x.shape[:-1]:
            return hit[1]
        feats = _pairwise_min(x)
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
        if "threshold" in params:  # classification
            beta = params["threshold"]
            binary = beta.shape[0] == 1
            x = (Z[:, :, 1:2] if binary else Z).transpose(1, 2)  # (n, c', m)
            gamma, beta = self._gain_threshold(params, hyper)
            s = gamma * (self._integral(params, x, Z) - beta)
            if binary:
                return torch.cat([torch.zeros_like(s), s], 1)
            return F.logsigmoid(s)
        lo, span = params["x_low"], params["x_span"]
        c_z = self._integral(params, Z.transpose(1, 2), Z)  # integral of standardised outputs
        # lo + span * (a * C(x) + b) with x = (z - lo) / span and C(x) = (C(z) - lo) / span.
        scale = torch.exp(_RHO_SCALE * params["log_scale"])
        return lo + scale * (c_z - lo) + _RHO_OFFSET * span * params["offset"]

    @staticmethod
    def _gain_threshold(params: Params, hyper: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``gamma = 1 / T`` and ``beta = 1/2 + rho_b T b``.

        The factor ``rho_b T`` puts the curvature of the loss in ``b`` (at
        most ``0.25 rho_b**2``) on the scale of the capacity parameters',
        about 1e-2: unscaled, the threshold's curvature, up to ``gamma**2 /
        4``, is ~1e3 times larger and L-BFGS needs hundreds of steps more.
        """
        T = hyper["temperature"]
        gamma = 1.0 / T
        beta = 0.5 + _RHO_THRESHOLD * T * params["threshold"]
        return gamma, beta

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        m = self._n_models_of(params)
        sq = sum(params[k].pow(2).sum() for k in ("singleton_raw", "pair_raw") if k in params)
        if "capacity_raw" in params:
            raw = params["capacity_raw"]
            ref = (
                torch.as_tensor(_lattice_start(m), device=raw.device, dtype=raw.dtype)
                if self._uses_lattice(m) else 0.0
            )
            sq = sq + (raw - ref).pow(2).sum()
        # The log of the regression output scale.
        if "log_scale" in params:
            sq = sq + (_RHO_SCALE * params["log_scale"]).pow(2).sum()
        pen = 0.5 * hyper["l2"][0] * sq
        if "interaction" in hyper:
            inter = self._interaction_masses(params, m)
            pen = pen + hyper["interaction"][0] * inter.shape[1] * inter.pow(2).sum(1).mean()
        return pen

    # -- readable views of the fitted state ---------------------------------------
    def _fitted_capacity_params(self) -> Params:
        if not hasattr(self, "params_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(
                "this Choquet aggregator is not fitted; fit an AggregatedClassifier / "
                "AggregatedRegressor with it and use estimator.aggregator_."
            )
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
                cap = _full_capacity(params["capacity_raw"], m)
                mob = _zeta_torch(cap, inverse=True).numpy()[:, 1:]
                sets = [
                    tuple(i for i in range(m) if mask >> i & 1) for mask in range(1, 2**m)
                ]
                return sets, mob
            return list(_atoms(m, self._k(m))[0]), self._sparse_masses(params, m).numpy()

    def _capacity_columns(self) -> list | None:
        """Column labels when there is one capacity per class / target, else None."""
        n_cap = next(iter(self._fitted_capacity_params().values())).shape[0]
        if n_cap == 1:
            return None
        if self.classes_ is not None:
            return list(self.classes_)
        return list(range(n_cap))

    def _frame(self, values: np.ndarray, index, name: str):
        cols = self._capacity_columns()
        if cols is None:
            return pd.Series(values[0], index=index, name=name)
        return pd.DataFrame(values.T, index=index, columns=cols)

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
            if isinstance(coalition, str):
                coalition = [coalition]
            unknown = set(coalition) - set(names)
            if unknown:
                raise ValueError(f"unknown base models {sorted(unknown)}; known: {names}.")
            members = {names.index(n) for n in coalition}
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
        index = pd.Index(
            [tuple(names[i] for i in range(m) if mask >> i & 1) for mask in range(2**m)],
            tupleize_cols=False,
        )
        return self._frame(mu, index, "capacity")

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
