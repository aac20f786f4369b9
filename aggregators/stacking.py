"""Stacking: a linear meta-learner over the base outputs, one L2 per base model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ._base import (
    AggregationContext,
    Aggregator,
    Hyperparameter,
    Params,
    l2_bounds_for,
    l2_limits_for,
)

__all__ = ["Stacking"]


class Stacking(Aggregator):
    """Multinomial-logistic (classifier) or linear (regressor) meta-learner.

    For classifiers the features are the base models' probabilities (or
    their clipped logarithms), ``n_models * n_classes`` columns, mapped to
    class logits; for regressors, each target is a linear function of the base
    models' predictions of that target plus an intercept. Each base model's
    block of coefficients has its own L2 weight, so the tuner can shrink an
    unhelpful model away, which a grid over one ``C`` cannot.

    For classifiers the L2 penalty pulls each block ``coef_m`` (``n_classes x
    n_classes``) towards a scaled identity ``s_m I`` rather than towards zero
    (``shrink_towards="pool"``): ``0.5 * l2_m * ||coef_m - s_m I||^2 + 0.5 *
    l2_scale * n_classes * ||s||^2``, minimised over the scales ``s`` too. A
    large ``l2_m`` then leaves model ``m`` in the weighted pool
    ``sum_m s_m f_m`` (its feature of class ``k`` feeding class ``k``'s
    logit), not out of the ensemble; a small one gives it a full block, as
    in plain stacking. The scales are minimised out in closed form: with
    ``a_m`` the mean of the block's diagonal, the penalty is
    ``0.5 * l2_m * ||coef_m - a_m I||^2 + 0.5 * n_classes * a_m^2 *
    l2_m * l2_scale / (l2_m + l2_scale)``, and ``s_m = a_m * l2_m /
    (l2_m + l2_scale)``.

    Parameters
    ----------
    l2 : float or array-like of shape (n_models,), default=1e-2
        Initial (or, when not tuned, fixed) L2 weight per base model, on the
        mean training loss.
    passthrough : bool, default=False
        Also feed the standardised input features to the meta-learner, with
        their own L2 weight ``l2_passthrough``.
    l2_passthrough : float, default=1e-1
        Initial L2 weight of the passthrough coefficients.
    eps : float, default=1e-4
        Probabilities are clipped to ``[eps, 1]`` before the logarithm.
    l2_bounds : tuple of float or None, default=None
        Range the L2 weights (and ``l2_scale``) are tuned in (log scale).
        ``None``: ``(0.1 / n_train, 100)`` with ``n_train`` the rows each
        inner problem is fitted on (``(1e-3, 100)`` when that is unknown).
        The weights act on the mean training loss, so weight ``l2`` is
        ``LogisticRegression``'s ``C = 1 / (l2 * n_train)`` (which acts on
        the summed loss): this floor allows ``C <= 10`` whether there are 50
        rows or 50 000. A fixed floor cannot serve both: one low enough for
        weak regularisation on large sets lets the tuner overfit small ones,
        and one safe for small sets binds the tuned weights on large ones.
        That floor bounds the tuning only: a weight given (here, fixed through
        ``hyperparams``, or a range to tune in) may lie anywhere in ``(0, 100]``,
        and a tuned one given below the floor starts at the floor. Given
        ``l2_bounds``, every weight must lie within them; a value outside is an
        error at ``fit``, never clipped.
    features : {"proba", "log_proba"}, default="proba"
        Meta-features of classifiers. Probabilities are bounded, so one
        confidently wrong base model cannot produce an extreme logit; on
        small aggregation sets (tens of rows) log-probabilities let the tuned
        meta-learner overfit badly.
    per_model_l2 : bool, default=True
        One L2 weight per base model (a hyperparameter vector); ``False``
        shares one weight across all models, as ``LogisticRegression(C)`` does
        (exactly so with ``shrink_towards="zero"``).
    shrink_towards : {"pool", "zero"}, default="pool"
        Target of the classifiers' L2 penalty: the scaled identity
        ``s_m I`` described above, or zero (the class prior, as
        ``LogisticRegression`` does). Shrinking towards a weighted pool of
        the models rather than towards the prior keeps what the base models
        already agree on, which a strong L2 would otherwise erase; the price
        is a slower tuning (the identity direction is less regularised). The
        scales are penalised too (``l2_scale``): left free they can grow
        without bound and overfit. Regressors' coefficients are always
        shrunk towards zero.
    l2_scale : float, default=1e-2
        Initial L2 weight of the pool's scales ``s`` (tuned in
        ``l2_bounds``); only with ``shrink_towards="pool"`` for classifiers.

    Attributes
    ----------
    coef_ : DataFrame
        Fitted coefficients (after fitting, on ``aggregator_``).
    scale_ : Series
        Scales ``s_m`` of the pool the blocks are shrunk towards (classifiers
        with ``shrink_towards="pool"``).

    Examples
    --------
    >>> from aggregators import AggregatedClassifier, Stacking
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.naive_bayes import GaussianNB
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = AggregatedClassifier(
    ...     [("lr", LogisticRegression(max_iter=500)), ("nb", GaussianNB())],
    ...     aggregator=Stacking(), random_state=0).fit(X, y)
    >>> sorted(clf.hyperparams_)
    ['l2', 'l2_scale']
    """

    short_name = "stacking"
    #: The tuner first moves every L2 weight together (their common level
    #: matters most), then refines them one by one, in few evaluations.
    shared_stage = True
    #: Outer evaluations (see ``Aggregator.outer_budget``): the shared stage's
    #: (at most 4) and two of L-BFGS-B's per-model refinement. The two more
    #: that the shared stage's budget of 8 allowed lowered the validation
    #: loss a little but not the test loss, on the benchmark datasets.
    outer_budget = 6
    #: HOAG's tolerance schedule (``eps0`` and ``decay`` of
    #: :func:`~aggregators.hypergrad.hoag_tolerance`, used where
    #: ``tuner_options`` gives none, with exact cross-fitting; approximate
    #: cross-validation keeps the engine's) on the inner gradient:
    #: ``1e-4 * (k + 1) ** -1.01`` at outer evaluation ``k``, against the
    #: engine's ``1e-4 * (k + 1) ** -2``. The inner problem is smooth and
    #: strongly convex: the later evaluations' looser solves move the
    #: validation loss little, while each tolerance step costs L-BFGS
    #: iterations in every evaluation. The first evaluation (all an untuned
    #: fit makes) keeps the engine's tolerance: a looser one moved untuned
    #: validation losses by more than ``tests/test_no_stall.py`` and
    #: ``tests/test_cv_mode.py`` allow, most where the loss is near zero.
    hoag_eps0 = 1e-4
    hoag_decay = 1.01
    #: Floor of the relative residual of the hypergradient's linear solve
    #: (HOAG's ``min_tol``): the hypergradient steers an outer search of a
    #: few evaluations, for which a thousandth of its size is precision
    #: enough, and the last conjugate-gradient iterations to the schedule's
    #: tolerance cost more than the inner solve's. The outer values, on which
    #: the best point is chosen, keep the inner solve's schedule.
    hoag_min_tol = 1e-3

    def __init__(
        self,
        l2=1e-2,
        *,
        passthrough: bool = False,
        l2_passthrough: float = 1e-1,
        eps: float = 1e-4,
        l2_bounds: tuple | None = None,
        features: str = "proba",
        per_model_l2: bool = True,
        shrink_towards: str = "pool",
        l2_scale: float = 1e-2,
    ):
        self.l2 = l2
        self.passthrough = passthrough
        self.l2_passthrough = l2_passthrough
        self.eps = eps
        self.l2_bounds = l2_bounds
        self.features = features
        self.per_model_l2 = per_model_l2
        self.shrink_towards = shrink_towards
        self.l2_scale = l2_scale

    @property
    def uses_X(self) -> bool:  # type: ignore[override]
        return bool(self.passthrough)

    def _pools(self, ctx: AggregationContext) -> bool:
        return self.shrink_towards == "pool" and ctx.task == "classification"

    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        low, high = l2_bounds_for(ctx, self.l2_bounds)
        limits = l2_limits_for(self.l2_bounds)
        hp = [
            Hyperparameter(
                "l2", self.l2, low, high, log=True, size=ctx.n_models,
                labels=tuple(ctx.model_names), limits=limits, penalty=True,
            )
            if self.per_model_l2
            else Hyperparameter("l2", self.l2, low, high, log=True, limits=limits, penalty=True)
        ]
        if self._pools(ctx):
            hp.append(Hyperparameter(
                "l2_scale", self.l2_scale, low, high, limits=limits, penalty=True
            ))
        if self.passthrough:
            hp.append(
                Hyperparameter("l2_passthrough", self.l2_passthrough, low, high, limits=limits,
                               penalty=True)
            )
        return hp

    def fit_buffers(self, ctx, Z, y, X=None) -> Params:
        if not self.passthrough:
            return {}
        mean = X.mean(0)
        std = X.std(0)
        return {"x_mean": mean, "x_scale": torch.where(std > 0, std, torch.ones_like(std))}

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        m, c = ctx.n_models, ctx.n_outputs
        if ctx.task == "classification":
            # Start at the average of the base models' features.
            eye = torch.eye(c, device=ctx.device, dtype=ctx.dtype)
            coef = (eye / m).repeat(m, 1, 1)  # (m, c_in, c_out)
        else:
            coef = ctx.full((m, c), 1.0 / m)  # (m, targets)
        params = {"coef": coef, "intercept": ctx.zeros(c)}
        if self.passthrough:
            params["coef_x"] = ctx.zeros(ctx.n_features, c)
        return params

    def check_task(self, ctx: AggregationContext) -> None:
        if self.shrink_towards not in ("pool", "zero"):
            raise ValueError(
                f"shrink_towards must be 'pool' or 'zero'; got {self.shrink_towards!r}."
            )
        if self.features not in ("proba", "log_proba"):
            raise ValueError(
                f"features must be 'proba' or 'log_proba'; got {self.features!r}."
            )

    def _features(self, Z: torch.Tensor) -> torch.Tensor:
        if self.features == "proba":
            return Z
        return torch.log(Z.clamp_min(self.eps))

    def forward(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        coef = params["coef"]
        if self._classifier:  # (n, m, c_in) x (m, c_in, c_out)
            # One matrix product over the (model, class) columns: what the
            # einsum "nmi,mio->no" computes, without the einsum's reshuffling
            # of its operands on every call.
            m, ci, co = coef.shape
            out = self._features(Z).reshape(Z.shape[0], m * ci) @ coef.reshape(m * ci, co)
        else:  # regression: each target from the models' predictions of it
            out = torch.einsum("nmt,mt->nt", Z, coef)
        out = out + params["intercept"]
        if self.passthrough:
            xs = (X - params["x_mean"]) / params["x_scale"]
            out = out + xs @ params["coef_x"]
        return out

    def linear_design(self, buffers: Params, Z, X=None) -> torch.Tensor | None:
        # Rows of theta in the packer's order: coef (m * c_in rows for a
        # classifier), intercept, then coef_x.
        n = Z.shape[0]
        if self._classifier:
            cols = [self._features(Z).reshape(n, -1)]
        elif Z.shape[2] == 1:
            cols = [Z[:, :, 0]]
        else:  # each target has its own coefficients: not one design for all outputs
            return None
        cols.append(Z.new_ones(n, 1))
        if self.passthrough:
            cols.append((X - buffers["x_mean"]) / buffers["x_scale"])
        return torch.cat(cols, 1)

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        coef = params["coef"]
        l2 = hyper["l2"]
        pen = coef.new_zeros(())
        if "l2_scale" in hyper:  # classifiers shrunk towards the pool s_m I
            # The scales minimised out in closed form: the identity part of
            # each block (its mean diagonal a_m) is penalised with the series
            # combination of l2_m and l2_scale, the rest with l2_m.
            c = coef.shape[1]
            mean_diag = coef.diagonal(dim1=1, dim2=2).mean(1)
            eye = torch.eye(c, device=coef.device, dtype=coef.dtype)
            coef = coef - mean_diag[:, None, None] * eye
            series = l2 * hyper["l2_scale"][0] / (l2 + hyper["l2_scale"][0])
            pen = 0.5 * c * (series * mean_diag.pow(2)).sum()
        per_model = coef.reshape(coef.shape[0], -1).pow(2).sum(1)
        pen = pen + 0.5 * (l2 * per_model).sum()
        if self.passthrough:
            pen = pen + 0.5 * hyper["l2_passthrough"][0] * params["coef_x"].pow(2).sum()
        return pen

    # -- readable views of the fitted state ---------------------------------------
    @property
    def coef_(self) -> pd.DataFrame:
        """Fitted coefficients, one row per (base model, input column)."""
        coef = np.asarray(self.params_["coef"])
        names = self.model_names_
        if self.task_ == "classification":
            m, ci, co = coef.shape
            cls = list(self.classes_) if self.classes_ is not None else list(range(ci))
            index = pd.MultiIndex.from_product([names, cls], names=["model", "input"])
            return pd.DataFrame(coef.reshape(m * ci, co), index=index, columns=cls)
        return pd.DataFrame(coef, index=pd.Index(names, name="model"))

    @property
    def scale_(self) -> pd.Series:
        """Scales ``s_m`` of the pool the classifier's blocks are shrunk towards."""
        if "l2_scale" not in self._hyper_vectors_:
            raise AttributeError(
                "scale_ exists only for classifiers with shrink_towards='pool'."
            )
        coef = np.asarray(self.params_["coef"])
        mean_diag = np.diagonal(coef, axis1=1, axis2=2).mean(1)
        l2 = np.broadcast_to(self._hyper_vectors_["l2"], mean_diag.shape)
        l2_scale = self._hyper_vectors_["l2_scale"][0]
        scale = mean_diag * l2 / (l2 + l2_scale)
        return pd.Series(scale, index=self.model_names_, name="scale")

    @property
    def model_importance_(self) -> pd.Series:
        """Norm of each base model's coefficient block."""
        coef = np.asarray(self.params_["coef"])
        norms = np.sqrt((coef.reshape(coef.shape[0], -1) ** 2).sum(1))
        return pd.Series(norms, index=self.model_names_, name="coef_norm")
