"""Output maps shared by the aggregation functions that work on the unit interval.

The fuzzy integrals (Choquet, Sugeno), the uninorm and LAF aggregate numbers
in ``[0, 1]``: class probabilities as they are, regressors' standardised
predictions through an affine map fitted on the training rows. Their outputs
go back to the estimator's units through the maps here:

* classifiers: a score ``s_c`` per class (or one, for the positive class of a
  binary problem) becomes class log-scores, ``log sigmoid(s_c)`` (one-vs-rest,
  normalised by the softmax) or ``[0, s]`` for two classes; the choquistic
  map (Tehrani et al. 2012) sets ``s = (C(x) - beta) / T`` with a learned
  threshold ``beta`` and a tuned temperature ``T``;
* regressors: an aggregate ``s`` in ``[0, 1]`` goes back as ``lo + span (a s
  + b)`` with a learned scale ``a > 0`` and offset ``b``.

The learned parameters of these maps enter scaled by the constants below:
they keep the inner problem's Hessian diagonal within a few orders of
magnitude of the capacity's or the weights', where an unscaled threshold's
curvature (up to ``1 / (4 T**2)``) would be about a thousand times larger
and slow L-BFGS down by hundreds of iterations.

References
----------
A. F. Tehrani, W. Cheng, K. Dembczynski, E. Hüllermeier, "Learning
monotone nonlinear models using the Choquet integral", Machine Learning 89
(2012).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "RHO_OFFSET",
    "RHO_SCALE",
    "RHO_THRESHOLD",
    "affine_params",
    "class_inputs",
    "from_unit_interval",
    "logistic_log_scores",
    "threshold_params",
    "threshold_scores",
    "unit_interval_buffers",
    "unit_interval_scale",
]

#: Scale of a learned threshold ``b``: ``beta = 1/2 + RHO_THRESHOLD * T * b``.
RHO_THRESHOLD = 0.2
#: Scale of a regression output's log-scale ``log a``: ``a = exp(RHO_SCALE * log_scale)``.
RHO_SCALE = 0.05
#: Scale of a regression output's offset ``b``.
RHO_OFFSET = 0.1


def unit_interval_scale(Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output ``(low, span)`` mapping regressors' outputs on the rows of ``Z`` into [0, 1].

    Common to all models (minimum and maximum over rows and models), so that
    the models' outputs stay comparable; a constant output gets a span of 1.
    """
    lo = Z.amin(dim=(0, 1))
    hi = Z.amax(dim=(0, 1))
    return lo, torch.where(hi > lo, hi - lo, torch.ones_like(hi))


def unit_interval_buffers(ctx, Z: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x_low`` and ``x_span`` of :func:`unit_interval_scale` for regressors; none for classifiers."""
    if ctx.is_classifier:
        return {}
    lo, span = unit_interval_scale(Z)
    return {"x_low": lo, "x_span": span}


def threshold_params(ctx) -> dict[str, torch.Tensor]:
    """Thresholds of the choquistic map at their start: one per class, one when binary."""
    return {"threshold": ctx.zeros(1 if ctx.is_binary else ctx.n_outputs)}


def affine_params(ctx) -> dict[str, torch.Tensor]:
    """``log_scale`` and ``offset`` of the regression map, one per target, at ``a = 1, b = 0``."""
    return {"log_scale": ctx.zeros(ctx.n_outputs), "offset": ctx.zeros(ctx.n_outputs)}


def class_inputs(Z: torch.Tensor, binary: bool) -> torch.Tensor:
    """``(n, c', m)`` inputs of a per-class aggregate: the positive class only when binary."""
    return (Z[:, :, 1:2] if binary else Z).transpose(1, 2)


def logistic_log_scores(s: torch.Tensor, binary: bool) -> torch.Tensor:
    """Class log-scores from per-class logits ``s``: ``[0, s]`` (binary) or ``log sigmoid(s)``."""
    if binary:
        return torch.cat([torch.zeros_like(s), s], 1)
    return F.logsigmoid(s)


def threshold_scores(
    integral: torch.Tensor, threshold: torch.Tensor, temperature: torch.Tensor, binary: bool
) -> torch.Tensor:
    """The choquistic map: log-scores of ``(C - beta) / T``, ``beta = 1/2 + RHO_THRESHOLD T b``.

    The factor ``T`` in ``beta`` puts the loss's curvature in ``b`` (at most
    ``RHO_THRESHOLD**2 / 4``) on the scale of the capacity's, whatever the
    temperature.
    """
    gain = 1.0 / temperature
    beta = 0.5 + RHO_THRESHOLD * temperature * threshold
    return logistic_log_scores(gain * (integral - beta), binary)


def from_unit_interval(params: dict, s: torch.Tensor) -> torch.Tensor:
    """``lo + span (a s + b)``: an aggregate in [0, 1] back in standardised target units."""
    scale = torch.exp(RHO_SCALE * params["log_scale"])
    return params["x_low"] + params["x_span"] * (scale * s + RHO_OFFSET * params["offset"])
