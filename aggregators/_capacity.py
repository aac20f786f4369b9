"""Capacities: the set functions the Choquet and Sugeno integrals are taken with.

A capacity ``mu`` over ``m`` models gives every coalition ``A`` of models a
worth, with ``mu(empty) = 0``, ``mu(N) = 1`` and ``A subset B => mu(A) <=
mu(B)``. Its Möbius masses ``m(A) = sum_{B subset A} (-1)^{|A - B|} mu(B)``
are what a k-additive capacity restricts (``m(T) = 0`` for ``|T| > k``);
Shapley values and interaction indices read the masses (Grabisch 1997).

Capacities are stored as arrays over the ``2**m`` subsets in *binary order*:
entry ``mask`` is the subset ``{i : mask >> i & 1}``, so for three models the
order is ``{}, {0}, {1}, {0,1}, {2}, {0,2}, {1,2}, {0,1,2}``. Sparse
(k-additive) Möbius masses can also be given as a mapping from tuples of
model indices to masses.

This module holds the pure functions on capacities (numpy), the torch
parametrisations that keep a learned capacity monotone and normalised (the
full capacity on the lattice, the k-additive mixtures, the symmetric levels),
the chain of top sets both integrals read, and the tables the fitted
aggregators show. :mod:`aggregators.choquet` and :mod:`aggregators.sugeno`
share all of it.

References
----------
M. Grabisch, "k-order additive discrete fuzzy measures and their
representation", Fuzzy Sets and Systems 92 (1997).
"""

from __future__ import annotations

import functools
import math
from itertools import combinations
from typing import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

__all__ = [
    "MAX_FULL_MODELS",
    "capacity_to_mobius",
    "interaction_from_mobius",
    "is_capacity",
    "mobius_to_capacity",
    "shapley_from_mobius",
    "symmetric_capacity",
]

#: Largest number of models for which a capacity over all ``2**m`` subsets is learned.
MAX_FULL_MODELS = 12

# Temperature of the smooth maximum over a subset's predecessors in the full
# capacity's parametrisation (see full_capacity).
LATTICE_T = 0.1


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


def popcount(masks: np.ndarray) -> np.ndarray:
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


def sparse_mobius(mobius, n_models: int | None = None):
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
    inc, vals = sparse_mobius(mobius, n_models)
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
    inc, vals = sparse_mobius(mobius, n_models)
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


def symmetric_capacity(levels) -> np.ndarray:
    """Dense symmetric capacity ``mu(A) = q_{|A|}`` from ``q = (q_0, ..., q_m)``.

    With a symmetric capacity the Sugeno integral is the ordered weighted
    maximum ``max_k min(x_[k], q_k)`` (``x_[k]`` the k-th largest input).

    Parameters
    ----------
    levels : array-like of shape (m + 1,)
        Nondecreasing, ``q_0 = 0``, ``q_m = 1`` for a normalised capacity.

    Returns
    -------
    ndarray of shape (2**m,)
    """
    q = np.asarray(levels, dtype=np.float64)
    m = q.shape[-1] - 1
    sizes = np.array([bin(mask).count("1") for mask in range(2**m)])
    return q[..., sizes]


