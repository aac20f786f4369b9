"""Relaxed model selection around any aggregation function."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.base import clone

from ._base import AggregationContext, Aggregator, Hyperparameter, Params
from ._registry import resolve_aggregator

__all__ = ["ModelSelection", "loss_scale", "neutralise", "redundancy"]

_LOGITS = "selection_logits"
_SPARSITY = "selection_sparsity"
_BASELINE = "selection_baseline"
_REDUNDANCY = "selection_redundancy"
_SCALE = "selection_loss_scale"
_OWN = (_LOGITS, _BASELINE, _REDUNDANCY, _SCALE)


def neutralise(Z: torch.Tensor, keep: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Blend each model's outputs with a constant: ``Z~_j = s_j Z_j + (1 - s_j) b_j``.

    With ``b_j`` the model's average output on the training rows (mean
    ablation), a model at ``s_j = 0`` gives the same column for every row:
    it carries no information about the row, whatever aggregation function
    reads it, and need not be called at all.

    Parameters
    ----------
    Z : Tensor of shape (n_rows, n_models, n_outputs)
    keep : Tensor of shape (n_models,)
        Relaxed (in [0, 1]) or hard (0 / 1) keep mask.
    baseline : Tensor of shape (n_models, n_outputs)
    """
    s = keep[None, :, None]
    # torch.where, not arithmetic, for hard zeros: placeholders in Z never leak.
    return torch.where(s > 0, s * Z + (1 - s) * baseline, baseline.expand_as(Z))


