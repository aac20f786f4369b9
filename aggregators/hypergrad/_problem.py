"""The bilevel problem and the derivatives every hypergradient method shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = [
    "BilevelProblem",
    "HessianDecision",
    "HypergradResult",
    "InnerDivergenceError",
    "fd_mixed_product",
    "is_out_of_memory",
    "vjp",
]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ValueGrad = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
HvpFactory = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def vjp(outputs: torch.Tensor, inputs, v: torch.Tensor, **kwargs):
    """``torch.autograd.grad(outputs, inputs, grad_outputs=v, **kwargs)``, computed as
    the gradient of ``<outputs, v>``.

    The same vector-Jacobian product (the backward of the sum and of the
    product hands ``v`` on unchanged), without ``grad_outputs``' shape check,
    whose first call in a process imports ``torch.fx``'s symbolic shapes and
    SymPy: a fresh process's first fit would pay that import inside its
    first hypergradient.
    """
    return torch.autograd.grad((outputs * v).sum(), inputs, **kwargs)


class InnerDivergenceError(RuntimeError):
    """The inner solve produced a non-finite loss or parameters."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device or host allocation failure.

    Such an error says nothing about the method that raised it (a smaller
    problem would have run), so the engine never answers it by switching
    methods: it propagates.
    """
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(error, (oom, MemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text


@dataclass(frozen=True)
class HessianDecision:
    """Whether the engine forms a problem's exact Hessian blocks, and why.

    Attributes
    ----------
    exact : bool
        ``True``: Newton inner solves and direct linear solves from the
        Hessian blocks; ``False``: L-BFGS and conjugate gradient.
    reason : str
        Why, in a sentence (the size of the blocks, what the caller declared,
        or the derivative the loss lacks).
    unavailable : bool, default=False
        ``True`` when the blocks were small enough but the loss has no
        (batched) second derivative: the first-order path was not chosen but
        forced, and the caller may want to say so.
    """

    exact: bool
    reason: str
    unavailable: bool = False


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
    blocks : tuple of int, default=None
        Sizes of consecutive parameter blocks that ``L`` does not couple (its
        Hessian is block diagonal), e.g. one per cross-fitting fold
        (:func:`stack_problems`); Newton's solver uses them.
    exact_hessian : bool, default=True
        Whether the engine may form the Hessian blocks (Newton steps, direct
        linear solves); ``False`` keeps it to first-order methods.
    hessian_loss : callable, default=None
        The same ``L`` written in the form whose Hessian blocks are cheapest
        to form (they come from one vmapped backward pass over a graph that
        ``create_graph`` built, where an ``L`` that is itself vmapped over
        folds costs copies); ``inner_loss`` when omitted.
    hessian : HessianDecision, default=None
        Whether the engine forms the blocks, and why: decided once, before
        the first solve that could use them
        (:func:`~aggregators.hypergrad._newton.decide_exact_hessian`); a
        caller that knows may set it beforehand.
    inner_value_grad : callable, default=None
        ``(theta, h) -> (L, dL/dtheta)``, both detached, in one pass: where
        the caller has the derivatives in closed form, the inner solvers call
        it instead of building an autograd graph (whose fixed cost per call
        dominates on small tensors). The optional callables below must agree
        with ``inner_loss`` / ``outer_loss``; each one missing is replaced by
        autograd on those.
    inner_hvp : callable, default=None
        ``(theta, h) -> matvec``: ``matvec(v)`` is the Hessian-vector
        product ``(d2L/dtheta2) v`` at ``(theta, h)``; what the products
        share (the predictions' softmax, say) is computed once per call.
        Conjugate gradient and the Neumann series use it.
    inner_hessian : callable, default=None
        ``(theta, h) -> blocks``: the Hessian blocks of ``L`` (as
        :func:`~aggregators.hypergrad._newton.hessian_blocks` returns them,
        one per entry of ``blocks``), for Newton steps and direct solves.
    newton_hessian : callable, default=None
        ``(theta, h) -> blocks`` like ``inner_hessian``, but only near the
        exact blocks (formed in a lower precision, say): Newton's steps use it
        when given. A step's direction needs no more (the solve stops on the
        exact gradient, and its factors only precondition the hypergradient's
        solve); the direct linear solves keep to ``inner_hessian``.
    outer_value_grads : callable, default=None
        ``(theta, h) -> (Q, dQ/dtheta, dQ/dh)``, detached, ``dQ/dh`` the
        direct derivative (``theta`` held fixed).
    mixed_product : callable, default=None
        ``(theta, h, v) -> (d2L / dh dtheta) v``, shape of ``h``. The
        implicit methods use the closed-form callables only when this one is
        given too (the hypergradient needs it).
    inner_preconditioner : callable, default=None
        ``(theta, h) -> apply``: ``apply(v)`` is ``M v`` for a symmetric
        positive definite ``M`` near the inverse Hessian of ``L`` at
        ``(theta, h)``, block diagonal like it (``blocks``). L-BFGS takes it
        as its initial inverse-Hessian model and conjugate gradient as its
        preconditioner; it changes how fast they converge, not where to.
    newton_factor : tuple, default=None
        Set by the engine: ``(h, chol)``, the Cholesky factors of the Hessian
        blocks that the last Newton step solved with (at ``h``, the step's
        start), which precondition the hypergradient's solve at the solution.
    """

    inner_loss: Loss
    outer_loss: Loss
    theta0: torch.Tensor
    blocks: tuple[int, ...] | None = None
    exact_hessian: bool = True
    hessian_loss: Loss | None = None
    hessian: HessianDecision | None = None
    inner_value_grad: ValueGrad | None = None
    inner_hvp: HvpFactory | None = None
    inner_hessian: Loss | None = None
    newton_hessian: Loss | None = None
    outer_value_grads: Callable | None = None
    mixed_product: Callable | None = None
    inner_preconditioner: Callable | None = None
    newton_factor: tuple | None = field(default=None, repr=False)

    def second_order_loss(self, theta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``L(theta, h)`` through :attr:`hessian_loss` when given."""
        return (self.hessian_loss or self.inner_loss)(theta, h)

    def inner_grad(
        self, theta: torch.Tensor, h: torch.Tensor, create_graph: bool = False
    ) -> torch.Tensor:
        """``dL/dtheta`` at ``(theta, h)``."""
        if self.inner_value_grad is not None and not create_graph:
            return self.inner_value_grad(theta.detach(), h.detach())[1]
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
    if problem.outer_value_grads is not None:
        return problem.outer_value_grads(theta.detach(), h.detach())
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


def fd_mixed_product(
    problem: BilevelProblem,
    theta: torch.Tensor,
    h: torch.Tensor,
    v: torch.Tensor,
    eps: float = 0.01,
) -> torch.Tensor:
    """``(d2L / dh dtheta) v`` by a central difference of ``dL/dh`` along ``v``.

    ``[d_h L(theta + e v, h) - d_h L(theta - e v, h)] / (2 e)`` with
    ``e = eps / ||v||``, so the parameters move by ``eps`` in norm (DARTS,
    Liu et al. 2019, eq. 8 and its footnote). Two first-order gradients
    replace a second-order one; the error is ``O(eps^2)`` (third derivatives
    of ``L``), and zero when ``dL/dh`` is quadratic in ``theta``.

    Parameters
    ----------
    problem : BilevelProblem
    theta, h : Tensor
        Where the mixed derivative is taken.
    v : Tensor
        Direction in parameter space.
    eps : float, default=0.01
        Length of the parameter perturbation.

    Returns
    -------
    Tensor
        Same shape as ``h``.
    """
    # A tensor, not a float: no device-to-host copy. A zero v gives zero.
    e = eps / v.norm().clamp_min(torch.finfo(v.dtype).tiny)

    def grad_h(t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            hh = h.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(
                problem.inner_loss(t.detach(), hh), hh, allow_unused=True
            )
        return torch.zeros_like(h) if g is None else g

    return (grad_h(theta + e * v) - grad_h(theta - e * v)) / (2 * e)
