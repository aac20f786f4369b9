"""A ridge-regression bilevel problem with closed forms, shared by the engine's tests.

``L = 0.5 ||X theta - y||^2 + 0.5 sum_i lam_i theta_i^2`` (``h = log lam``, one
entry shared or one per feature), ``Q`` = mean squared error on validation
rows. ``theta*(h) = (X^T X + lam I)^{-1} X^T y`` and the hypergradient
``dQ/dh = -lam * (theta* . H^{-1} dQ/dtheta)`` are exact (FORMULAS.md).
"""

from __future__ import annotations

import torch

from aggregators.hypergrad import BilevelProblem

DT = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm())


class Ridge:
    """``L = 0.5 ||X theta - y||^2 + 0.5 sum_i lam_i theta_i^2``, ``Q`` = mean val SE.

    The training design has singular values ``linspace(s_min, s_max, p)``,
    so the Hessian's eigenvalues are ``[s_min^2, s_max^2] + lam``.
    """

    def __init__(self, s_min=2.0, s_max=10.0, n=40, n_val=200, p=10, seed=0):
        g = torch.Generator().manual_seed(seed)

        def orth(k):
            return torch.linalg.qr(torch.randn(k, k, generator=g, dtype=DT))[0]

        self.X = orth(n)[:, :p] @ torch.diag(torch.linspace(s_min, s_max, p, dtype=DT)) @ orth(p).T
        w = torch.randn(p, generator=g, dtype=DT)
        self.y = self.X @ w + 1.5 * torch.randn(n, generator=g, dtype=DT)
        self.Xv = torch.randn(n_val, p, generator=g, dtype=DT) @ torch.diag(
            torch.linspace(0.3, 1.5, p, dtype=DT)
        )
        self.yv = self.Xv @ w + 1.5 * torch.randn(n_val, generator=g, dtype=DT)
        self.p = p
        self.problem = BilevelProblem(self.inner, self.outer, torch.zeros(p, dtype=DT))

    def inner(self, theta, h):
        return 0.5 * (self.X @ theta - self.y).pow(2).sum() + 0.5 * (
            torch.exp(h) * theta.pow(2)
        ).sum()

    def outer(self, theta, h):
        return (self.Xv @ theta - self.yv).pow(2).mean()

    def lam(self, h):
        return torch.exp(h) * torch.ones(self.p, dtype=DT)

    def hessian(self, h):
        return self.X.T @ self.X + torch.diag(self.lam(h))

    def theta_star(self, h):
        return torch.linalg.solve(self.hessian(h), self.X.T @ self.y)

    def value(self, h):
        """``Q(theta*(h))``, differentiable in ``h`` by autograd."""
        return self.outer(self.theta_star(h), h)

    def grad_theta_q(self, theta):
        return 2.0 * self.Xv.T @ (self.Xv @ theta - self.yv) / len(self.yv)

    def mixed_t(self, theta, h, v):
        """``(d2L / dh dtheta) v``: ``lam_i theta_i v_i``, summed for a scalar h."""
        out = self.lam(h) * theta * v
        return out.sum().reshape(1) if h.numel() == 1 else out

    def hypergrad(self, h):
        """Closed form ``dQ/dh = lam * dQ/dlam``."""
        th = self.theta_star(h)
        return -self.mixed_t(th, h, torch.linalg.solve(self.hessian(h), self.grad_theta_q(th)))

    def lam_max(self, h):
        return float(torch.linalg.eigvalsh(self.hessian(h))[-1])

    def trajectory(self, theta0, h, lr, n_steps):
        thetas = [theta0]
        A, b = self.hessian(h), self.X.T @ self.y
        for _ in range(n_steps):
            thetas.append(thetas[-1] - lr * (A @ thetas[-1] - b))
        return thetas

    def unrolled(self, points, h, lr, end):
        """``-sum_t lr B(points[t])^T (I - lr A)^{T-1-t} grad Q(end)``: reverse mode
        with the step Jacobians' mixed derivatives taken at ``points``."""
        M = torch.eye(self.p, dtype=DT) - lr * self.hessian(h)
        adj = self.grad_theta_q(end)
        grad = torch.zeros_like(h)
        for t in reversed(range(len(points))):
            grad = grad - lr * self.mixed_t(points[t], h, adj)
            adj = M @ adj
        return grad
