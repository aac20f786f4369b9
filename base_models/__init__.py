"""Frozen base models: any pretrained model, wrapped so an aggregator can call it.

A base model is never refit by an aggregator. Wrappers exist for fitted
scikit-learn estimators, torch modules, plain callables and stored predictions;
:func:`as_base_model` picks the right one.
"""

from ._base import (
    BaseModel,
    BaseModelError,
    BaseModelTypeError,
    BaseModelValueError,
    BaseModelWarning,
    IncompatibleBaseModelError,
    UnfittedBaseModelError,
    calling,
)
from ._callable import CallableModel, PrecomputedModel
from ._collect import PoolFit, check_pool, collect_outputs, fit_pool, pool_outputs, take_rows
from ._device import (
    resolve_device,
    resolve_dtype,
    small_problem_threads,
    to_numpy,
    to_tensor,
)
from ._pool import (
    as_base_model,
    check_class_order,
    check_probabilities,
    class_probabilities,
    regression_outputs,
)
from ._sklearn import SklearnModel, is_fitted_estimator
from ._torch import TorchModel

__all__ = [
    "BaseModel",
    "BaseModelError",
    "BaseModelTypeError",
    "BaseModelValueError",
    "BaseModelWarning",
    "CallableModel",
    "IncompatibleBaseModelError",
    "PoolFit",
    "PrecomputedModel",
    "SklearnModel",
    "TorchModel",
    "UnfittedBaseModelError",
    "as_base_model",
    "calling",
    "check_class_order",
    "check_pool",
    "check_probabilities",
    "class_probabilities",
    "collect_outputs",
    "fit_pool",
    "is_fitted_estimator",
    "pool_outputs",
    "regression_outputs",
    "resolve_device",
    "resolve_dtype",
    "small_problem_threads",
    "take_rows",
    "to_numpy",
    "to_tensor",
]