def top_sets(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs sorted descending and the masks of the sets of the 1, 2, ... largest.

    Both integrals read a capacity along this chain: ``top[..., k]`` is the
    subset ``A_(m-k)`` of the models whose output is at least the (k+1)-th
    largest (ties broken by model index).
    """
    order = np.argsort(-x, axis=-1, kind="stable")  # descending
    return np.take_along_axis(x, order, -1), np.cumsum(np.left_shift(1, order), axis=-1)


# ======================================================================================
# torch building blocks
# ======================================================================================
def zeta_torch(v: torch.Tensor, inverse: bool = False) -> torch.Tensor:
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
def k_additive_atoms(m: int, k: int):
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


def pair_index(m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the pairs ``i < j`` in ``torch.triu_indices`` order."""
    rc = torch.triu_indices(m, m, 1, device=device)
    return rc[0], rc[1]


def two_additive_masses(a: torch.Tensor, q: torch.Tensor | None, m: int) -> torch.Tensor:
    """Möbius masses ``(cap, m [+ m(m-1)/2])`` of singletons and pairs from free parameters.

    ``s_i = exp(a_i)``, pair parameters ``p_ij = q`` free, ``phi(t) = tau
    softplus(t / tau)`` with ``tau = 1 / (m - 1)``:
    ``m({i,j}) = p_ij / Z``, ``m({i}) = (s_i + sum_j phi(-p_ij)) / Z``,
    ``Z = sum_i s_i + sum_{i<j} (p_ij + 2 phi(-p_ij))``. Since
    ``phi(-p) >= max(0, -p)``, ``m({i}) + sum_j min(0, m({i,j})) >=
    s_i / Z > 0``: the k=2 monotonicity condition holds. The ``phi`` terms
    cancel in ``sum_T m(T)``, so the masses sum to 1 exactly. (``tau``
    keeps the slack spent at ``p = 0`` to ``log 2`` per model, so that
    ``a`` and ``p`` move the masses on similar scales.) Without pairs
    (``q = None``, or one model) the masses are ``softmax(a)``: a weighted mean.

    Pair masses of either sign are allowed (a softmax over nonnegative
    masses would give only belief functions, without redundancy). **Every**
    2-additive capacity whose monotonicity slacks ``m({i}) + sum_j min(0,
    m({i,j}))`` are all positive is reached exactly (take ``p = c
    m({i,j})``, ``s_i = c m({i}) - sum_j phi(-c m({i,j}))`` for a large
    enough ``c``; then ``Z = c``); those with a zero slack (e.g. exactly the
    minimum of two models) are limits. Unlike a softmax over the ``m**2``
    extreme 2-additive capacities (dictators, pairwise minima and maxima),
    this has one parameter per Möbius mass, so the inner problem has no flat
    directions of size ``m**2 / 2`` for L-BFGS to crawl along.
    """
    shift = a.amax(-1, keepdim=True)  # every term is scaled by exp(-shift); Z cancels it
    s = torch.exp(a - shift)
    if q is None or m < 2:
        return s / s.sum(-1, keepdim=True)
    tau = 1.0 / (m - 1)
    scale = torch.exp(-shift)
    p = q * scale
    sp = tau * F.softplus(-q / tau) * scale
    rows, cols = pair_index(m, a.device)
    slack = s.index_add(1, rows, sp).index_add(1, cols, sp)
    z = s.sum(-1, keepdim=True) + (p + 2 * sp).sum(-1, keepdim=True)
    return torch.cat([slack, p], -1) / z


def atom_mixture_masses(raw: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """Möbius masses ``(cap, P)`` of a softmax mixture of the extreme k-additive capacities.

    ``raw (cap, n_atoms)`` weighs the atoms of :func:`k_additive_atoms`; the
    masses are over its subsets (``1 <= |T| <= k``, in its order). Every
    mixture is a valid k-additive capacity; the set reached is the convex
    hull of the atoms, which holds every k-additive belief function, every
    k-additive plausibility function and every 2-additive capacity, but
    **not** every k-additive capacity for ``k >= 3`` (their polytope has
    other vertices; for ``k = 2`` the dictators, minima and maxima are all
    its vertices).
    """
    sets, _, atom_idx, set_idx, coef, _ = k_additive_atoms(m, k)
    dev = raw.device
    w = torch.softmax(raw, dim=-1)
    contrib = w[..., torch.as_tensor(atom_idx, device=dev)] * torch.as_tensor(
        coef, device=dev, dtype=raw.dtype
    )
    out = raw.new_zeros(raw.shape[0], len(sets))
    return out.index_add(1, torch.as_tensor(set_idx, device=dev), contrib)


@functools.lru_cache(maxsize=16)
def lattice_levels(m: int):
    """Subsets by level (cardinality): the predecessors of each for the full capacity.

    Returns ``(levels, pos)``: ``levels[l-1]`` is an index array ``(n_l, l)``
    into the level-ordered concatenation of levels ``1 .. l-1`` (with a
    leading 0 for the empty set) giving ``A - {i}`` for every ``i in A``;
    ``pos[mask]`` is the place of ``mask`` in the level-ordered vector with
    the empty set first.
    """
    masks = np.arange(2**m)
    size = popcount(masks)
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


def full_capacity(raw: torch.Tensor, m: int) -> torch.Tensor:
    """Monotone normalised capacity (binary order) from unconstrained increments.

    ``nu(A) = smax_{i in A} nu(A - {i}) + softplus(raw_A)``, ``nu(empty) = 0``,
    ``mu = nu / nu(N)``, with the smooth maximum ``smax(v) = tau log sum_i
    e^{v_i / tau} >= max(v)`` (``tau = 0.1``, in units of ``nu``, whose
    levels are about 1 apart): every subset is above all of its predecessors,
    so ``mu`` is monotone, and dividing by ``nu(N) > 0`` normalises it.

    A hard max has a kink wherever two predecessors tie -- at the uniform
    start, every subset -- and L-BFGS stalls there, short of its tolerance,
    so the implicit hypergradients would be taken away from the inner
    optimum; the smooth maximum has no kinks and the inner solves converge.

    Every strictly monotone capacity is still reached exactly: scale it by
    ``c`` so large that every gap ``c (mu(A) - max_i mu(A - {i}))`` exceeds
    ``tau log m``, the most by which ``smax`` exceeds ``max``, and take
    ``softplus(raw_A)`` the rest of the gap. The others are limits.
    """
    levels, pos = lattice_levels(m)
    inc = F.softplus(raw)
    vals = [raw.new_zeros(*raw.shape[:-1], 1)]
    off = 0
    for preds in levels:
        n_l = preds.shape[0]
        prev = torch.cat(vals, -1)
        idx = torch.as_tensor(preds, device=raw.device)
        best = LATTICE_T * torch.logsumexp(prev[..., idx] / LATTICE_T, -1)
        vals.append(best + inc[..., off : off + n_l])
        off += n_l
    nu = torch.cat(vals, -1)[..., torch.as_tensor(pos, device=raw.device)]
    return nu / nu[..., -1:]


@functools.lru_cache(maxsize=16)
def lattice_start(m: int) -> np.ndarray:
    """Increments (level order, ``2**m - 1``) for which :func:`full_capacity` is ``|A| / m``.

    At level ``l`` every subset has ``l`` predecessors worth ``l - 1``, whose
    smooth maximum is ``l - 1 + tau log l``; the increment ``1 - tau log l``
    (positive for ``m <= 12``) brings the subset to exactly ``l``.
    """
    levels, _ = lattice_levels(m)
    out = []
    for ell, preds in enumerate(levels, start=1):
        step = 1.0 - LATTICE_T * math.log(ell)
        out.append(np.full(preds.shape[0], step + math.log(-math.expm1(-step))))
    return np.concatenate(out)

def symmetric_levels(raw: torch.Tensor) -> torch.Tensor:
    """Levels ``q_0 = 0 <= q_1 <= ... <= q_m = 1``: cumulative softmax of ``raw (cap, m)``."""
    q = torch.cumsum(torch.softmax(raw, -1), -1)
    q = torch.cat([torch.zeros_like(q[:, :1]), q[:, :-1], torch.ones_like(q[:, :1])], -1)
    return q


def chain_values(x: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs sorted descending and the capacity of the chain of top sets.

    Parameters
    ----------
    x : Tensor of shape (..., c, m)
    mu : Tensor of shape (cap, 2**m)
        A dense capacity in binary order; ``cap`` is 1 (shared) or ``c``
        (one capacity per column ``c``).

    Returns
    -------
    d, values : Tensors of shape (..., c, m)
        ``d[..., k]`` the (k+1)-th largest input, ``values[..., k]`` the
        capacity of the set of the k+1 largest.
    """
    d, order = torch.sort(x, dim=-1, descending=True)
    top = torch.cumsum(torch.bitwise_left_shift(torch.ones_like(order), order), -1)
    cap, size = mu.shape
    if cap == 1:
        return d, mu[0][top]
    offs = torch.arange(cap, device=x.device).mul_(size)[:, None]
    return d, mu.reshape(-1)[top + offs]


def n_capacities(share: str, ctx) -> int:
    """Capacities learned: one per class or target (``share="per_class"``), else one.

    A binary classifier always has one: its integral is taken over the
    positive class's probabilities.
    """
    return ctx.n_outputs if (share == "per_class" and not ctx.is_binary) else 1


# ======================================================================================
# Tables of fitted capacities
# ======================================================================================
def coalition_index(names: list, masks) -> pd.Index:
    """Index of coalitions (tuples of model names) for the given subset masks."""
    m = len(names)
    return pd.Index(
        [tuple(names[i] for i in range(m) if mask >> i & 1) for mask in masks],
        tupleize_cols=False,
    )


def coalition_members(names: list, coalition) -> set[int]:
    """Model indices of a coalition given by name (one name or an iterable)."""
    if isinstance(coalition, str):
        coalition = [coalition]
    unknown = set(coalition) - set(names)
    if unknown:
        raise ValueError(f"unknown base models {sorted(unknown)}; known: {names}.")
    return {names.index(n) for n in coalition}


def capacity_columns(n_cap: int, classes) -> list | None:
    """Column labels when there is one capacity per class / target, else ``None``."""
    if n_cap == 1:
        return None
    return list(classes) if classes is not None else list(range(n_cap))


def capacity_frame(values: np.ndarray, index, name: str, columns: list | None):
    """``values (cap, K)`` as a Series (one capacity) or a DataFrame (one column per class)."""
    if columns is None:
        return pd.Series(values[0], index=index, name=name)
    return pd.DataFrame(values.T, index=index, columns=columns)
