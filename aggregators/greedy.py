"""Greedy ensemble selection (Caruana et al., 2004); one round is the best single model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ._base import AggregationContext, Aggregator, Params

__all__ = ["GreedySelection"]


def greedy_counts(Z: torch.Tensor, y: torch.Tensor, n_rounds: int, classify: bool, eps: float):
    """How often each model is picked by ``n_rounds`` of greedy selection with replacement.

    Each round adds (again, if already chosen) the model whose addition gives
    the lowest training loss of the averaged outputs (log-loss of the blended
    probabilities, or squared error); ties go to the first model.
    """
    n, m, _ = Z.shape
    if classify:
        # Only the true class's probability enters the log-loss of a blend.
        target = Z[torch.arange(n, device=Z.device), :, y]  # (n, m)
    else:
        target = Z  # (n, m, outputs)
    running = torch.zeros_like(target[:, 0])
    counts = torch.zeros(m, dtype=Z.dtype, device=Z.device)
    for k in range(1, n_rounds + 1):
        cand = (running[:, None] + target) / k  # every model tried at once
        if classify:
            losses = -torch.log(cand.clamp_min(eps)).mean(0)
        else:
            losses = (cand - y[:, None, :]).pow(2).mean((0, 2))
        best = int(torch.argmin(losses))
        counts[best] += 1
        running = running + target[:, best]
    return counts


class GreedySelection(Aggregator):
    """Greedy ensemble selection with replacement: the weights are selection counts.

    Each of ``n_rounds`` rounds adds (again, if already chosen) the base model
    that lowers the training loss of the ensemble's average the most
    (Caruana et al., 2004; AutoGluon's weighted ensemble). The weights are
    the counts over ``n_rounds``; classifiers average probabilities,
    regressors predictions. ``n_rounds=1`` keeps **the best single model**
    (lowest training loss). Nothing is tuned: it has no hyperparameters and
    no trainable parameters, and its weights are computed once from the
    training rows. At predict time only the models with a positive weight
    are called (:meth:`route`).

    It is a candidate of ``aggregator="auto"``, the estimators' default;
    on small aggregation sets it is hard to beat. Sample weights do not
    enter the selection (the counts are computed from the rows alone).

    Parameters
    ----------
    n_rounds : int, default=50
        Rounds of selection; ``1`` is the best single model.
    eps : float, default=1e-6
        Probabilities are clipped to ``[eps, 1]`` before the logarithm.

    Attributes
    ----------
    weights_ : Series
        (Fitted copies) the weight of each base model, summing to one.

    References
    ----------
    R. Caruana, A. Niculescu-Mizil, G. Crew, A. Ksikes, "Ensemble selection
    from libraries of models", ICML 2004.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.naive_bayes import GaussianNB
    >>> from aggregators import AggregatedClassifier, GreedySelection
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = AggregatedClassifier(
    ...     [("lr", LogisticRegression(max_iter=500)), ("nb", GaussianNB())],
    ...     aggregator=GreedySelection(n_rounds=1), random_state=0).fit(X, y)
    >>> float(clf.aggregator_.weights_.max())
    1.0
    """

    short_name = "greedy"
    # A loss with ties and jumps in the counts: nothing for Newton steps.
    smooth = False
    second_order = False

    def __init__(self, n_rounds: int = 50, eps: float = 1e-6):
        self.n_rounds = n_rounds
        self.eps = eps

    def check_task(self, ctx: AggregationContext) -> None:
        if not isinstance(self.n_rounds, (int, np.integer)) or isinstance(self.n_rounds, bool) \
                or self.n_rounds < 1:
            raise ValueError(f"n_rounds must be an integer >= 1; got {self.n_rounds!r}.")

    def fit_buffers(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        counts = greedy_counts(Z, y, int(self.n_rounds), ctx.task == "classification", self.eps)
        return {"weights": counts / counts.sum()}

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        return {}

    def forward(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        w = params["weights"]
        mix = torch.einsum("nmk,m->nk", Z, w)
        return torch.log(mix.clamp_min(self.eps)) if self._classifier else mix

    def route(self, params: Params, hyper: Params, X=None) -> torch.Tensor:
        return (params["weights"] > 0)[None, :]

    @property
    def weights_(self) -> pd.Series:
        """Fitted weight of each base model (selection counts over ``n_rounds``)."""
        self._check_fitted()
        w = np.asarray(self.buffers_["weights"], dtype=np.float64)
        return pd.Series(w, index=self.model_names_, name="weight")
