"""Damped Newton on problems whose Hessian is block diagonal with small blocks.

Most aggregation functions have a few tens of parameters (learned weights,
Choquet capacities, uninorms); cross-fitting stacks one such block per fold
(:func:`stack_problems`), and the blocks do not interact. There the exact
Hessian costs as many Hessian-vector products as the *largest block* has
parameters, batched into one vectorised backward pass: probe ``j`` carries
the ``j``-th unit vector in every block at once, so its product is column
``j`` of every block. Newton then converges in a handful of iterations where
L-BFGS needs tens to hundreds: a tuned L2 spreads over orders of magnitude
(one weight per base model), and the inner problems it produces are
ill-conditioned, which costs a quasi-Newton method iterations and Newton
nothing.

Whether a problem's blocks are formed is decided once
(:func:`decide_exact_hessian`) and recorded with its reason.
"""

from __future__ import annotations

import torch

from ._problem import BilevelProblem, HessianDecision, InnerDivergenceError, is_out_of_memory

__all__ = [
    "NEWTON_MAX_BLOCK",
    "block_hessian",
    "block_sizes",
    "block_solve",
    "decide_exact_hessian",
    "hessian_blocks",
    "newton_solve",
]

#: Largest block (parameters) for which ``solver="auto"`` picks Newton: the
#: Hessian costs that many Hessian-vector products per iteration.
NEWTON_MAX_BLOCK = 64

#: The same bound for a problem that gives its Hessian blocks in closed form
#: (``BilevelProblem.inner_hessian``): no probes to push through autograd,
#: only the factorisations, so larger blocks pay: a few Newton steps replace
#: L-BFGS runs that stall on the ill-conditioned problems a tuned L2 makes,
#: until the cubic cost of factorising a block outgrows them.
NEWTON_MAX_BLOCK_CLOSED_FORM = 256


def block_sizes(problem: BilevelProblem, theta: torch.Tensor) -> tuple[int, ...]:
    """The problem's independent parameter blocks (one block when undeclared)."""
    blocks = problem.blocks
    if blocks is None or sum(blocks) != theta.numel():
        return (theta.numel(),)
    return tuple(int(b) for b in blocks)


