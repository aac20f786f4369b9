"""Sparse mixture-of-experts gating over the base models (Shazeer et al. 2017).

A gating network on the input features weights the base models per row;
at predict time each row keeps only its ``k`` best experts, so with the
estimator's sparse inference each base model is called only on the rows
routed to it.

The functions at the top of the module are the formulas of Shazeer et al.
(2017) as written (section 2.1 and appendix A): noisy logits ``H``,
``KeepTopK`` + softmax, ``CV^2`` with the population variance, and the
smooth load estimator ``P(x, i)`` with ``kth_excluding``;
:func:`smooth_kth_excluding` is the smooth order statistic the training
relaxation uses in its place.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ._base import AggregationContext, Aggregator, Hyperparameter, Params

__all__ = [
    "SparseMoE",
    "cv_squared",
    "keep_top_k_softmax",
    "kth_excluding",
    "load_probability",
    "noisy_logits",
    "smooth_kth_excluding",
    "top_k_mask",
]


# -- the formulas ----------------------------------------------------------------
def noisy_logits(
    clean: torch.Tensor, noise_std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``H = clean + eps * noise_std`` with ``eps ~ N(0, 1)`` drawn from ``generator``."""
    eps = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=clean.device)
    return clean + eps * noise_std


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``(n, m)`` mask of the ``k`` largest logits of each row (ties: lowest index)."""
    idx = logits.topk(k, dim=1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)


def keep_top_k_softmax(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``softmax(KeepTopK(logits, k))``: the others get exactly 0."""
    masked = logits.masked_fill(~top_k_mask(logits, k), float("-inf"))
    return torch.softmax(masked, dim=1)


def kth_excluding(H: torch.Tensor, k: int) -> torch.Tensor:
    """For each row and expert ``i``, the ``k``-th largest of ``H`` over the other experts.

    Where fewer than ``k`` other experts exist (``k >= m``) the value is
    ``-inf``: expert ``i`` is then always in the top ``k``.
    """
    m = H.shape[1]
    if k >= m:
        return torch.full_like(H, float("-inf"))
    vals = H.topk(k + 1, dim=1).values  # (n, k + 1), descending
    in_top = top_k_mask(H, k)
    # Expert i among the top k: the k-th of the others is the (k+1)-th overall.
    return torch.where(in_top, vals[:, k : k + 1], vals[:, k - 1 : k])


def smooth_kth_excluding(H: torch.Tensor, k: int, tau: torch.Tensor) -> torch.Tensor:
    """A smooth :func:`kth_excluding`: ``S_k - S_{k-1}`` of the others' values.

    The sum of the ``j`` largest of values ``a`` is the maximum, over sets of
    ``j`` of them, of their sum; its soft maximum at scale ``tau`` is
    ``S_j = tau * log e_j(exp(a / tau))``, with ``e_j`` the elementary
    symmetric polynomial of degree ``j`` (computed by its recursion). The ``k``-th largest is the difference of the sums of the ``k``
    and of the ``k - 1`` largest, hence ``S_k - S_{k-1}``: an analytic function
    of ``H`` that tends to :func:`kth_excluding` as ``tau -> 0`` (the error
    is at most ``tau * log C(m - 1, k)`` or so where values tie, and vanishes
    where they are far apart).

    Parameters
    ----------
    H : Tensor of shape (n, m)
    k : int
        ``1 <= k < m``.
    tau : Tensor
        Positive scale, broadcastable to ``(n, m)`` (one per row and excluded expert).

    Returns
    -------
    Tensor of shape (n, m)
    """
    n, m = H.shape
    if not 1 <= k < m:
        raise ValueError(f"k must be between 1 and m - 1 = {m - 1}; got k={k!r}.")
    tau = torch.as_tensor(tau, dtype=H.dtype, device=H.device).expand(n, m)
    # The others of each expert in decreasing order, gathered from H in one
    # differentiable step: the order comes from one sort of each row (no
    # autograd), the others of expert i being that order without i's rank.
    with torch.no_grad():
        order = H.argsort(dim=1, descending=True)  # (n, m)
        rank = order.argsort(dim=1)
        positions = _others(m, H.device)[rank]  # (n, excluded i, m - 1 ranks)
        idx = order.gather(1, positions.reshape(n, -1))
    a = H.gather(1, idx).reshape(n, m, m - 1) / tau[:, :, None]
    # e_d by its recursion e_d <- e_d + x e_{d-1} over the others in
    # decreasing order, each e_d divided by exp(sum of the d largest): every
    # scaled e_d is then at least 1 and each factor at most 1, so nothing
    # overflows nor takes the log of 0, and products and sums cost far less to
    # differentiate twice than a recursion in log space. e_d is symmetric in
    # its arguments, so the order adds no kink. The columns are unbound once:
    # each indexing of a column would cost its own zero-filled gradient.
    cols = a.unbind(2)
    e = [torch.ones_like(cols[0])]
    for t in range(m - 1):
        grown = list(e)
        if len(e) <= k:
            grown.append(e[-1])  # the product of the t + 1 largest, scaled: 1 x e_t
        for d in range(min(t, k), 0, -1):
            grown[d] = e[d] + torch.exp(cols[t] - cols[d - 1]) * e[d - 1]
        e = grown
    return tau * (cols[k - 1] + torch.log(e[k]) - torch.log(e[k - 1]))


