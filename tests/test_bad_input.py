"""Bad input, in one table: every case gets a clear error (or a warning of ours).

Each row is ``(make, err, match)``: ``make()`` does what a user would do, and
must raise ``err`` (or, for a warning category, warn it) with a message
matching ``match``: naming the model or the parameter, what was expected and
how to fix it. Estimators are cloned by ``_fit`` (which also unfits plain
fitted base estimators), so pretrained ones are wrapped in ``FrozenEstimator``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.datasets import load_diabetes, load_iris
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from aggregators import (
    AggregatedClassifier,
    AggregatedRegressor,
    Aggregator,
    Choquet,
    HypergradSearchCV,
    Hyperparameter,
    LearnedWeights,
    Stacking,
)
from base_models import (
    BaseModelError,
    BaseModelWarning,
    CallableModel,
    IncompatibleBaseModelError,
    PrecomputedModel,
    SklearnModel,
    TorchModel,
    UnfittedBaseModelError,
    as_base_model,
    class_probabilities,
)

X_IRIS, Y_IRIS = load_iris(return_X_y=True)
IRIS_NAMES = np.array(["setosa", "versicolor", "virginica"])
X_DIAB, Y_DIAB = load_diabetes(return_X_y=True)
X_NAN = X_IRIS.copy()
X_NAN[3, 1] = np.nan
X_INF = X_IRIS.copy()
X_INF[0, 0] = np.inf
Y_DIAB_NAN = Y_DIAB.copy()
Y_DIAB_NAN[5] = np.nan
IRIS_LR = LogisticRegression(max_iter=500).fit(X_IRIS, Y_IRIS)
NB_2_FEATURES = GaussianNB().fit(X_IRIS[:, :2], Y_IRIS)
NAN_NET = TorchModel(torch.nn.Linear(4, 3), output="logits")
torch.nn.init.constant_(NAN_NET.module.weight, float("nan"))
FAST = {"max_outer_iter": 2, "random_state": 0}


class LazyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.LazyLinear(3)

    def forward(self, x):
        return self.lin(x)


class Diverges(Aggregator):
    """Its forward pass is NaN: the fit diverges at the initial hyperparameters."""

    def hyperparameters(self, ctx):
        return [Hyperparameter("l2", 1e-2, 1e-6, 1e2)]

    def init_params(self, ctx, Z, y, X=None):
        return {"w": ctx.zeros(ctx.n_models)}

    def forward(self, params, hyper, Z, X=None):
        return (Z * params["w"][None, :, None]).sum(1) * float("nan")


def _nb_tree():
    return [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=2, random_state=0))]


def _frozen_nb():
    return [("nb", FrozenEstimator(GaussianNB().fit(X_IRIS, Y_IRIS)))]


def _reg_pool():
    return [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=2, random_state=0))]


def _fit(est, X=X_IRIS, y=Y_IRIS):
    return lambda: clone(est).fit(X, y)


def _fit_then_predict(est, X_fit, y_fit, X_new, switch=None):
    """Fit, then predict ``X_new``; a ``Switch`` goes bad in between."""

    def make():
        if switch is not None:
            switch.on = False
        fitted = clone(est).fit(X_fit, y_fit)
        if switch is not None:
            switch.on = True
        fitted.predict_proba(X_new)

    return make


def _predict(X, method):
    def make():
        est = AggregatedClassifier(_nb_tree(), **FAST).fit(X_IRIS, Y_IRIS)
        getattr(est, method)(X)

    return make


# -- clear already (moved here from test_estimators.py, test_base_models.py, test_search.py)
EXISTING = [
    pytest.param(_fit(AggregatedClassifier(_nb_tree()), X_NAN), ValueError, "NaN", id="nan-in-X"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree()), X_INF), ValueError, "infinity",
                 id="inf-in-X"),
    pytest.param(_fit(AggregatedRegressor(_reg_pool()), X_DIAB, Y_DIAB_NAN), ValueError, "NaN",
                 id="nan-in-y"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree()), X_IRIS, np.zeros(150)), ValueError,
                 "only one class", id="one-class"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree()[:1])), ValueError,
                 "at least 2 base models; got 1", id="one-base-model"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree()), X_IRIS, Y_IRIS + 0.5), ValueError,
                 "Unknown label type: continuous", id="continuous-y-to-classifier"),
    pytest.param(_fit(AggregatedRegressor(_reg_pool()), X_IRIS, IRIS_NAMES[Y_IRIS]), ValueError,
                 "convert", id="string-y-to-regressor"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree()), X_IRIS, Y_IRIS[:-1]), ValueError,
                 "inconsistent numbers of samples", id="mismatched-lengths"),
    pytest.param(_fit(AggregatedRegressor(_reg_pool()), X_DIAB[:1], Y_DIAB[:1]), ValueError,
                 "at least 2 samples", id="one-sample"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree() + [("net", LazyNet())])),
                 UnfittedBaseModelError, "'net'.*uninitialised", id="unfitted-torch-module"),
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree() + [("net", as_base_model(LazyNet(), output="logits"))])),
        UnfittedBaseModelError, "'net'.*uninitialised", id="unfitted-torch-module-wrapped",
    ),
    pytest.param(_fit(AggregatedClassifier(_nb_tree() + [("bad", NAN_NET)])),
                 UnfittedBaseModelError, "'bad'.*non-finite", id="torch-module-with-nan-weights"),
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree() + [("frozen", FrozenEstimator(GaussianNB()))])),
        UnfittedBaseModelError, "'frozen' is frozen but not fitted", id="unfitted-frozen-estimator",
    ),
    pytest.param(_fit(AggregatedClassifier(_nb_tree(), prefit=True)), UnfittedBaseModelError,
                 "'nb'.*prefit=True", id="prefit-true-unfitted"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree(), aggregator="nope")), ValueError,
                 "unknown aggregator 'nope'", id="unknown-aggregator"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree(), aggregator="stacking", hyperparams={"l3": 1.0})), ValueError,
                 r"\['l3'\].*\['l2', 'l2_scale'\]", id="unknown-hyperparameter"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree(), aggregator="stacking", hyperparams={"l2": [1.0, 2.0, 3.0]})),
                 ValueError, "'l2' takes a scalar or 2 values", id="hyperparameter-of-wrong-size"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree(), aggregator="stacking", hyperparams={"l2": -1.0})), ValueError,
                 r"'l2' must lie in \(0, 100\]; got -1.0", id="negative-log-hyperparameter"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree() + [("reg", Ridge())])),
                 IncompatibleBaseModelError, "'reg' is a regressor",
                 id="regressor-in-classifier-pool"),
    pytest.param(_fit(AggregatedRegressor(_reg_pool() + [("nb", GaussianNB())]), X_IRIS,
                      Y_IRIS * 1.5),
                 IncompatibleBaseModelError, "'nb' is a classifier",
                 id="classifier-in-regressor-pool"),
    pytest.param(
        _fit(AggregatedClassifier([("lr", FrozenEstimator(IRIS_LR)), ("nb", GaussianNB())]),
             X_IRIS, IRIS_NAMES[Y_IRIS]),
        IncompatibleBaseModelError, "'lr'.*incompatible", id="incompatible-class-labels",
    ),
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree() + [("small", FrozenEstimator(NB_2_FEATURES))])),
        ValueError, "base model 'small' failed in predict_proba: ValueError: .*2 features",
        id="base-model-expects-other-features",
    ),
    pytest.param(_fit(AggregatedClassifier(_nb_tree(), aggregator=Diverges())), ValueError,
                 "diverged at its initial hyperparameters", id="diverges-at-start"),
    pytest.param(_fit(AggregatedClassifier(_nb_tree(), cv=1)), ValueError, "'cv' parameter",
                 id="bad-cv"),
    pytest.param(_fit(AggregatedClassifier([GaussianNB(), GaussianNB()])), TypeError,
                 r"\(name, model\) tuples", id="not-name-model-tuples"),
    pytest.param(_fit(AggregatedClassifier([("a", GaussianNB()), ("a", GaussianNB())])),
                 ValueError, "unique", id="duplicate-names"),
    # at predict
    *[
        pytest.param(_predict(X, method), ValueError, match, id=f"{method}-{case}")
        for method in ("predict", "predict_proba")
        for X, match, case in [
            (X_IRIS[:, :3], "X has 3 features, but AggregatedClassifier is expecting 4",
             "wrong-number-of-features"),
            (X_NAN, "NaN", "nan-in-X"),
            (X_INF, "infinity", "inf-in-X"),
        ]
    ],
    # base models on their own (more in test_base_models.py)
    pytest.param(lambda: PrecomputedModel(np.zeros((3, 2)), keys=["a", "b", "a"]), ValueError,
                 "must be unique", id="precomputed-duplicate-keys"),
    pytest.param(lambda: PrecomputedModel(np.zeros((3, 2))).predict_raw(np.zeros((2, 3))),
                 ValueError, "pass X as a DataFrame.*key_column", id="precomputed-numpy-X"),
    pytest.param(
        lambda: PrecomputedModel(np.zeros((3, 2)), keys=["a", "b", "c"]).predict_raw(
            pd.DataFrame({"x": [1, 2]}, index=["a", "zz"])),
        ValueError, r"no stored prediction for keys \['zz'\]", id="precomputed-missing-key",
    ),
    pytest.param(
        lambda: class_probabilities("shifted", SklearnModel(
            LogisticRegression(max_iter=1000).fit(X_IRIS, Y_IRIS + 10)), X_IRIS, [0, 1, 2]),
        IncompatibleBaseModelError, "model 'shifted'.*none of", id="disjoint-class-labels",
    ),
    pytest.param(lambda: CallableModel(np.zeros(3)), TypeError, "needs a callable",
                 id="callable-not-callable"),
    pytest.param(lambda: TorchModel(torch.nn.Linear, output="logits"), TypeError,
                 "class Linear, not a trained instance", id="torch-class-not-instance"),
    # HypergradSearchCV
    pytest.param(
        lambda: HypergradSearchCV(AggregatedClassifier(_nb_tree()),
                                  {"aggregator__l2": norm(0, 1)}).fit(X_IRIS, Y_IRIS),
        ValueError, "loguniform or scipy.stats.uniform", id="search-range-not-a-box",
    ),
    pytest.param(
        lambda: HypergradSearchCV(AggregatedClassifier(_nb_tree()),
                                  {"aggregator__l2": (1.0, 0.1, "log")}).fit(X_IRIS, Y_IRIS),
        ValueError, "low < high", id="search-range-reversed",
    ),
]


# -- issue 15: hyperparameters outside their limits, an error at fit however given ---------
HYPERPARAMETERS = [
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree(), aggregator=Stacking(l2=-1), **FAST)),
        ValueError, r"Stacking's hyperparameter 'l2' must lie in \(0, 100\]; got -1 "
        r"\(given to Stacking\)", id="stacking-l2-negative",
    ),
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree(), aggregator=Stacking(l2=-1), hyperparams="fixed",
                                  **FAST)),
        ValueError, r"'l2' must lie in \(0, 100\]; got -1", id="stacking-l2-negative-fixed",
    ),
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree(), aggregator=Choquet(temperature=0), **FAST)),
        ValueError, r"Choquet's hyperparameter 'temperature' must lie in \[0.001, 1000\]; "
        r"got 0", id="choquet-temperature-zero",
    ),
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree(), aggregator=Stacking(l2=1e9), **FAST)),
        ValueError, r"'l2' must lie in \(0, 100\]; got 1000000000.0 \(given to Stacking\)",
        id="stacking-l2-above-the-upper-bound",
    ),
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree(), aggregator="stacking", hyperparams={"l2": 1e9}, **FAST)),
        ValueError, r"'l2' must lie in \(0, 100\]; got 1000000000.0 \(given as "
        r"hyperparams=\{'l2': ...\}\)", id="hyperparams-l2-above-the-upper-bound",
    ),
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree(), aggregator=Stacking(l2=[0.1, 1e9]), **FAST)),
        ValueError, r"'l2' must lie in \(0, 100\]; got \[0.1, 1000000000.0\] \(entries "
        r"\['tree'\]\)", id="stacking-l2-vector-one-entry-out",
    ),
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree(), aggregator=LearnedWeights(),
                                  hyperparams={"temperature": (0.1, 10.0, "log")}, **FAST)),
        ValueError, r"range \(0.1, 10\) given to tune LearnedWeights's hyperparameter "
        r"'temperature' in reaches outside its allowed range \[0.5, 2\]",
        id="range-beyond-the-limits",
    ),
]

# -- issue 15: a base model that raises: its name, the method, the original chained ------
class FailsToFit(ClassifierMixin, BaseEstimator):
    """An estimator fitted inside that raises something other than ValueError."""

    def fit(self, X, y):
        raise RuntimeError("out of licences")

    def predict(self, X):
        return np.zeros(len(X))


class Switch:
    """A callable that returns probabilities at fit and ``bad`` ones once switched."""

    __name__ = "switch"

    def __init__(self, bad):
        self.bad = bad
        self.on = False

    def __call__(self, X):
        p = IRIS_LR.predict_proba(X)
        return self.bad(p) if self.on else p


_switch_raises = Switch(lambda p: {}["missing column"])

FAILURES = [
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree() + [("net", torch.nn.Linear(3, 3))], **FAST)),
        BaseModelError, r"base model 'net' failed in Linear.forward: RuntimeError: mat1 and "
        r"mat2 shapes", id="torch-shape-error",
    ),
    pytest.param(
        _fit(AggregatedClassifier(
            _nb_tree() + [("f", CallableModel(lambda X: X["no such column"]))], **FAST),
            pd.DataFrame(X_IRIS)),
        BaseModelError, r"base model 'f' failed in <lambda>\(X\): KeyError: 'no such column'",
        id="callable-key-error",
    ),
    pytest.param(
        _fit_then_predict(
            AggregatedClassifier(_nb_tree() + [("switch", CallableModel(_switch_raises))], **FAST),
            X_IRIS, Y_IRIS, X_IRIS[:5], switch=_switch_raises,
        ),
        BaseModelError, r"base model 'switch' failed in switch\(X\): KeyError",
        id="callable-key-error-at-predict",
    ),
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree() + [("lic", FailsToFit())], **FAST)),
        BaseModelError, r"base model 'lic' failed in fit: RuntimeError: out of licences",
        id="estimator-fitted-inside-raises",
    ),
]

# -- issue 15: probabilities that are not, from every kind of model, at fit and predict --
torch.manual_seed(0)
LOGIT_NET = torch.nn.Linear(4, 3)  # returns logits, whatever it is declared to return


class ScaledProba(LogisticRegression):
    """A fitted classifier whose predict_proba is broken: rows sum to 3."""

    def predict_proba(self, X):
        return 3 * super().predict_proba(X)


_switch_scaled = Switch(lambda p: 3 * p)

PROBABILITIES = [
    pytest.param(
        _fit(AggregatedClassifier(_nb_tree() + [("net", TorchModel(LOGIT_NET, output="proba"))],
                                  **FAST)),
        IncompatibleBaseModelError,
        r"'net' declares probabilities \(output='proba'\) but .*outside \[0, 1\].*"
        r"output='logits'", id="torch-proba-that-are-logits",
    ),
    pytest.param(
        _fit(AggregatedClassifier(
            _nb_tree() + [("x3", FrozenEstimator(ScaledProba(max_iter=500).fit(X_IRIS, Y_IRIS)))],
            **FAST)),
        IncompatibleBaseModelError, r"'x3' declares probabilities.*150 of 150 rows do not "
        r"sum to 1 \(sums from 3 to 3\).*decision_function", id="sklearn-proba-scaled-by-3",
    ),
    pytest.param(
        _fit(AggregatedClassifier(
            _nb_tree() + [("neg", CallableModel(lambda X: IRIS_LR.predict_proba(X) - 0.2))],
            **FAST)),
        IncompatibleBaseModelError, r"'neg' declares probabilities.*outside \[0, 1\] "
        r"\(from -0.2 ", id="callable-proba-negative",
    ),
    pytest.param(
        _fit(AggregatedClassifier(
            _frozen_nb() + [("stored", PrecomputedModel(3 * IRIS_LR.predict_proba(X_IRIS)))],
            **FAST), pd.DataFrame(X_IRIS)),
        IncompatibleBaseModelError, r"'stored' declares probabilities.*do not sum to 1",
        id="precomputed-proba-scaled",
    ),
    pytest.param(
        _fit_then_predict(
            AggregatedClassifier(_nb_tree() + [("switch", CallableModel(_switch_scaled))], **FAST),
            X_IRIS, Y_IRIS, X_IRIS[:5], switch=_switch_scaled,
        ),
        IncompatibleBaseModelError, r"'switch' declares probabilities.*5 of 5 rows do not sum",
        id="proba-checked-at-predict-too",
    ),
]

# -- issue 15: a model without class labels whose columns are in another order -----------
CLASS_ORDER = [
    pytest.param(
        _fit(AggregatedClassifier(
            _nb_tree() + [("f", CallableModel(lambda X: IRIS_LR.predict_proba(X)[:, [1, 0, 2]]))],
            **FAST)),
        BaseModelWarning, r"'f' has no class labels.*classes \[0, 1, 2\].*far better as "
        r"\[1, 0, 2\].*classes=\[1, 0, 2\]", id="callable-columns-permuted",
    ),
]

# -- issue 15: stored predictions whose keys are row positions ----------------------------
# Shuffled once, so that any 100 rows hold every class.
_PERM = np.random.default_rng(0).permutation(len(X_IRIS))
X_SHUF, Y_SHUF = X_IRIS[_PERM], Y_IRIS[_PERM]


def _precomputed(**kw):
    """Stored probabilities of the first 100 shuffled rows, keys left to default."""
    return PrecomputedModel(IRIS_LR.predict_proba(X_SHUF[:100]), **kw)


STORED_KEYS = [
    pytest.param(
        _fit_then_predict(
            AggregatedClassifier([("stored", _precomputed())] + _frozen_nb(), aggregator="stacking",
                                 **FAST),
            pd.DataFrame(X_SHUF[:100]), Y_SHUF[:100], pd.DataFrame(X_SHUF[100:]),
        ),
        ValueError, r"base model 'stored'.*cannot tell 50 of these 50 rows from the rows it "
        r"was fitted on.*keys=.*key_column", id="precomputed-new-rows-same-default-index",
    ),
    pytest.param(
        _fit(
            AggregatedClassifier([("stored", _precomputed())] + _frozen_nb(), **FAST),
            pd.concat([pd.DataFrame(X_SHUF[:50]), pd.DataFrame(X_SHUF[50:100])]),
            Y_SHUF[:100],
        ),
        ValueError, r"'stored'.*cannot tell rows apart.*share the keys \[0, 1, 2, 3, 4\]",
        id="precomputed-two-frames-concatenated",
    ),
]


@pytest.mark.parametrize(
    "make, err, match",
    EXISTING + HYPERPARAMETERS + FAILURES + PROBABILITIES + CLASS_ORDER + STORED_KEYS,
)
def test_bad_input(make, err, match):
    if issubclass(err, Warning):
        with pytest.warns(err, match=match):
            make()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. StratifiedKFold on tiny classes
        with pytest.raises(err, match=match) as info:
            make()
    if isinstance(info.value, BaseModelError):
        assert info.value.__cause__ is not None  # the model's own error, chained
