"""What an aggregation function is: parameters, hyperparameters, a forward pass.

An aggregation function is an unfitted *specification* (a scikit-learn style
object whose ``__init__`` only stores arguments) that tells the estimator

* its **hyperparameters** (:meth:`Aggregator.hyperparameters`): continuous,
  box-bounded, optionally log-scaled, possibly vectors (one per base model);
  tuned on the inner validation split by hypergradient;
* its **parameters** (:meth:`Aggregator.init_params`): tensors fitted on the
  inner training split by minimising the data loss plus :meth:`penalty`;
* optional constants computed once from the training rows
  (:meth:`Aggregator.fit_buffers`), e.g. scalers;
* its **forward pass** (:meth:`Aggregator.forward`) on base outputs
  ``Z`` of shape ``(n_rows, n_models, n_outputs)`` (class probabilities for
  classifiers, standardised predictions for regressors) and optionally the
  input features ``X``. For classifiers it returns class log-scores
  (``softmax`` gives probabilities); for regressors, predictions in the
  standardised target space.

It is told the problem it serves by an :class:`AggregationContext`: the
methods that build it (``hyperparameters``, ``fit_buffers``, ``init_params``,
``check_task``) receive the context, and :meth:`Aggregator.bind` records
what :meth:`~Aggregator.forward` and :meth:`~Aggregator.route` need of it
(``task_``, ``n_outputs_``, ``n_models_``) before the first forward pass, so
that they never guess the task from the shapes of the parameters.

It never touches the estimator or the hypergradient engine. After fitting,
the estimator stores a copy with ``params_``, ``buffers_`` and
``hyperparams_`` set as ``aggregator_``; subclasses add readable views
(weights, Shapley values, ...) on top of those.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

__all__ = ["AggregationContext", "Aggregator", "Hyperparameter"]

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Hyperparameter:
    """A continuous hyperparameter an aggregation function declares.

    Parameters
    ----------
    name : str
        Key in the hyperparameter dict given to :meth:`Aggregator.forward`
        and :meth:`Aggregator.penalty`.
    init : float or array-like
        Starting (or fixed) value; broadcast to ``size``.
    low, high : float
        The box it is tuned in (inclusive); for ``log=True`` both must be positive.
    log : bool, default=True
        Tune ``log(value)`` rather than the value.
    size : int, default=1
        Length of a vector hyperparameter (e.g. one L2 weight per base model).
    labels : tuple of str, default=None
        Names of the entries of a vector hyperparameter (e.g. model names).
    limits : tuple of float, default=None
        ``(low, high)``, inclusive, that every value given for it must lie in:
        ``init``, a value fixed through the estimator's ``hyperparams``, and
        the ends of a range it is tuned in. ``None``: the box ``(low, high)``.
        Wider than the box where the box is a default rather than a limit
        (an L2 floor that follows the number of rows). A log-scaled
        hyperparameter must also be positive.
    penalty : bool, default=False
        Whether it weighs a penalty on the parameters alone (a prior) added to
        the mean training loss, such as an L2 weight. The same prior over more
        rows is a proportionally smaller weight on the mean loss, so when the
        estimator tunes on a subsample of ``m`` of its ``n`` rows
        (``max_tuning_rows``), the subsample's problems see ``value * n / m``:
        they then weigh the prior against each row as the fit on all rows
        does. Weights of terms computed from the rows (``data_penalty``), and
        hyperparameters of the forward pass (temperatures), are not penalties.

    Notes
    -----
    A value outside the limits is an error (:meth:`check`), never clipped. A
    tuned hyperparameter whose ``init`` lies within the limits but outside the
    box starts at the nearest bound of the box (:meth:`initial`).
    """

    name: str
    init: Any
    low: float
    high: float
    log: bool = True
    size: int = 1
    labels: tuple | None = None
    limits: tuple | None = None
    penalty: bool = False

    @classmethod
    def held(cls, name: str, value, limits: tuple, **kwargs) -> "Hyperparameter":
        """One held at ``value`` by default: a box of width 0 there. The
        estimator's ``hyperparams`` or ``tune_ranges`` can still fix it, or
        tune it, anywhere within ``limits``."""
        return cls(name, value, value, value, limits=tuple(limits), **kwargs)

    def initial(self) -> np.ndarray:
        """The initial value as a float array of length ``size``, moved into the box."""
        v = np.broadcast_to(np.asarray(self.init, dtype=np.float64), (self.size,))
        return np.clip(v, self.low, self.high).copy()

    def allowed(self) -> tuple[float, float]:
        """``(low, high)`` that every value given for it must lie in (see ``limits``)."""
        low, high = self.limits if self.limits is not None else (self.low, self.high)
        return float(low), float(high)

    def allowed_text(self) -> str:
        """The allowed range as an interval, e.g. ``(0, 100]`` or ``[0.001, 1000]``."""
        low, high = self.allowed()
        left = "(" if self.log and low <= 0 else "["
        return f"{left}{low:g}, {high:g}]"

    def _inside(self, v: np.ndarray) -> np.ndarray:
        low, high = self.allowed()
        # A relative 1e-9 of slack: a value tuned to a bound comes back from
        # log space (exp(log(100))) a rounding error beyond it.
        ok = (v >= low - 1e-9 * abs(low)) & (v <= high + 1e-9 * abs(high))
        return ok & (v > 0) if self.log else ok

    def check(self, value, owner: str = "the aggregator", given: str = "") -> np.ndarray:
        """``value`` as a float array of length ``size``, or a ``ValueError``.

        Parameters
        ----------
        value : float or array-like
            A scalar (broadcast) or ``size`` values.
        owner : str, default="the aggregator"
            Who declares the hyperparameter (the aggregation function's class name).
        given : str, default=""
            Where the value was given (for the message).

        Returns
        -------
        ndarray of shape (size,)

        Raises
        ------
        ValueError
            If ``value`` has another size, is not a number, or lies outside
            :meth:`allowed` (names the hyperparameter, the value and the range).
        """
        where = f" ({given})" if given else ""
        try:
            v = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{owner}'s hyperparameter {self.name!r} must be a number; got "
                f"{value!r}{where}."
            ) from e
        if v.size not in (1, self.size) or v.ndim > 1:
            per = f" (one per {', '.join(map(str, self.labels))})" if self.labels else ""
            raise ValueError(
                f"{owner}'s hyperparameter {self.name!r} takes a scalar or {self.size} "
                f"values{per}; got {value!r}{where}."
            )
        given_size = v.size
        v = np.broadcast_to(v.ravel(), (self.size,)).copy()
        ok = self._inside(v)
        if not ok.all():
            which = ""
            if given_size > 1:
                labels = self.labels or tuple(range(self.size))
                which = f" (entries {[labels[i] for i in np.flatnonzero(~ok)][:10]})"
            raise ValueError(
                f"{owner}'s hyperparameter {self.name!r} must lie in "
                f"{self.allowed_text()}; got {value!r}{which}{where}. Give a value "
                "within that range."
            )
        return v

    def check_range(self, low: float, high: float, owner: str = "the aggregator") -> None:
        """Raise ``ValueError`` unless the box ``[low, high]`` to tune in lies in :meth:`allowed`."""
        if not self._inside(np.array([low, high])).all():
            raise ValueError(
                f"the range ({low:g}, {high:g}) given to tune {owner}'s hyperparameter "
                f"{self.name!r} in reaches outside its allowed range "
                f"{self.allowed_text()}; give a range within it."
            )

    def entry_names(self) -> list[str]:
        """Flat names such as ``l2[rf]`` for each entry of the vector."""
        if self.size == 1 and self.labels is None:
            return [self.name]
        labels = self.labels or tuple(range(self.size))
        return [f"{self.name}[{lab}]" for lab in labels]


@dataclass
class AggregationContext:
    """What an aggregation function knows about the problem it is fitted on.

    Attributes
    ----------
    task : {"classification", "regression"}
    n_models : int
    n_outputs : int
        Classes (classification) or targets (regression).
    n_features : int
        Columns of ``X``.
    model_names : list of str
    classes : ndarray or None
    device : torch.device
    dtype : torch.dtype
    generator : torch.Generator
        Seeded from the estimator's ``random_state``; use it for any
        random initialisation.
    n_train : int or None
        Rows each inner problem is fitted on while tuning (the mean training
        part of the cross-fitting folds); ``None`` when unknown. A penalty
        weight ``w`` on the mean loss is a weight ``w * n_train`` on the
        summed loss, so bounds that should follow the amount of data read it.
    """

    task: str
    n_models: int
    n_outputs: int
    n_features: int
    model_names: list
    classes: np.ndarray | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float64
    generator: torch.Generator | None = None
    n_train: int | None = None

    @property
    def is_classifier(self) -> bool:
        """Whether the task is classification (``n_outputs`` then counts classes)."""
        return self.task == "classification"

    @property
    def is_binary(self) -> bool:
        """Whether the task is classification with two classes."""
        return self.is_classifier and self.n_outputs == 2

    def zeros(self, *shape) -> torch.Tensor:
        """A zero tensor on the context's device and dtype."""
        return torch.zeros(*shape, device=self.device, dtype=self.dtype)

    def full(self, shape, value) -> torch.Tensor:
        """A constant tensor on the context's device and dtype."""
        return torch.full(shape, float(value), device=self.device, dtype=self.dtype)


def l2_limits_for(given: tuple | None) -> tuple[float, float] | None:
    """Where a given L2 weight may lie: the ``given`` bounds, else ``(0, 100]``.

    The default floor of :func:`l2_bounds_for` follows the number of rows; it
    bounds the tuning, not the values a user may fix or start from.
    """
    return None if given is not None else (0.0, 1e2)


def l2_bounds_for(ctx: "AggregationContext", given: tuple | None) -> tuple[float, float]:
    """Range of an L2 weight on the mean training loss: ``given``, else ``(0.1 / n_train, 100)``.

    An L2 weight on the mean loss is ``LogisticRegression``'s ``C = 1 / (l2 *
    n_train)``: this floor allows ``C <= 10`` however many rows each inner
    problem has (``(1e-3, 100)`` when the count is unknown). Shared by the
    aggregation functions whose penalty is a plain L2 (stacking, LAF).
    """
    if given is not None:
        return float(given[0]), float(given[1])
    if ctx.n_train:
        return 0.1 / ctx.n_train, 1e2
    return 1e-3, 1e2


#: Constructor parameter names by constructor (see :func:`cached_param_names`).
_PARAM_NAMES: dict = {}


def cached_param_names(cls: type, read) -> list[str]:
    """``read()`` (scikit-learn's ``_get_param_names``, which inspects the
    constructor's signature) once per constructor of ``cls``: ``get_params``
    asks on every call, and ``clone`` calls it twice."""
    init = cls.__init__
    if init not in _PARAM_NAMES:
        _PARAM_NAMES[init] = tuple(read())
    return list(_PARAM_NAMES[init])


@functools.lru_cache(maxsize=256)
def _label_index(labels: tuple) -> pd.Index:
    """The (immutable) index of a vector hyperparameter's labels, built once:
    inferring it from a list of strings costs several times the Series on
    it, and a fit builds one for each fold's aggregation function."""
    return pd.Index(list(labels))


def readable_hyperparams(specs: list, values: dict) -> dict:
    """``name -> float`` for scalars, ``name -> Series`` (by label) for vectors."""
    out = {}
    for spec in specs:
        v = np.asarray(values[spec.name], dtype=np.float64)
        if spec.size == 1 and spec.labels is None:
            out[spec.name] = float(v.ravel()[0])
            continue
        labels = tuple(spec.labels or range(spec.size))
        try:
            index = _label_index(labels)
        except TypeError:  # labels that do not hash
            index = list(labels)
        out[spec.name] = pd.Series(v, index=index, name=spec.name)
    return out


class Aggregator(BaseEstimator):
    """Base class of aggregation functions (see the module docstring).

    Subclasses implement :meth:`hyperparameters`, :meth:`init_params` and
    :meth:`forward`, and may override :meth:`penalty`, :meth:`data_penalty`,
    :meth:`fit_buffers`, :meth:`check_task` and :meth:`route` (sparse
    inference). Set the class attribute ``uses_X = True`` when the
    forward pass reads the input features. :meth:`forward` and
    :meth:`route` get no context: they read ``task_``, ``n_outputs_`` and
    ``n_models_``, which :meth:`bind` sets before the first forward pass.
    """

    #: Whether :meth:`forward` reads ``X`` (the estimator then moves it to the device).
    uses_X: bool = False
    #: Whether the training loss is differentiable everywhere. Where it has
    #: kinks (a k-th largest value, say) L-BFGS can stop at one with a gradient
    #: above tolerance although no step lowers the loss: the estimator then
    #: warns only when the inner solve runs out of iterations.
    smooth: bool = True
    #: Whether the engine may form the exact Hessian of the training loss when
    #: each fold has few parameters (Newton inner solves and exact linear
    #: solves for the hypergradient, instead of L-BFGS and conjugate
    #: gradient). Set it to ``False`` when second derivatives of
    #: :meth:`forward` cost far more than first ones. Functions that are not
    #: ``smooth`` never get Newton steps.
    second_order: bool = True
    #: At most this many outer evaluations (hyperparameter values tried, line
    #: searches included) when tuning with L-BFGS-B, or ``None`` (default):
    #: ``2 * max_outer_iter``, the estimator's bound. For functions whose
    #: evaluations are dear and whose validation loss changes little after
    #: the first few steps; the smaller of the two bounds is kept.
    outer_budget: int | None = None
    #: Whether :meth:`forward` is differentiable in the base outputs ``Z``.
    #: ``False`` for integrals that sort their inputs or take their minima
    #: (Choquet; Sugeno's max-min is a soft one): a wrapper whose trained parameters move ``Z``
    #: (:class:`~aggregators.ModelSelection`) then has a training loss with
    #: kinks although the function is smooth in its own parameters.
    smooth_in_outputs: bool = True
    #: Whether each validation row's loss is charged ``1 / (n + 1)`` of the
    #: loss it would pay on an error (``n`` validation rows; classifiers):
    #: see :func:`~aggregators._bilevel.unseen_error_charge`. For functions
    #: whose tuning can sharpen their scores without bound (an output
    #: temperature over a bounded score), which an error-free validation set
    #: would otherwise reward all the way to the temperature's floor.
    charge_unseen_errors: bool = False

    @classmethod
    def _get_param_names(cls):
        return cached_param_names(cls, super()._get_param_names)

    # -- what the estimator tells it ---------------------------------------------
    def bind(self, ctx: AggregationContext) -> "Aggregator":
        """Record what :meth:`forward` and :meth:`route` need to know of the problem.

        Sets ``task_``, ``n_outputs_`` and ``n_models_`` from ``ctx``. The
        estimator (and :func:`~aggregators._bilevel.make_problem`) calls it
        before the first forward pass; call it yourself to use
        :meth:`forward` outside an estimator. A subclass that wraps another
        aggregation function binds that one too.

        Returns
        -------
        self
        """
        self.task_ = ctx.task
        self.n_outputs_ = ctx.n_outputs
        self.n_models_ = ctx.n_models
        return self

    @property
    def _classifier(self) -> bool:
        """Whether the bound task (:meth:`bind`) is classification."""
        task = getattr(self, "task_", None)
        if task is None:
            raise RuntimeError(
                f"{type(self).__name__} has not been told its task: call bind(ctx) "
                "before forward (the estimator does)."
            )
        return task == "classification"

    @property
    def _binary(self) -> bool:
        """Whether the bound task (:meth:`bind`) is classification with two classes."""
        return self._classifier and self.n_outputs_ == 2

    # -- what a subclass declares -------------------------------------------------
    def check_task(self, ctx: AggregationContext) -> None:
        """Raise ``ValueError`` if the function cannot serve ``ctx.task``."""

    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        """Continuous hyperparameters tuned on the validation split."""
        return []

    def fit_buffers(
        self, ctx: AggregationContext, Z: torch.Tensor, y: torch.Tensor, X=None
    ) -> Params:
        """Constants computed once from the training rows (not trained)."""
        return {}

    def init_params(
        self, ctx: AggregationContext, Z: torch.Tensor, y: torch.Tensor, X=None
    ) -> Params:
        """Initial values of the trainable parameters."""
        raise NotImplementedError

    def forward(
        self, params: Params, hyper: Params, Z: torch.Tensor, X=None
    ) -> torch.Tensor:
        """Aggregate base outputs: class log-scores or standardised predictions.

        Parameters
        ----------
        params : dict of Tensor
            Trainable parameters and buffers.
        hyper : dict of Tensor
            Hyperparameter values (1-D tensors of their declared size).
        Z : Tensor of shape (n_rows, n_models, n_outputs)
        X : Tensor of shape (n_rows, n_features) or None

        Returns
        -------
        Tensor of shape (n_rows, n_outputs)
        """
        raise NotImplementedError

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        """Regularisation added to the mean training loss."""
        first = next(iter(params.values()))
        return first.new_zeros(())

    def data_penalty(
        self, params: Params, hyper: Params, Z: torch.Tensor, X=None
    ) -> torch.Tensor | None:
        """Regulariser that depends on the training rows, or ``None`` (default).

        Added to the inner (training) loss only, never to the validation loss
        that hyperparameters are tuned on; e.g. the load-balancing losses of
        a gate, which are statistics over a batch of rows. ``params`` holds
        the trainable parameters and the buffers, as in :meth:`forward`.
        """
        return None

    def linear_design(self, buffers: Params, Z: torch.Tensor, X=None) -> torch.Tensor | None:
        """The design matrix of a forward pass linear in the parameters, or ``None`` (default).

        An aggregation function whose :meth:`forward` is
        ``D @ theta.reshape(q, n_outputs)``, with ``theta`` its parameters
        flattened in :meth:`init_params`' order and ``D`` of shape
        ``(n_rows, q)`` independent of the parameters and hyperparameters,
        returns ``D`` (stacking: the base outputs, a column of ones, the
        standardised features). Approximate cross-validation then forms its
        fold Hessians from the ``n_outputs x n_outputs`` Hessians of the
        loss in the predictions, in one pass over the rows
        (:func:`~aggregators.hypergrad.linear_acv_problem`), instead of
        differentiating the forward pass twice per parameter.

        Parameters
        ----------
        buffers : dict of Tensor
            What :meth:`fit_buffers` returned.
        Z : Tensor of shape (n_rows, n_models, n_outputs)
        X : Tensor of shape (n_rows, n_features) or None

        Returns
        -------
        Tensor of shape (n_rows, q) or None
        """
        return None

    def route(self, params: Params, hyper: Params, X=None) -> torch.Tensor | None:
        """Which base outputs :meth:`forward` needs at predict time, or ``None`` (all).

        An aggregation function that only reads some base models on some rows
        (a sparse gate, a model selection) returns a boolean tensor of shape
        ``(n_rows, n_models)`` (or ``(1, n_models)``, the same for every row);
        the estimator then calls each base model on its
        ``True`` rows only and fills the other entries of ``Z`` with a finite
        placeholder, which :meth:`forward` must ignore. Called without
        autograd, after fitting.
        """
        return None

    # -- fitted state, set by the estimator ---------------------------------------
    def _check_fitted(self) -> None:
        """Raise ``NotFittedError`` unless this is a fitted copy (``estimator.aggregator_``)."""
        if not hasattr(self, "params_"):
            raise NotFittedError(
                f"this {type(self).__name__} aggregator is not fitted; fit an "
                "AggregatedClassifier / AggregatedRegressor with it and use "
                "estimator.aggregator_."
            )

    def _set_fitted(
        self, ctx, params: Params, buffers: Params, hyper: dict, specs: list
    ) -> None:
        # Numpy, not tensors: a pickle then loads on any machine, CUDA or not.
        self.params_ = {k: v.detach().cpu().numpy() for k, v in params.items()}
        self.buffers_ = {k: v.detach().cpu().numpy() for k, v in buffers.items()}
        self._hyper_vectors_ = {k: np.asarray(v, dtype=np.float64) for k, v in hyper.items()}
        self.hyperparams_ = readable_hyperparams(specs, self._hyper_vectors_)
        self.model_names_ = list(ctx.model_names)
        self.classes_ = ctx.classes
        self.bind(ctx)

    def _fitted_tensors(self, device, dtype) -> tuple[Params, Params]:
        """Fitted parameters and hyperparameters as tensors on ``device``."""
        params = {
            k: torch.as_tensor(v, device=device, dtype=dtype)
            for k, v in {**self.params_, **self.buffers_}.items()
        }
        hyper = {
            k: torch.as_tensor(np.atleast_1d(v), device=device, dtype=dtype)
            for k, v in self._hyper_vectors_.items()
        }
        return params, hyper