def redundancy(
    Z: torch.Tensor, power: float = 8.0, target: torch.Tensor | None = None
) -> torch.Tensor:
    """``R_ij = max(0, corr(E_i, E_j))^power`` between models, zero diagonal.

    Correlation over rows (and outputs) of the centred errors
    ``E_j = Z_j - target`` (of the outputs themselves without ``target``);
    a high power leaves only near-duplicates with a sizeable entry (at the
    default 8, ``0.9**8 = 0.43`` and ``0.99**8 = 0.92``).

    Errors rather than outputs: accurate models agree with the target, hence
    with each other, by their accuracy alone (on ``make_friedman1`` eight
    regressors of different families have output correlations of 0.85 to
    0.99, error correlations of 0.34 to 0.92); only a near-duplicate makes
    the same errors.

    Parameters
    ----------
    Z : Tensor of shape (n_rows, n_models, n_outputs)
    power : float, default=8.0
    target : Tensor of shape (n_rows, n_outputs), default=None
        What every model predicts: the (standardised) target of a regressor,
        the one-hot classes of a classifier.
    """
    if target is not None:
        Z = Z - target[:, None, :]
    C = Z - Z.mean(0, keepdim=True)
    C = C.transpose(0, 1).reshape(Z.shape[1], -1)  # (n_models, rows * outputs)
    norm = C.norm(dim=1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    corr = (C @ C.T) / (safe[:, None] * safe[None, :])
    R = corr.clamp_min(0).pow(power)
    return R - torch.diag_embed(torch.diagonal(R))


def loss_scale(ctx: AggregationContext, Z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The best base model's own training loss: the unit of the selection penalties.

    Log-loss of a classifier's probabilities, mean squared error of a
    regressor's (standardised) predictions, as the estimator's data loss
    measures them; floored at ``1e-3`` of the loss of a constant prediction
    (the prior, or the target's mean), so that a perfect model does not
    switch the penalties off.

    What keeping a model is worth is a fraction of this loss: an accurate
    regressor's mean squared error in units of the target's variance is a
    few hundredths, and so are the gains of combining such models; penalties
    in absolute units, tuned for log-losses of a few tenths, would then
    outweigh every gain and keep a single model.

    Returns
    -------
    Tensor of shape ()
    """
    if ctx.task == "classification":
        labels = y.long()
        p = Z[torch.arange(Z.shape[0], device=Z.device), :, labels]  # (n_rows, n_models)
        losses = -torch.log(p.clamp_min(1e-15)).mean(0)
        prior = torch.bincount(labels, minlength=ctx.n_outputs).to(Z.dtype) / labels.numel()
        constant = -(prior * torch.log(prior.clamp_min(1e-15))).sum()
    else:
        t = y.reshape(Z.shape[0], 1, -1).to(Z.dtype)
        losses = (Z - t).pow(2).mean((0, 2))
        constant = (t - t.mean(0, keepdim=True)).pow(2).mean()
    return torch.maximum(losses.min(), 1e-3 * constant).detach()


class ModelSelection(Aggregator):
    """Learn which base models to keep, around any aggregation function.

    Each base model ``j`` gets a keep logit ``a_j``, trained with the wrapped
    aggregation function's parameters; its relaxed keep mask is
    ``s_j = sigmoid(a_j / temperature)`` (a point inside the cube whose
    vertices are the subsets, as DARTS relaxes a discrete choice to the
    interior of the simplex with a softmax; Liu et al. 2019). The wrapped function
    sees ``neutralise(Z, s, b)``: model ``j``'s column is blended with its
    average output ``b_j`` on the training rows, so that a dropped model
    (``s_j = 0``) gives the same constant on every row and carries no
    information however the wrapped function reads its column (weights,
    stacking coefficients, capacities, gates). A constant rather than the
    kept models' mean: with the mean, shrinking every ``s_j`` together
    costs almost nothing in training loss (the columns tend to the uniform
    average), and the relaxed optimum no longer says which hard subset is
    good (on a pool of complementary models every keep probability can fall
    below 1/2). The training loss adds
    ``L0 * (sparsity * sum_j sqrt(s_j) + redundancy / 2 * s^T R s)``. The
    first term is a concave count of kept models that prefers dropping one
    of two exact duplicates to keeping both halfway; ``sparsity`` is tuned
    by hypergradient on the validation loss. The second, with fixed weight,
    ``R`` the (high power of the) correlation between the models' *errors*
    on the training rows (:func:`redundancy`), makes near-duplicates
    compete: without it the wrapped function's own L2, which prefers sharing
    weight between duplicates, keeps both copies of a duplicated model.
    Errors, not outputs: accurate models agree with each other through the
    target, and a redundancy on outputs made every good regressor compete
    with every other. ``L0``, the best model's own training loss
    (:func:`loss_scale`), is the unit of both terms: what keeping a model is
    worth is a fraction of the loss, and an accurate regressor's squared
    error on the standardised target is a few hundredths, where penalties
    in absolute units outweighed every gain of combining and kept a single
    model (on ``make_friedman1``, not even the best one).

    At predict time (no autograd) the mask is hard: ``selected_`` keeps the
    models with ``s_j > 1/2`` (at least the most kept one), and
    :meth:`route` tells the estimator not to call the dropped models at all.

    Parameters
    ----------
    aggregator : str or Aggregator, default="weights"
        The aggregation function over the kept models (a short name or an
        instance; its parameters are reachable as ``aggregator__<name>``).
    temperature : float, default=0.25
        Temperature of the relaxation (fixed): lower is closer to a hard
        subset during training.
    sparsity : float, default=1e-3
        Initial weight of the sparsity penalty, in units of the best model's
        training loss (:func:`loss_scale`).
    sparsity_bounds : tuple of float, default=(1e-5, 0.1)
        Range it is tuned in (log scale).
    keep_l2 : float, default=1e-3
        Fixed L2 weight on the keep logits, which keeps the inner optimum
        finite when a model's mask saturates.
    redundancy : float, default=0.05
        Fixed weight of the redundancy term, in units of the best model's
        training loss.
    redundancy_power : float, default=32.0
        Power of the error correlations in ``R`` (see :func:`redundancy`):
        at 32, two different good models whose errors correlate at 0.9 get
        ``0.03``, an exact duplicate 1.
    init_keep : float, default=0.9
        Initial keep probability of every model (a tiny random jitter, from
        the estimator's ``random_state``, breaks ties between duplicates).

    Attributes
    ----------
    selected_ : Series of bool
        The hard subset, by model name (after fitting).
    keep_probabilities_ : Series
        Relaxed keep mask ``s`` at the optimum.
    aggregator_ : Aggregator
        The fitted wrapped aggregation function (its readable views, e.g.
        ``weights_``, refer to the neutralised columns).

    References
    ----------
    H. Liu, K. Simonyan, Y. Yang, "DARTS: Differentiable architecture
    search", ICLR 2019.

    Examples
    --------
    >>> from aggregators import AggregatedClassifier, ModelSelection
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.naive_bayes import GaussianNB
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = AggregatedClassifier(
    ...     [("lr", LogisticRegression(max_iter=500)), ("nb", GaussianNB())],
    ...     aggregator=ModelSelection("weights"), max_outer_iter=3,
    ...     random_state=0).fit(X, y)
    >>> clf.aggregator_.selected_.dtype
    dtype('bool')
    """

    short_name = "select"

    def __init__(
        self,
        aggregator="weights",
        *,
        temperature: float = 0.25,
        sparsity: float = 1e-3,
        sparsity_bounds: tuple = (1e-5, 0.1),
        keep_l2: float = 1e-3,
        redundancy: float = 0.05,
        redundancy_power: float = 32.0,
        init_keep: float = 0.9,
    ):
        self.aggregator = aggregator
        self.temperature = temperature
        self.sparsity = sparsity
        self.sparsity_bounds = sparsity_bounds
        self.keep_l2 = keep_l2
        self.redundancy = redundancy
        self.redundancy_power = redundancy_power
        self.init_keep = init_keep

    # -- the wrapped function -----------------------------------------------------
    def _inner(self) -> Aggregator:
        spec = self.aggregator
        if isinstance(spec, ModelSelection):
            raise ValueError("ModelSelection cannot wrap another ModelSelection.")
        if not isinstance(spec, str):
            return spec
        # A short name resolves to a fresh instance: the one resolved for this
        # name is kept, so that what bind() told it holds in later calls.
        resolved = self.__dict__.get("_resolved")
        if resolved is None or resolved[0] != spec:
            resolved = self._resolved = (spec, resolve_aggregator(spec))
        return resolved[1]

    def bind(self, ctx: AggregationContext) -> "ModelSelection":
        super().bind(ctx)
        self._inner().bind(ctx)
        return self

    @property
    def uses_X(self) -> bool:  # type: ignore[override]
        return bool(self._inner().uses_X)

    @property
    def smooth(self) -> bool:  # type: ignore[override]
        # The keep mask blends the base outputs, so the wrapped function's
        # kinks in its inputs become kinks in the trained keep logits.
        inner = self._inner()
        return bool(getattr(inner, "smooth", True) and getattr(inner, "smooth_in_outputs", True))

    @property
    def second_order(self) -> bool:  # type: ignore[override]
        return bool(getattr(self._inner(), "second_order", True))

    @staticmethod
    def _split(params: Params, hyper: Params):
        inner_p = {k: v for k, v in params.items() if k not in _OWN}
        inner_h = {k: v for k, v in hyper.items() if k != _SPARSITY}
        return inner_p, inner_h

    def _mask(self, params: Params, hard: bool | None = None) -> torch.Tensor:
        a = params[_LOGITS]
        if hard is None:
            hard = not torch.is_grad_enabled()
        if not hard:
            return torch.sigmoid(a / self.temperature)
        keep = a > 0
        if not keep.any():  # never an empty ensemble
            keep = a == a.max()
        return keep.to(a.dtype)

    # -- declaration ------------------------------------------------------------
    def check_task(self, ctx: AggregationContext) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive; got {self.temperature!r}.")
        if not 0 < self.init_keep < 1:
            raise ValueError(f"init_keep must be in (0, 1); got {self.init_keep!r}.")
        if not self.keep_l2 > 0:
            raise ValueError(f"keep_l2 must be positive; got {self.keep_l2!r}.")
        if not self.redundancy >= 0:
            raise ValueError(f"redundancy must be non-negative; got {self.redundancy!r}.")
        inner = self._inner()
        inner.check_task(ctx)
        if any(h.name == _SPARSITY for h in inner.hyperparameters(ctx)):
            raise ValueError(f"the wrapped aggregator already has a hyperparameter {_SPARSITY!r}.")

    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        return self._inner().hyperparameters(ctx) + [
            Hyperparameter(_SPARSITY, self.sparsity, *self.sparsity_bounds, penalty=True)
        ]

    def fit_buffers(self, ctx, Z, y, X=None) -> Params:
        buffers = self._inner().fit_buffers(ctx, Z, y, X)
        if _BASELINE in buffers:
            raise ValueError(f"the wrapped aggregator already has a buffer {_BASELINE!r}.")
        buffers[_BASELINE] = Z.mean(0)  # (n_models, n_outputs)
        if y is None:  # no target to measure errors and losses by
            target, scale = None, Z.new_ones(())
        elif ctx.task == "classification":
            target = torch.nn.functional.one_hot(y.long(), ctx.n_outputs).to(Z.dtype)
            scale = loss_scale(ctx, Z, y)
        else:
            target = y.reshape(Z.shape[0], -1).to(Z.dtype)
            scale = loss_scale(ctx, Z, y)
        buffers[_REDUNDANCY] = redundancy(Z, self.redundancy_power, target)
        buffers[_SCALE] = scale
        return buffers

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        params = self._inner().init_params(ctx, Z, y, X)
        if _LOGITS in params:
            raise ValueError(f"the wrapped aggregator already has a parameter {_LOGITS!r}.")
        a0 = self.temperature * np.log(self.init_keep / (1 - self.init_keep))
        jitter = torch.randn(
            ctx.n_models, generator=ctx.generator, dtype=ctx.dtype, device=ctx.device
        )
        # Jitter of half a temperature: enough for duplicates to part ways.
        params[_LOGITS] = a0 + 0.5 * self.temperature * jitter
        return params

    # -- forward pass and losses --------------------------------------------------
    def forward(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        inner_p, inner_h = self._split(params, hyper)
        Zn = neutralise(Z, self._mask(params), params[_BASELINE])
        return self._inner().forward(inner_p, inner_h, Zn, X)

    def data_penalty(self, params: Params, hyper: Params, Z, X=None):
        inner_p, inner_h = self._split(params, hyper)
        s = self._mask(params)
        inner = self._inner().data_penalty(
            inner_p, inner_h, neutralise(Z, s, params[_BASELINE]), X
        )
        # Both terms read buffers, which ``penalty`` does not see; both are in
        # units of the best model's training loss (see ``loss_scale``).
        own = params[_SCALE] * (
            hyper[_SPARSITY][0] * s.sqrt().sum()
            + 0.5 * self.redundancy * (s @ params[_REDUNDANCY] @ s)
        )
        return own if inner is None else inner + own

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        inner_p, inner_h = self._split(params, hyper)
        a = params[_LOGITS]
        return self._inner().penalty(inner_p, inner_h) + 0.5 * self.keep_l2 * a.pow(2).sum()

    def route(self, params: Params, hyper: Params, X=None) -> torch.Tensor:
        """Kept models only (and, among them, what the wrapped function routes)."""
        keep = self._mask(params, hard=True) > 0
        inner_p, inner_h = self._split(params, hyper)
        need = self._inner().route(inner_p, inner_h, X)
        return keep[None, :] if need is None else need & keep[None, :]

    # -- fitted state ---------------------------------------------------------------
    def _set_fitted(self, ctx, params, buffers, hyper, specs) -> None:
        super()._set_fitted(ctx, params, buffers, hyper, specs)
        inner = clone(self._inner())
        inner_specs = inner.hyperparameters(ctx)
        inner_p = {k: v for k, v in params.items() if k not in _OWN}
        buffers = {k: v for k, v in buffers.items() if k not in _OWN}
        inner_h = {k: v for k, v in hyper.items() if k != _SPARSITY}
        inner._set_fitted(ctx, inner_p, buffers, inner_h, inner_specs)
        self.aggregator_ = inner

    @property
    def keep_probabilities_(self) -> pd.Series:
        """Relaxed keep mask at the fitted keep logits."""
        a = np.asarray(self.params_[_LOGITS])
        return pd.Series(1 / (1 + np.exp(-a / self.temperature)), index=self.model_names_,
                         name="keep")

    @property
    def selected_(self) -> pd.Series:
        """The hard subset (``True`` = kept), by model name."""
        hard = self._mask({_LOGITS: torch.as_tensor(self.params_[_LOGITS])}, hard=True)
        return pd.Series(hard.numpy() > 0, index=self.model_names_, name="selected")