def _others(m: int, device) -> torch.Tensor:
    """``(m, m - 1)`` indices: row ``i`` lists the experts other than ``i``."""
    key = (m, str(device))
    if key not in _OTHERS:
        _OTHERS[key] = torch.tensor(
            [[j for j in range(m) if j != i] for i in range(m)], device=device
        )
    return _OTHERS[key]


_OTHERS: dict = {}


def load_probability(
    clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, k: int
) -> torch.Tensor:
    """Shazeer's smooth load estimator ``P(x, i)``.

    ``P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i)``: the
    probability that expert ``i`` is among the top ``k`` of ``H`` when only
    its own noise is drawn again.
    """
    z = (clean - kth_excluding(noisy, k)) / noise_std
    return torch.special.ndtr(z)


def cv_squared(v: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` (population variance)."""
    return v.var(unbiased=False) / (v.mean().pow(2) + eps)


# -- the aggregation function ---------------------------------------------------
class SparseMoE(Aggregator):
    """Sparse mixture of experts: an input-dependent gate keeps ``k`` base models per row.

    The gate maps the standardised input features (optionally also cheap
    summaries of the base outputs) to clean logits ``c = f W_g + b`` and noise
    scales ``s = noise_scale * softplus(f W_noise)``; ``W_g`` and ``W_noise``
    start at zero (uniform gate), and ``W_noise`` stays there unless
    ``learn_noise=True``. A row's aggregate is the gate-weighted
    mixture of the base models' class probabilities (classifiers) or
    standardised predictions (regressors).

    **Predict (exact):** the top ``k`` of the clean logits are kept and
    weighted by ``softmax(c / temperature)`` over those ``k``; the other
    experts get exactly zero weight and, with the estimator's sparse
    inference, are not even called on that row (see :meth:`route`).

    **Training (deterministic relaxation):** each expert's weight is
    ``softmax(c / temperature + log P)``, where ``P(x, i)`` is Shazeer's
    smooth load estimator evaluated at the noise-free logits: the
    probability that expert ``i`` would enter the top ``k`` if its own noise
    were drawn, with the ``k``-th largest of the other logits taken smoothly
    at the noise's scale (:func:`smooth_kth_excluding`; the hard one has a
    kink wherever two experts swap ranks, at which the inner solves stall).
    As the noise scale goes to zero this is exactly the
    predict-time gate. We use this expectation instead of sampling the
    noise because the hypergradient engine differentiates the *optimum* of
    the training loss (implicit function theorem): that needs a fixed,
    smooth objective, which sampled noise and a hard ``KeepTopK`` (a
    discontinuous function of the gate weights) are not.

    The training loss adds Shazeer's auxiliary losses with one weight
    ``w = load_weight``: ``w * CV(Importance)^2 + w * CV(Load)^2`` with
    ``Importance_i = sum_x G_i(x)``, ``Load_i = sum_x P(x, i)`` over the
    training rows, and ``CV^2`` the population variance over the squared
    mean.

    Hyperparameters: ``gate_l2`` (L2 on every gate weight), tuned by
    hypergradient; ``load_weight``, ``noise_scale`` and ``temperature``, held
    at their values unless given a range (``*_bounds`` here, or the
    estimator's ``tune_ranges``). The temperature only rescales the gate
    weights, whose scale ``gate_l2`` already sets; the balancing losses push
    rows towards weaker models, which an ensemble of a few pretrained models
    rarely gains from; and each tuned hyperparameter costs outer steps, each
    of them an inner fit per fold. The tuning takes at most 3 outer
    evaluations (``outer_budget``; ``2 * max_outer_iter`` if fewer).

    Parameters
    ----------
    k : int, default=2
        Experts kept per row at predict time (``1 <= k <= n_models``;
        ``k = n_models`` is a dense softmax gate).
    gate : {"linear", "mlp"}, default="linear"
        Linear gate, or one hidden ``tanh`` layer of ``hidden`` units
        (randomly initialised from the estimator's ``random_state``) below
        the linear gate.
    hidden : int, default=16
        Hidden units of the ``"mlp"`` gate.
    gate_inputs : {"X", "X+outputs"}, default="X"
        What the gate reads. ``"X+outputs"`` also feeds each base model's
        confidence (its largest class probability; for regressors, its
        prediction), which needs every base model on every row: the predict
        path is then dense.
    temperature : float, default=1.0
        Gate temperature (``c / temperature`` inside the softmax).
    gate_l2 : float, default=1.0
        Initial L2 weight on the gate weights (on the mean training loss).
    load_weight : float, default=1e-3
        Initial weight of the importance and load-balancing losses.
    noise_scale : float, default=0.5
        Initial multiplier of the noise standard deviation
        ``softplus(f W_noise)``; it also sets how soft the training
        relaxation is.
    gate_l2_bounds : tuple of float, default=(1e-3, 100.0)
        Range ``gate_l2`` is tuned in (log scale). Its floor keeps the inner
        problem well conditioned: with a weak L2 the gate sharpens and the
        inner solves run into their iteration bound.
    temperature_bounds, load_weight_bounds, noise_scale_bounds : tuple of float or None, \
default=None
        Ranges to tune these in (log scale); ``None`` holds each at its value.
        Values given, held or as range ends, must lie in ``[0.1, 4]``,
        ``[1e-4, 1]`` and ``[0.05, 1]``. The noise scale is capped at 1 so
        that the relaxation the gate is trained with stays close to the exact
        top-k it predicts with.
    learn_noise : bool, default=False
        Train ``W_noise`` with the gate. Off by default: in the deterministic
        relaxation ``W_noise`` only sets a per-row softness, which makes the
        inner problem ill-conditioned (L-BFGS may not reach its tolerance)
        without helping the gate; ``noise_scale`` is tuned either way.
    bias_l2 : float, default=1e-2
        L2 weight on the gate's biases ``b`` (fixed, on the mean training
        loss). Without it the mixture weight of a model that the training
        rows find useless tends to 0 and its bias to ``-inf``: the training
        loss has no minimum, and every inner solve runs to its iteration
        bound. ``0`` leaves the biases free.
    eps : float, default=1e-6
        Mixture probabilities are clipped to ``[eps, 1]`` before the logarithm.

    Attributes
    ----------
    gate_coef_ : DataFrame
        Fitted gate weights ``W_g`` (gate features x models), after fitting.

    See Also
    --------
    ModelSelection : learn which base models to keep at all.

    References
    ----------
    N. Shazeer et al., "Outrageously large neural networks: the sparsely-gated
    mixture-of-experts layer", ICLR 2017.

    Examples
    --------
    >>> from aggregators import AggregatedClassifier, SparseMoE
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.naive_bayes import GaussianNB
    >>> from sklearn.tree import DecisionTreeClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = AggregatedClassifier(
    ...     [("lr", LogisticRegression(max_iter=500)), ("nb", GaussianNB()),
    ...      ("tree", DecisionTreeClassifier(max_depth=2, random_state=0))],
    ...     aggregator=SparseMoE(k=1), max_outer_iter=3, random_state=0).fit(X, y)
    >>> proba = clf.predict_proba(X[:10])
    >>> int(clf.last_routing_.sum())  # one base-model call per row
    10
    """

    short_name = "moe"
    uses_X = True
    # The training relaxation uses smooth_kth_excluding, analytic in the
    # logits (Shazeer's kth_excluding is piecewise linear).
    smooth = True
    #: Outer evaluations (see ``Aggregator.outer_budget``). Each is an L-BFGS
    #: inner solve of the gate and a conjugate-gradient hypergradient, and one
    #: hyperparameter (``gate_l2``) is tuned by default, which L-BFGS-B's first
    #: few evaluations bring close to its best; each further one is dear.
    outer_budget = 3

    def __init__(
        self,
        k: int = 2,
        gate: str = "linear",
        *,
        hidden: int = 16,
        gate_inputs: str = "X",
        temperature: float = 1.0,
        gate_l2: float = 1.0,
        load_weight: float = 1e-3,
        noise_scale: float = 0.5,
        temperature_bounds: tuple | None = None,
        gate_l2_bounds: tuple = (1e-3, 100.0),
        load_weight_bounds: tuple | None = None,
        noise_scale_bounds: tuple | None = None,
        learn_noise: bool = False,
        bias_l2: float = 1e-2,
        eps: float = 1e-6,
    ):
        self.k = k
        self.gate = gate
        self.hidden = hidden
        self.gate_inputs = gate_inputs
        self.temperature = temperature
        self.gate_l2 = gate_l2
        self.load_weight = load_weight
        self.noise_scale = noise_scale
        self.temperature_bounds = temperature_bounds
        self.gate_l2_bounds = gate_l2_bounds
        self.load_weight_bounds = load_weight_bounds
        self.noise_scale_bounds = noise_scale_bounds
        self.learn_noise = learn_noise
        self.bias_l2 = bias_l2
        self.eps = eps

    # -- declaration ------------------------------------------------------------
    def check_task(self, ctx: AggregationContext) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, Integral):
            raise TypeError(f"k must be an int; got {type(self.k).__name__} ({self.k!r}).")
        if not 1 <= self.k <= ctx.n_models:
            raise ValueError(
                f"k must be between 1 and the number of base models ({ctx.n_models}); "
                f"got k={self.k!r}."
            )
        if isinstance(self.bias_l2, bool) or not isinstance(self.bias_l2, Real) or not (
            np.isfinite(self.bias_l2) and self.bias_l2 >= 0
        ):
            raise ValueError(f"bias_l2 must be a finite number >= 0; got {self.bias_l2!r}.")
        if self.gate not in ("linear", "mlp"):
            raise ValueError(f"gate must be 'linear' or 'mlp'; got {self.gate!r}.")
        if self.gate_inputs not in ("X", "X+outputs"):
            raise ValueError(f"gate_inputs must be 'X' or 'X+outputs'; got {self.gate_inputs!r}.")
        if self.gate == "mlp" and (
            isinstance(self.hidden, bool) or not isinstance(self.hidden, Integral) or self.hidden < 1
        ):
            raise ValueError(f"hidden must be a positive int; got {self.hidden!r}.")

    def hyperparameters(self, ctx: AggregationContext) -> list[Hyperparameter]:
        return [
            Hyperparameter("gate_l2", self.gate_l2, *self.gate_l2_bounds, penalty=True),
            _held_unless_ranged("load_weight", self.load_weight, self.load_weight_bounds,
                                LOAD_WEIGHT_LIMITS),
            _held_unless_ranged("noise_scale", self.noise_scale, self.noise_scale_bounds,
                                NOISE_SCALE_LIMITS),
            _held_unless_ranged("temperature", self.temperature, self.temperature_bounds,
                                TEMPERATURE_LIMITS),
        ]

    def fit_buffers(self, ctx, Z, y, X=None) -> Params:
        buf = {"x_mean": X.mean(0), "x_scale": _safe_std(X)}
        if self.gate_inputs == "X+outputs":
            s = self._summary(Z)
            buf.update(s_mean=s.mean(0), s_scale=_safe_std(s))
        return buf

    def init_params(self, ctx: AggregationContext, Z, y, X=None) -> Params:
        d = ctx.n_features + (ctx.n_models if self.gate_inputs == "X+outputs" else 0)
        m = ctx.n_models
        params: Params = {}
        if self.gate == "mlp":
            # Random hidden layer: at zero every unit would get the same gradient.
            w1 = torch.randn(
                (d, self.hidden), generator=ctx.generator, dtype=ctx.dtype, device=ctx.device
            )
            params["hidden_w"] = w1 / np.sqrt(max(d, 1))
            params["hidden_b"] = ctx.zeros(self.hidden)
            d = self.hidden
        params["w_gate"] = ctx.zeros(d, m)  # W_g = 0: uniform gate at the start
        params["b_gate"] = ctx.zeros(m)
        if self.learn_noise:
            params["w_noise"] = ctx.zeros(d, m)  # W_noise = 0, as Shazeer et al. start it
        return params

    # -- the gate -----------------------------------------------------------------
    def _summary(self, Z: torch.Tensor) -> torch.Tensor:
        # Classifiers: each model's confidence; regressors: its mean prediction.
        return Z.amax(2) if self._classifier else Z.mean(2)

    def _features(self, params: Params, Z, X) -> torch.Tensor:
        f = (X - params["x_mean"]) / params["x_scale"]
        if self.gate_inputs == "X+outputs":
            s = (self._summary(Z) - params["s_mean"]) / params["s_scale"]
            f = torch.cat([f, s], 1)
        if "hidden_w" in params:
            f = torch.tanh(f @ params["hidden_w"] + params["hidden_b"])
        return f

    def _gate(self, params: Params, hyper: Params, Z, X):
        """Clean logits and noise standard deviations, each ``(n, m)``."""
        f = self._features(params, Z, X)
        clean = f @ params["w_gate"] + params["b_gate"]
        if "w_noise" in params:
            noise_std = hyper["noise_scale"][0] * F.softplus(f @ params["w_noise"])
        else:  # W_noise held at its starting zero: softplus(0) = log 2 everywhere
            noise_std = clean.new_full(clean.shape, float(np.log(2.0))) * hyper["noise_scale"][0]
        return clean, noise_std

    def _relaxed(self, params, hyper, Z, X):
        """Training gate ``G`` and load estimate ``P`` (deterministic; see the class docstring)."""
        clean, noise_std = self._gate(params, hyper, Z, X)
        k = int(self.k)
        if k >= clean.shape[1]:
            P = torch.ones_like(clean)
            logits = clean / hyper["temperature"][0]
        else:
            # The smooth k-th largest at the noise's own scale: the hard one
            # has kinks wherever two other experts swap ranks, at which L-BFGS
            # runs to its iteration bound without meeting its tolerance.
            z = (clean - smooth_kth_excluding(clean, k, noise_std)) / noise_std
            P = torch.special.ndtr(z)
            # log P through log_ndtr: finite far in the tail, where P underflows.
            logits = clean / hyper["temperature"][0] + torch.special.log_ndtr(z)
        return torch.softmax(logits, dim=1), P

    def gates(self, params: Params, hyper: Params, Z, X, exact: bool | None = None) -> torch.Tensor:
        """Gate weights ``(n, m)``: exact top-k (predict) or the training relaxation.

        ``exact=None`` picks the exact gate when autograd is off (the
        estimator's predict path) and the relaxation otherwise (training).
        """
        if exact is None:
            exact = not torch.is_grad_enabled()
        if not exact:
            return self._relaxed(params, hyper, Z, X)[0]
        clean, _ = self._gate(params, hyper, Z, X)
        return keep_top_k_softmax(clean / hyper["temperature"][0], int(self.k))

    def forward(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: the relaxation, kept for data_penalty
            G, P = self._relaxed(params, hyper, Z, X)
            _remember(self, params, hyper, Z, X, (G, P))
        else:
            G = self.gates(params, hyper, Z, X)
        # Unrouted entries of Z hold placeholders and have G == 0 exactly.
        mix = (Z * G[:, :, None]).sum(1)
        if self._classifier:  # a mixture of probabilities -> log-scores
            return torch.log(mix.clamp_min(self.eps))
        return mix

    def data_penalty(self, params: Params, hyper: Params, Z, X=None) -> torch.Tensor:
        # The training loss calls forward, then this, on the same rows and
        # parameters: the gate and load computed once (half the fold's time).
        got = _recall(self, params, hyper, Z, X)
        G, P = got if got is not None else self._relaxed(params, hyper, Z, X)
        w = hyper["load_weight"][0]
        return w * cv_squared(G.sum(0)) + w * cv_squared(P.sum(0))

    def penalty(self, params: Params, hyper: Params) -> torch.Tensor:
        sq = sum(params[k].pow(2).sum() for k in ("w_gate", "w_noise", "hidden_w") if k in params)
        return 0.5 * hyper["gate_l2"][0] * sq + 0.5 * self.bias_l2 * params["b_gate"].pow(2).sum()

    def route(self, params: Params, hyper: Params, X=None) -> torch.Tensor | None:
        """The ``k`` experts of each row (``(n, m)`` bool), or ``None`` when the gate reads base outputs."""
        if self.gate_inputs != "X" or X is None:
            return None
        clean, _ = self._gate(params, hyper, None, X)
        return top_k_mask(clean, int(self.k))

    # -- readable views -------------------------------------------------------------
    @property
    def gate_coef_(self) -> pd.DataFrame:
        """Fitted ``W_g``: one row per gate feature (or hidden unit), one column per model."""
        w = np.asarray(self.params_["w_gate"])
        return pd.DataFrame(w, columns=self.model_names_)


#: Allowed values of the hyperparameters held by default (given, or range ends).
TEMPERATURE_LIMITS = (0.1, 4.0)
LOAD_WEIGHT_LIMITS = (1e-4, 1.0)
NOISE_SCALE_LIMITS = (0.05, 1.0)


def _held_unless_ranged(name: str, value, bounds, limits) -> Hyperparameter:
    """A hyperparameter tuned in ``bounds``, or held at ``value`` when ``None``."""
    if bounds is None:
        return Hyperparameter.held(name, value, limits)
    return Hyperparameter(name, value, *bounds)


#: The last training gate of each aggregation function: ``id(agg) -> (key, (G, P))``.
_LAST: dict = {}
#: What ``_relaxed`` reads besides the rows.
_GATE_PARAMS = ("w_gate", "b_gate", "w_noise", "hidden_w", "hidden_b")
_GATE_HYPER = ("temperature", "noise_scale")


def _key(params: Params, hyper: Params, Z, X):
    """What makes two calls' gates the same tensors in the same graph, or ``None``
    (no reuse) where that cannot be told cheaply.

    The parameters must be the same views of the same flat vector at the same
    version (the inner loss unpacks one ``theta`` twice), the rows the same
    tensors, and the temperature and noise scale equal and outside autograd
    (their tensors are rebuilt per call: equal values from another leaf would
    cut the hypergradient's graph).
    """
    try:
        if any(hyper[k].requires_grad for k in _GATE_HYPER):
            return None
        parts = []
        for k in _GATE_PARAMS:
            if k in params:
                t = params[k]
                base = t._base if t._base is not None else t
                parts.append((k, id(base), t.data_ptr(), t._version, t.shape, t.stride()))
        hyper_vals = tuple(float(hyper[k].reshape(-1)[0]) for k in _GATE_HYPER)
        return (id(Z), id(X), torch.is_grad_enabled(), tuple(parts), hyper_vals)
    except (RuntimeError, AttributeError):  # functorch-wrapped tensors: no data_ptr
        return None


def _remember(agg, params, hyper, Z, X, value) -> None:
    key = _key(params, hyper, Z, X)
    if key is None:
        _LAST.pop(id(agg), None)
        return
    if len(_LAST) > 16:  # aggregation functions that are gone
        _LAST.clear()
    # Strong references keep the keyed objects (and their ids) alive.
    _LAST[id(agg)] = (key, value, (Z, X, [params[k] for k in _GATE_PARAMS if k in params]))


def _recall(agg, params, hyper, Z, X):
    entry = _LAST.pop(id(agg), None)  # used once: nothing outlives the loss it served
    if entry is None or _key(params, hyper, Z, X) != entry[0]:
        return None
    return entry[1]


def _safe_std(A: torch.Tensor) -> torch.Tensor:
    std = A.std(0, unbiased=False) if A.shape[0] > 1 else torch.zeros_like(A[0])
    return torch.where(std > 0, std, torch.ones_like(std))
