"""From an aggregation function and tensors to the engine's bilevel problem.

This is the only place that knows both sides: the estimator hands it tensors
already on the device, the engine gets flat ``theta`` / ``h`` losses back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._base import AggregationContext, Aggregator, Hyperparameter, Params
from .hypergrad import BilevelProblem

__all__ = ["HyperSpace", "ParamPacker", "Split", "data_loss", "make_problem"]


class ParamPacker:
    """Flatten a dict of tensors to one vector and back (same order every time)."""

    def __init__(self, params: Params):
        self.names = list(params)
        self.shapes = [params[k].shape for k in self.names]
        self.sizes = [int(np.prod(s)) for s in self.shapes]

    def flatten(self, params: Params) -> torch.Tensor:
        parts = [params[k].reshape(-1) for k in self.names]
        return torch.cat(parts) if parts else torch.zeros(0)

    def unflatten(self, theta: torch.Tensor) -> Params:
        out = {}
        for name, shape, chunk in zip(
            self.names, self.shapes, torch.split(theta, self.sizes)
        ):
            out[name] = chunk.view(shape)
        return out


class HyperSpace:
    """Which hyperparameters are tuned, and the unconstrained space they live in.

    Tuned entries are concatenated into one vector ``u``: ``log(value)`` for
    log-scaled hyperparameters, the value itself otherwise, box-bounded.
    Fixed entries are constants.

    Parameters
    ----------
    specs : list of Hyperparameter
    fixed : dict
        ``name -> value`` for hyperparameters that are not tuned.
    device, dtype
    """

    def __init__(self, specs: list[Hyperparameter], fixed: dict, device, dtype):
        known = {s.name for s in specs}
        unknown = set(fixed) - known
        if unknown:
            raise ValueError(
                f"hyperparams names {sorted(unknown)} that the aggregator does not "
                f"have; its hyperparameters are {sorted(known)}."
            )
        self.specs = specs
        self.device, self.dtype = device, dtype
        self.tuned = [s for s in specs if s.name not in fixed]
        self.constants = {}
        for s in specs:
            if s.name in fixed:
                given = np.asarray(fixed[s.name], dtype=np.float64)
                if given.size not in (1, s.size) or given.ndim > 1:
                    labels = f" (one per {', '.join(map(str, s.labels))})" if s.labels else ""
                    raise ValueError(
                        f"fixed hyperparameter {s.name!r} takes a scalar or {s.size} "
                        f"values{labels}; got {fixed[s.name]!r}."
                    )
                v = np.broadcast_to(given.ravel() if given.size == s.size else given, (s.size,))
                if not np.all(np.isfinite(v)) or (s.log and np.any(v <= 0)):
                    raise ValueError(
                        f"fixed hyperparameter {s.name!r} must be finite"
                        f"{' and positive' if s.log else ''}; got {fixed[s.name]!r}."
                    )
                self.constants[s.name] = torch.as_tensor(v.copy(), device=device, dtype=dtype)

    def _encode(self, s: Hyperparameter, v):
        return np.log(v) if s.log else np.asarray(v, dtype=np.float64)

    def initial(self) -> torch.Tensor:
        parts = [self._encode(s, s.initial()) for s in self.tuned]
        return self._tensor(np.concatenate(parts) if parts else np.zeros(0))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = [np.full(s.size, self._encode(s, s.low)) for s in self.tuned]
        hi = [np.full(s.size, self._encode(s, s.high)) for s in self.tuned]
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
        return self._tensor(cat(lo)), self._tensor(cat(hi))

    def _tensor(self, a) -> torch.Tensor:
        return torch.as_tensor(a, device=self.device, dtype=self.dtype)

    def values(self, u: torch.Tensor) -> Params:
        """Hyperparameter values (1-D tensors) from the tuned vector ``u``."""
        out = dict(self.constants)
        off = 0
        for s in self.tuned:
            seg = u[off : off + s.size]
            off += s.size
            out[s.name] = torch.exp(seg) if s.log else seg
        return out

    def entry_names(self) -> list[str]:
        return [n for s in self.specs for n in s.entry_names()]

    def flat_values(self, u: torch.Tensor) -> np.ndarray:
        vals = self.values(u)
        return np.concatenate(
            [vals[s.name].detach().cpu().numpy().ravel() for s in self.specs]
        ) if self.specs else np.zeros(0)


def data_loss(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy on class log-scores, or mean squared error."""
    if task == "classification":
        return F.cross_entropy(out, y)
    return (out - y).pow(2).mean()


@dataclass
class Split:
    """Tensors of one set of rows, already on the device."""

    Z: torch.Tensor
    y: torch.Tensor
    X: torch.Tensor | None = None

    def take(self, idx: torch.Tensor) -> "Split":
        return Split(self.Z[idx], self.y[idx], None if self.X is None else self.X[idx])


def make_problem(
    agg: Aggregator,
    ctx: AggregationContext,
    train: Split,
    val: Split | None,
    space: HyperSpace,
    theta0: torch.Tensor | None = None,
) -> tuple[BilevelProblem, ParamPacker, Params]:
    """Build the bilevel problem of fitting ``agg`` on ``train``, judged on ``val``.

    Returns the problem, the packer of its parameters and the buffers
    computed from ``train``.
    """
    buffers = agg.fit_buffers(ctx, train.Z, train.y, train.X)
    init = agg.init_params(ctx, train.Z, train.y, train.X)
    packer = ParamPacker(init)
    start = packer.flatten(init) if theta0 is None else theta0

    def forward(theta, u, part: Split):
        params = {**packer.unflatten(theta), **buffers}
        return agg.forward(params, space.values(u), part.Z, part.X)

    def inner(theta, u):
        loss = data_loss(ctx.task, forward(theta, u, train), train.y)
        params, hyper = packer.unflatten(theta), space.values(u)
        extra = agg.data_penalty({**params, **buffers}, hyper, train.Z, train.X)
        if extra is not None:
            loss = loss + extra
        return loss + agg.penalty(params, hyper)

    def outer(theta, u):
        part = val if val is not None else train
        return data_loss(ctx.task, forward(theta, u, part), part.y)

    return BilevelProblem(inner, outer, start.detach()), packer, buffers