def _probes(sizes: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``(max_block, n_params)``: row ``j`` is the ``j``-th unit vector of every block."""
    width = max(sizes)
    probes = torch.zeros(width, sum(sizes), dtype=like.dtype, device=like.device)
    off = 0
    for s in sizes:
        idx = torch.arange(s, device=like.device)
        probes[idx, off + idx] = 1.0
        off += s
    return probes


def hessian_blocks(g: torch.Tensor, theta: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Hessian blocks from a gradient ``g`` of ``theta`` built with ``create_graph=True``.

    Returns ``(n_blocks, width, width)`` with ``width`` the largest block; a
    smaller block is padded with the identity (which leaves its solve
    unchanged). The graph of ``g`` is kept.
    """
    width = max(sizes)
    (cols,) = torch.autograd.grad(
        g, theta, _probes(sizes, theta), is_grads_batched=True, retain_graph=True
    )  # (width, n_params): column j of every block, side by side
    out = torch.eye(width, dtype=theta.dtype, device=theta.device).repeat(len(sizes), 1, 1)
    off = 0
    for k, s in enumerate(sizes):
        out[k, :s, :s] = cols[:s, off : off + s].T
        off += s
    return 0.5 * (out + out.transpose(1, 2))


def _loss_and_grad_graph(problem: BilevelProblem, theta: torch.Tensor, h: torch.Tensor):
    """``(loss, g, th)``: the inner loss and its gradient at a fresh leaf ``th``,
    ``g`` kept differentiable for :func:`hessian_blocks` (call under grad mode)."""
    th = theta.detach().requires_grad_(True)
    loss = problem.second_order_loss(th, h.detach())
    (g,) = torch.autograd.grad(loss, th, create_graph=True)
    return loss, g, th


def decide_exact_hessian(problem: BilevelProblem, theta: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether the engine forms this problem's Hessian blocks: decided once, recorded.

    The first call sets ``problem.hessian`` (a :class:`HessianDecision`) and
    later calls return it. The blocks are formed when the caller allows it
    (``problem.exact_hessian``), the largest block has at most
    :data:`NEWTON_MAX_BLOCK` parameters (the blocks cost that many
    Hessian-vector products, batched), and forming them at ``(theta, h)``
    works; or, for a problem that gives its blocks in closed form
    (``inner_hessian``), at most :data:`NEWTON_MAX_BLOCK_CLOSED_FORM`. When
    the batched products fail but one plain Hessian-vector product works, an
    operation of the loss has no batched (vmap) second derivative: conjugate
    gradient and L-BFGS still run. When the plain product fails for want of a
    derivative (``NotImplementedError``), the loss has no second derivative: L-BFGS still runs, and a method that
    needs Hessian-vector products raises that error itself. Any other error,
    an out-of-memory error included, propagates.
    """
    if problem.hessian is not None:
        return problem.hessian.exact
    sizes = block_sizes(problem, theta)
    closed = problem.inner_hessian is not None and problem.inner_value_grad is not None
    limit, name = (
        (NEWTON_MAX_BLOCK_CLOSED_FORM, "NEWTON_MAX_BLOCK_CLOSED_FORM") if closed
        else (NEWTON_MAX_BLOCK, "NEWTON_MAX_BLOCK")
    )
    if not problem.exact_hessian:
        decision = HessianDecision(False, "the problem asks for first-order methods only")
    elif max(sizes) > limit:
        decision = HessianDecision(
            False,
            f"its largest block has {max(sizes)} parameters, more than {name} = {limit}",
        )
    elif closed:
        decision = HessianDecision(
            True, f"its Hessian blocks are in closed form and its largest has {max(sizes)} "
            f"parameters, at most {name} = {limit}",
        )
    else:
        missing = _missing_second_derivative(problem, theta, h, sizes)
        decision = (
            HessianDecision(False, missing, unavailable=True) if missing else HessianDecision(
                True, f"its largest block has {max(sizes)} parameters, at most "
                f"NEWTON_MAX_BLOCK = {NEWTON_MAX_BLOCK}",
            )
        )
    problem.hessian = decision
    return decision.exact


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _missing_second_derivative(
    problem: BilevelProblem, theta: torch.Tensor, h: torch.Tensor, sizes: tuple[int, ...]
) -> str | None:
    """``None`` when the Hessian blocks form at ``(theta, h)``, else which derivative is missing."""
    with torch.enable_grad():
        _, g, th = _loss_and_grad_graph(problem, theta, h)
        if not g.requires_grad:  # a loss linear in theta: nothing to solve with
            return "the inner loss is linear in the parameters (its Hessian is zero)"
        try:
            hessian_blocks(g, th, sizes)
            return None
        except RuntimeError as e:  # NotImplementedError included
            if is_out_of_memory(e):
                raise
            batched = e
        # The same derivative without batching tells the two causes apart.
        probe = _probes(sizes, th)[0]
        try:
            torch.autograd.grad(g, th, probe, retain_graph=True)
        except RuntimeError as e:
            # autograd's own words for a derivative it does not have.
            if isinstance(e, NotImplementedError) or "is not implemented" in str(e):
                return f"the inner loss has no second derivative ({_first_line(e)})"
            raise
    return f"an operation of the inner loss has no batched (vmap) second derivative ({_first_line(batched)})"


def block_hessian(
    problem: BilevelProblem, theta: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inner loss, gradient and Hessian blocks of ``L(., h)`` at ``theta``.

    Returns
    -------
    loss : Tensor
    grad : Tensor
        Shape ``(n_params,)``.
    blocks : Tensor
        ``(n_blocks, width, width)``, see :func:`hessian_blocks`.
    """
    if problem.inner_value_grad is not None and problem.inner_hessian is not None:
        loss, g = problem.inner_value_grad(theta.detach(), h.detach())
        return loss, g, problem.inner_hessian(theta.detach(), h.detach())
    with torch.enable_grad():
        loss, g, th = _loss_and_grad_graph(problem, theta, h)
        blocks = hessian_blocks(g, th, block_sizes(problem, theta))
    return loss.detach(), g.detach(), blocks.detach()


def _pad(v: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """``(n_params,)`` -> ``(n_blocks, width)`` with zeros after short blocks."""
    width = max(sizes)
    out = v.new_zeros(len(sizes), width)
    for k, part in enumerate(torch.split(v, sizes)):
        out[k, : part.numel()] = part
    return out


def _unpad(m: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([m[k, :s] for k, s in enumerate(sizes)])


def block_factor(
    blocks: torch.Tensor, damping: float = 0.0
) -> tuple[torch.Tensor, float]:
    """Cholesky factors of ``H + lambda I``, block by block (see :func:`block_solve`).

    Returns
    -------
    chol : Tensor
        ``(n_blocks, width, width)`` lower factors.
    damping : float
        The relative damping that was needed.
    """
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    scale = blocks.diagonal(dim1=1, dim2=2).abs().amax(1).clamp_min(1e-12)[:, None, None]
    lam = damping
    for _ in range(30):
        chol, info = torch.linalg.cholesky_ex(blocks + lam * scale * eye)
        if not bool(info.any()):
            return chol, lam
        lam = max(10.0 * lam, 1e-10)
    raise torch.linalg.LinAlgError("the Hessian blocks could not be made positive definite")


def factor_solve(chol: torch.Tensor, b: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """``x`` with ``L L^T x = b`` for the factors of :func:`block_factor`."""
    return _unpad(torch.cholesky_solve(_pad(b, sizes)[..., None], chol)[..., 0], sizes)


def block_solve(
    blocks: torch.Tensor, b: torch.Tensor, sizes: tuple[int, ...], damping: float = 0.0
) -> tuple[torch.Tensor, float]:
    """Solve ``(H + lambda I) x = b`` block by block with Cholesky.

    ``lambda`` starts at ``damping`` times each block's largest diagonal entry
    and grows tenfold until the block is positive definite, so an indefinite
    Hessian (a nonconvex inner problem away from its optimum) still gives a
    descent direction (Levenberg-Marquardt).

    Returns
    -------
    x : Tensor
    damping : float
        The relative damping that was needed (``0.0`` for none).
    """
    chol, lam = block_factor(blocks, damping)
    return factor_solve(chol, b, sizes), lam


def newton_solve(
    problem: BilevelProblem,
    h: torch.Tensor,
    theta0: torch.Tensor | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-7,
) -> tuple[torch.Tensor, int, bool]:
    """Minimise ``L(., h)`` by damped Newton steps with an Armijo line search.

    Parameters
    ----------
    problem : BilevelProblem
        With ``blocks`` declared when its Hessian is block diagonal.
    h : Tensor
    theta0 : Tensor, default=None
        Warm start; ``problem.theta0`` when omitted.
    max_iter : int, default=100
    tol : float, default=1e-7
        Stop when the gradient's max-norm falls below ``tol``.

    Returns
    -------
    theta : Tensor
    n_iter : int
    converged : bool
        ``False`` also when the line search cannot make progress (then the
        caller may finish with a first-order solver).

    Raises
    ------
    InnerDivergenceError
        When the loss is not finite at the start.
    """
    h = h.detach()
    theta = (problem.theta0 if theta0 is None else theta0).detach().clone()
    sizes = block_sizes(problem, theta)
    damping = 0.0
    # Closed-form derivatives where the problem has them (no graph to build).
    analytic = problem.inner_value_grad is not None and problem.inner_hessian is not None
    accepted = None  # (loss, gradient) at the point the line search accepted
    for it in range(max_iter + 1):
        with torch.enable_grad():
            if accepted is not None:
                loss, g = accepted
            elif analytic:
                loss, g = problem.inner_value_grad(theta, h)
            else:
                loss, g_graph, th = _loss_and_grad_graph(problem, theta, h)
                g = g_graph.detach()
                loss = loss.detach()
            if not (torch.isfinite(loss) and torch.isfinite(g).all()):
                raise InnerDivergenceError(
                    f"the inner solve diverged: the inner loss became {float(loss)}."
                )
            # The Hessian only when a step is needed: at the last point the
            # gradient suffices (a warm start that already meets the tolerance
            # costs one gradient).
            if g.abs().max() <= tol:
                return theta, it, True
            if it == max_iter:
                break
            if analytic:
                blocks = (problem.newton_hessian or problem.inner_hessian)(theta, h)
            else:
                blocks = hessian_blocks(g_graph, th, sizes).detach()
        try:
            chol, damping = block_factor(blocks, damping)
        except torch.linalg.LinAlgError:
            return theta, it, False
        step = factor_solve(chol, -g, sizes)
        # The factors at the start of the last step: a preconditioner of the
        # hypergradient's linear system at the solution (implicit_hypergradient).
        problem.newton_factor = (h, chol)
        slope = g @ step
        t = 1.0
        accepted = None
        with torch.no_grad():
            while True:
                if analytic:  # its gradient comes in the same pass: kept for the next step
                    new, g_new = problem.inner_value_grad(theta + t * step, h)
                else:
                    new = problem.inner_loss(theta + t * step, h)
                if torch.isfinite(new) and new <= loss + 1e-4 * t * slope:
                    if analytic:
                        accepted = (new, g_new)
                    break
                t *= 0.5
                if t < 1e-8:
                    return theta, it, False
        theta = theta + t * step
        # Full steps: trust the quadratic model more; short ones: less.
        damping = damping / 10.0 if t == 1.0 else max(10.0 * damping, 1e-6)
        if damping < 1e-10:
            damping = 0.0
    return theta, max_iter, False
