"""Learned convex weights over the base models (softmax parametrisation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ._base import AggregationContext, Aggregator, Hyperparameter, Params

__all__ = ["LearnedWeights"]


class LearnedWeights(Aggregator):
    """A convex combination of the base models, ``w = softmax(a)``.

    Classifiers pool probabilities linearly (``pool="linear"``,
    ``p = sum_m w_m p_m``) or geometrically (``pool="log"``,
    ``log p = sum_m w_m log p_m + const``), then apply an output temperature
    ``T``: class log-scores are ``log(p) / T``. Regressors average the
    models' predictions with the weights. Weights can be shared (``"global"``)
    or learned per class / per target (``"per_output"``).

    Hyperparameters tuned by hypergradient: ``temperature`` (classifiers)
    and ``l2`` on the logits ``a`` (pulls towards the uniform average).
    ``entropy``, a penalty on the weights' entropy (pulls towards selecting
    few models, as greedy ensemble selection does), is held at its value
    unless the estimator's ``hyperparams`` or ``tune_ranges`` name it (e.g.
    ``tune_ranges={"entropy": (1e-6, 1.0, "log")}``).

    Parameters
    ----------
    per : {"global", "per_output"}, default="global"
        One weight vector, or one per class / target.
    pool : {"linear", "log"}, default="linear"
        How class probabilities are combined.
    temperature : float, default=1.0
        Initial output temperature.
    l2 : float, default=1e-3
        Initial L2 weight on the softmax logits.
    entropy : float, default=1e-4
        Weight of the entropy penalty (held; the start when tuned).
    eps : float, default=1e-6
        Probabilities are clipped to ``[eps, 1]`` before the logarithm.
    temperature_bounds : tuple of float, default=(0.5, 2.0)
        Range the temperature is tuned in. Wider ranges let a small
        validation set sharpen the ensemble into confident test errors: the
        few validation rows reward a sharper ensemble more than the test
        rows it has not seen.

    Examples
    --------
    >>> from aggregators import AggregatedClassifier, LearnedWeights
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.naive_bayes import GaussianNB
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = AggregatedClassifier(
    ...     [("lr", LogisticRegression(max_iter=500)), ("nb", GaussianNB())],
    ...     aggregator=LearnedWeights(), random_state=0).fit(X, y)
    >>> round(float(clf.aggregator_.weights_.sum()), 6)
    1.0
    """

    short_name = "weights"
    #: :mod:`._analytic` has the derivatives of its loss in the logits in closed form.
    convex_mixture = True
    #: The shared stage and its budget of 8 outer evaluations (``SHARED_BUDGET``
    #: in :mod:`.hypergrad._tuner`; ``Stacking`` keeps 6 of them): on a
    #: flat validation loss (a small ``l2`` that no longer matters) an
    #: unbudgeted L-BFGS-B keeps wandering without finding a better fit.
    shared_stage = True
    #: Hyperparameters tuned by default; the others are held at their value
    #: unless the estimator's ``hyperparams`` or ``tune_ranges`` name them.
    #: The entropy penalty barely moves the tuned loss (greedy-like sparsity
    #: is rarely what the validation rows reward), and each tuned entry costs
    #: outer evaluations; the temperature does matter.
    tuned_by_default: tuple = ("temperature", "l2")

    def __init__(
        self,
        per: str = "global",
        pool: str = "linear",
        temperature: float = 1.0,
        l2: float = 1e-3,
        entropy: float = 1e-4,
        eps: float = 1e-6,
        temperature_bounds: tuple = (0.5, 2.0),
    ):
        self.per = per
        self.pool = pool
        self.temperature = temperature
        self.l2 = l2
        self.entropy = entropy
        self.eps = eps
        self.temperature_bounds = temperature_bounds

    def check_task(self, ctx: AggregationContext) -> None:
        if self.per not in ("global", "per_output"):
            raise ValueError(f"per must be 'global' or 'per_output'; got {self.per!r}.")
        if self.pool not in ("linear", "log"):
            raise ValueError(f"pool must be 'linear' or 'log'; got {self.pool!r}.")

    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        hp = [
            self._declared("l2", self.l2, 1e-6, 1e2, penalty=True),
            self._declared("entropy", self.entropy, 1e-6, 1.0, penalty=True),
        ]
        if ctx.task == "classification":
            lo, hi = self.temperature_bounds
            hp.insert(0, self._declared("temperature", self.temperature, lo, hi))
        return hp

    def _declared(
        self, name: str, value, low: float, high: float, penalty: bool = False
    ) -> Hyperparameter:
        if name in self.tuned_by_default:
            return Hyperparameter(name, value, low, high, penalty=penalty)
        return Hyperparameter.held(name, value, (low, high), penalty=penalty)

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        shape = (ctx.n_models,) if self.per == "global" else (ctx.n_models, ctx.n_outputs)
        return {"logits": ctx.zeros(*shape)}  # uniform weights

    @staticmethod
    def _weights(params: Params) -> torch.Tensor:
        w = torch.softmax(params["logits"], dim=0)
        return w if w.dim() == 2 else w[:, None]  # (m, outputs or 1)

    @staticmethod
    def _mix(Z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``sum_m w_m Z[:, m]``: a contraction, not a broadcast product and a sum.

        The product's backward reduces a ``(rows, models, outputs)`` tensor
        over its first and last axes, and Newton's Hessian does so once per
        probe; a contraction's backward is two matrix products, several
        times cheaper, the more so the more rows.
        """
        if w.shape[1] == 1:
            return torch.einsum("nmk,m->nk", Z, w[:, 0])
        return torch.einsum("nmk,mk->nk", Z, w)

    def forward(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        w = self._weights(params)
        if not self._classifier:
            return self._mix(Z, w)
        if self.pool == "linear":
            p = self._mix(Z, w)
            if self.per == "per_output":
                p = p / p.sum(1, keepdim=True)
            logp = torch.log(p.clamp_min(self.eps))
        else:
            logp = self._mix(torch.log(Z.clamp_min(self.eps)), w)
        return logp / hyper["temperature"][0]

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        a = params["logits"]
        w = torch.softmax(a, dim=0)
        ent = -(w * torch.log(w.clamp_min(1e-300))).sum(0).mean()
        return 0.5 * hyper["l2"][0] * a.pow(2).sum() + hyper["entropy"][0] * ent

    @property
    def weights_(self) -> pd.Series | pd.DataFrame:
        """Fitted weights: a Series by model, or a DataFrame models x outputs."""
        a = np.asarray(self.params_["logits"])
        w = np.exp(a - a.max(0))
        w = w / w.sum(0)
        if w.ndim == 1:
            return pd.Series(w, index=self.model_names_, name="weight")
        cols = list(self.classes_) if self.classes_ is not None else list(range(w.shape[1]))
        return pd.DataFrame(w, index=self.model_names_, columns=cols)
