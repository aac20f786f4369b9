"""The bilevel problem and the derivatives every hypergradient method shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["BilevelProblem", "InnerDivergenceError", "HypergradResult"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class InnerDivergenceError(RuntimeError):
    """The inner solve produced a non-finite loss or parameters."""


@dataclass
class BilevelProblem:
    """``min_h Q(theta*(h), h)`` with ``theta*(h) = argmin_theta L(theta, h)``.

    Both losses take a flat parameter vector ``theta`` and a flat
    hyperparameter vector ``h`` (in whatever unconstrained space the caller
    chose) and return a scalar tensor.

    Parameters
    ----------
    inner_loss : callable
        ``L(theta, h)``: training loss plus penalty.
    outer_loss : callable
        ``Q(theta, h)``: validation loss.
    theta0 : Tensor
        Starting point of the inner solve (also the start of unrolled modes).
    """

    inner_loss: Loss
    outer_loss: Loss
    theta0: torch.Tensor

    def inner_grad(
        self, theta: torch.Tensor, h: torch.Tensor, create_graph: bool = False
    ) -> torch.Tensor:
        """``dL/dtheta`` at ``(theta, h)``."""
        with torch.enable_grad():
            if not theta.requires_grad:
                theta = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(
                self.inner_loss(theta, h), theta, create_graph=create_graph
            )
        return g


@dataclass
class HypergradResult:
    """What a hypergradient method returns.

    Attributes
    ----------
    value : Tensor
        Outer loss ``Q`` at the point the hypergradient is taken.
    grad : Tensor
        ``dQ/dh``, same shape as ``h``.
    theta : Tensor
        The inner parameters the outer loss was evaluated at.
    info : dict
        Method-specific diagnostics (linear-solve iterations, residual, ...).
    """

    value: torch.Tensor
    grad: torch.Tensor
    theta: torch.Tensor
    info: dict = field(default_factory=dict)


def outer_grads(problem: BilevelProblem, theta: torch.Tensor, h: torch.Tensor):
    """Return ``Q``, ``dQ/dtheta`` and the direct ``dQ/dh`` at ``(theta, h)``."""
    with torch.enable_grad():
        theta = theta.detach().requires_grad_(True)
        h = h.detach().requires_grad_(True)
        q = problem.outer_loss(theta, h)
        g_theta, g_h = torch.autograd.grad(q, (theta, h), allow_unused=True)
    if g_h is None:
        g_h = torch.zeros_like(h)
    if g_theta is None:
        g_theta = torch.zeros_like(theta)
    return q.detach(), g_theta, g_h
