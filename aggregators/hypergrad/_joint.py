"""Several bilevel problems that share ``h`` solved as one (cross-fitting folds)."""

from __future__ import annotations

from typing import Sequence

import torch

from ._problem import BilevelProblem

__all__ = ["stack_problems"]


def stack_problems(
    problems: Sequence[BilevelProblem],
) -> tuple[BilevelProblem, "callable"]:
    """One problem whose parameters are the concatenation of the problems'.

    With disjoint parameters ``theta = (theta_1, ..., theta_K)`` and shared
    ``h``, ``L = sum_k L_k(theta_k, h)`` and ``Q = sum_k Q_k(theta_k, h)``:
    the joint optimum is the tuple of the separate optima, the joint Hessian
    is block diagonal, and the hypergradient of ``Q`` is the sum of the
    separate hypergradients, so every method gives the same answer as on the
    problems one by one. What changes is the cost: one L-BFGS run (one line
    search, one two-loop recursion per iteration) for all folds instead of K,
    which matters because on the small problems of ensemble aggregation the
    solver's per-iteration bookkeeping, not the arithmetic, dominates.

    Parameters
    ----------
    problems : sequence of BilevelProblem

    Returns
    -------
    problem : BilevelProblem
    split : callable
        ``split(theta)`` returns the list of the problems' parameter vectors.
    """
    sizes = [p.theta0.numel() for p in problems]

    def split(theta: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(theta, sizes))

    def inner(theta, h):
        return sum(p.inner_loss(t, h) for p, t in zip(problems, split(theta)))

    def outer(theta, h):
        return sum(p.outer_loss(t, h) for p, t in zip(problems, split(theta)))

    theta0 = torch.cat([p.theta0.reshape(-1) for p in problems])
    blocks = tuple(b for p, s in zip(problems, sizes) for b in (p.blocks or (s,)))
    return BilevelProblem(inner, outer, theta0, blocks=blocks), split
