"""The hypergradient engine: bilevel problems, inner solvers, hypergradients.

Pure torch; it knows nothing of scikit-learn. A :class:`BilevelProblem` holds
an inner loss ``L(theta, h)`` and an outer loss ``Q(theta, h)`` over flat
tensors; :func:`hypergradient` differentiates ``Q(theta*(h), h)`` by the named
method (:data:`METHODS`) and :func:`tune` runs the outer loop.
"""

from ._acv import ACV_METHODS, acv_fold_params, acv_loss, acv_problem, fold_membership
from ._acv_linear import (
    linear_acv_fold_params,
    linear_acv_loss,
    linear_acv_problem,
    linear_loo_predictions,
    ridge_loo_residuals,
)
from ._forward import forward_hypergradient
from ._greedy import darts_hypergradient, greedy_hypergradient
from ._hoag import hoag_hypergradient, hoag_tolerance
from ._implicit import conjugate_gradient, implicit_hypergradient, neumann_series
from ._inner import lipschitz_estimate, solve_inner
from ._joint import stack_problems
from ._problem import (
    BilevelProblem,
    HessianDecision,
    HypergradResult,
    InnerDivergenceError,
    fd_mixed_product,
    is_out_of_memory,
)
from ._projections import project_capped_simplex
from ._tuner import METHODS, TuningResult, hypergradient, tune
from ._unrolled import drmad_hypergradient, reverse_hypergradient

__all__ = [
    "ACV_METHODS",
    "METHODS",
    "BilevelProblem",
    "HessianDecision",
    "HypergradResult",
    "InnerDivergenceError",
    "acv_fold_params",
    "acv_loss",
    "acv_problem",
    "fold_membership",
    "linear_acv_fold_params",
    "linear_acv_loss",
    "linear_acv_problem",
    "linear_loo_predictions",
    "ridge_loo_residuals",
    "TuningResult",
    "conjugate_gradient",
    "darts_hypergradient",
    "drmad_hypergradient",
    "fd_mixed_product",
    "forward_hypergradient",
    "greedy_hypergradient",
    "hoag_hypergradient",
    "hoag_tolerance",
    "hypergradient",
    "implicit_hypergradient",
    "is_out_of_memory",
    "lipschitz_estimate",
    "neumann_series",
    "project_capped_simplex",
    "reverse_hypergradient",
    "solve_inner",
    "stack_problems",
    "tune",
]
