"""Tests for the frozen base-model wrappers in :mod:`base_models`."""

import warnings
from unittest.mock import Mock

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone, is_classifier, is_regressor
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.tree import DecisionTreeClassifier

from base_models import (
    BaseModel,
    BaseModelError,
    BaseModelTypeError,
    BaseModelValueError,
    BaseModelWarning,
    CallableModel,
    IncompatibleBaseModelError,
    PrecomputedModel,
    SklearnModel,
    TorchModel,
    UnfittedBaseModelError,
    as_base_model,
    calling,
    check_class_order,
    check_probabilities,
    class_probabilities,
    is_fitted_estimator,
    regression_outputs,
    resolve_device,
    resolve_dtype,
    to_numpy,
    to_tensor,
)


# --------------------------------------------------------------------------- data


class LabelOnlyClassifier(ClassifierMixin, BaseEstimator):
    """A classifier with ``predict`` only (no probabilities, no decision)."""

    def fit(self, X, y):
        self.tree_ = DecisionTreeClassifier(max_depth=2, random_state=0).fit(X, y)
        self.classes_ = self.tree_.classes_
        return self

    def predict(self, X):
        return self.tree_.predict(X)


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.fixture(scope="module")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.fixture(scope="module")
def diabetes():
    return load_diabetes(return_X_y=True)


@pytest.fixture(scope="module")
def iris_lr(iris):
    X, y = iris
    return LogisticRegression(max_iter=1000).fit(X, y)


IRIS_CLASSES = np.array([0, 1, 2])


# ---------------------------------------------------------------- as_base_model


def test_dispatch_sklearn_classifier_and_regressor(iris_lr, diabetes):
    m = as_base_model(iris_lr)
    assert type(m) is SklearnModel and m.task == "classification"
    assert m.estimator is iris_lr
    r = as_base_model(Ridge().fit(*diabetes))
    assert type(r) is SklearnModel and r.task == "regression" and r.output == "value"


def test_dispatch_frozen_estimator(iris, iris_lr):
    X, _ = iris
    m = as_base_model(FrozenEstimator(iris_lr))
    assert type(m) is SklearnModel
    assert m.task == "classification" and m.output == "proba"
    np.testing.assert_array_equal(m.classes_, IRIS_CLASSES)
    np.testing.assert_allclose(m.predict_raw(X[:5]), iris_lr.predict_proba(X[:5]))


def test_dispatch_torch_module():
    net = torch.nn.Linear(4, 3)
    m = as_base_model(net, output="proba")
    assert type(m) is TorchModel and m.module is net and m.output == "proba"


def test_torch_module_with_fit_and_predict_is_a_torch_model():
    class Net(torch.nn.Linear):
        def fit(self, X, y):  # pragma: no cover - never called
            raise AssertionError

        def predict(self, X):  # pragma: no cover - never called
            raise AssertionError

    assert type(as_base_model(Net(4, 3))) is TorchModel


@pytest.mark.parametrize(
    "cls, match",
    [
        (torch.nn.Linear, r"class Linear, not a trained instance.*torch module"),
        (LogisticRegression, r"class LogisticRegression, not a trained instance"),
    ],
)
def test_dispatch_class_instead_of_instance(cls, match):
    with pytest.raises(TypeError, match=match):
        as_base_model(cls)


def test_torch_model_refuses_a_class():
    with pytest.raises(TypeError, match="class Linear, not a trained instance"):
        TorchModel(torch.nn.Linear)


@pytest.mark.parametrize(
    "obj", [np.zeros((4, 3)), pd.DataFrame(np.zeros((4, 3))), pd.Series(np.zeros(4))]
)
def test_dispatch_arrays(obj):
    m = as_base_model(obj)
    assert type(m) is PrecomputedModel
    assert m.predictions.shape[0] == 4


def test_dispatch_callable():
    m = as_base_model(lambda X: np.zeros(len(X)), output="value")
    assert type(m) is CallableModel and m.task == "regression"
    np.testing.assert_array_equal(m.predict_raw(np.ones((3, 2))), np.zeros((3, 1)))


@pytest.mark.parametrize("obj", [42, "model", [0.1, 0.9], None, {"a": 1}])
def test_dispatch_unsupported(obj):
    with pytest.raises(TypeError, match="cannot use an object of type"):
        as_base_model(obj)


def test_dispatch_already_wrapped(iris_lr):
    m = SklearnModel(iris_lr)
    assert as_base_model(m) is m
    with pytest.raises(TypeError, match="already wrapped"):
        as_base_model(m, method="predict")


def test_duck_typed_estimator_without_sklearn_tags(iris, iris_lr):
    """A model that is not a BaseEstimator but follows the fit/predict protocol."""

    class Duck:
        _estimator_type = "classifier"

        def __init__(self, inner):
            self.inner_ = inner
            self.classes_ = inner.classes_

        def fit(self, X, y):  # pragma: no cover - never called
            raise AssertionError

        def predict(self, X):
            return self.inner_.predict(X)

        def predict_proba(self, X):
            return self.inner_.predict_proba(X)

    X, _ = iris
    m = as_base_model(Duck(iris_lr))
    assert type(m) is SklearnModel
    assert m.task == "classification" and m.output == "proba"
    np.testing.assert_allclose(
        class_probabilities("duck", m, X, IRIS_CLASSES), iris_lr.predict_proba(X)
    )


# ------------------------------------------------------------------ SklearnModel


@pytest.mark.parametrize(
    "estimator, output",
    [
        (LogisticRegression(max_iter=1000), "proba"),
        (SVC(), "decision"),
        (LinearSVC(), "decision"),
        (LabelOnlyClassifier(), "label"),
    ],
    ids=["logreg", "svc", "linearsvc", "label-only"],
)
def test_sklearn_output_choice(iris, estimator, output):
    X, y = iris
    est = clone(estimator).fit(X, y)
    m = SklearnModel(est)
    assert m.output == output
    raw = m.predict_raw(X)
    if output == "proba":
        np.testing.assert_allclose(raw, est.predict_proba(X))
    elif output == "decision":
        np.testing.assert_allclose(raw, est.decision_function(X))
    else:
        np.testing.assert_array_equal(raw, est.predict(X))
    proba = class_probabilities("m", m, X, IRIS_CLASSES)
    assert proba.shape == (len(X), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    # Every output kind keeps the model's argmax.
    np.testing.assert_array_equal(proba.argmax(axis=1), est.predict(X))


def test_sklearn_explicit_method(iris, iris_lr):
    X, _ = iris
    m = SklearnModel(iris_lr, method="predict")
    assert m.output == "label"
    np.testing.assert_array_equal(m.predict_raw(X), iris_lr.predict(X))
    d = SklearnModel(iris_lr, method="decision_function")
    np.testing.assert_allclose(d.predict_raw(X), iris_lr.decision_function(X))


@pytest.mark.parametrize(
    "estimator, method, match",
    [
        (LogisticRegression(), "predict_log_proba", "method must be one of"),
        (SVC(), "predict_proba", "has no predict_proba"),
        (LabelOnlyClassifier(), "decision_function", "has no decision_function"),
    ],
)
def test_sklearn_bad_method(estimator, method, match):
    with pytest.raises(ValueError, match=match):
        SklearnModel(estimator, method=method)


def test_sklearn_unfitted_raises_not_fitted(iris):
    X, _ = iris
    m = SklearnModel(LogisticRegression())
    assert issubclass(UnfittedBaseModelError, NotFittedError)
    with pytest.raises(UnfittedBaseModelError, match="LogisticRegression is not fit"):
        m.predict_raw(X)
    with pytest.raises(NotFittedError):
        m.fit(X)
    with pytest.raises(NotFittedError):
        as_base_model(FrozenEstimator(LogisticRegression())).check_fitted()


def test_sklearn_clone_returns_same_object(iris_lr):
    m = SklearnModel(iris_lr)
    assert clone(m) is m
    # Also inside a parameter list cloned by a meta-estimator.
    cloned = clone([("a", m)], safe=False)
    assert cloned[0][1] is m


def test_sklearn_fit_never_refits(iris):
    X, y = iris
    est = LogisticRegression(max_iter=1000).fit(X, y)
    before = est.predict_proba(X)
    est.fit = Mock(side_effect=AssertionError("refit"))
    m = SklearnModel(est)
    assert m.fit(X, y) is m
    assert m.fit(X[:10], np.zeros(10)) is m
    assert est.fit.call_count == 0
    np.testing.assert_array_equal(m.predict_raw(X), before)


# ------------------------------------------------------------ class_probabilities


def test_alignment_subset_of_classes(iris):
    X, y = iris
    keep = y != 1
    est = LogisticRegression(max_iter=1000).fit(X[keep], y[keep])
    np.testing.assert_array_equal(est.classes_, [0, 2])
    proba = class_probabilities("sub", SklearnModel(est), X, IRIS_CLASSES)
    p = est.predict_proba(X)
    np.testing.assert_allclose(proba[:, 0], p[:, 0])
    np.testing.assert_allclose(proba[:, 2], p[:, 1])
    np.testing.assert_array_equal(proba[:, 1], 0.0)


def test_alignment_different_label_order(iris, iris_lr):
    X, _ = iris
    p = iris_lr.predict_proba(X)
    order = [2, 0, 1]
    m = CallableModel(lambda Z: iris_lr.predict_proba(Z)[:, order], classes=order)
    np.testing.assert_allclose(class_probabilities("perm", m, X, IRIS_CLASSES), p)


def test_alignment_string_labels(iris):
    X, y = iris
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    classes = np.unique(names)
    keep = names != "setosa"
    est = LogisticRegression(max_iter=1000).fit(X[keep], names[keep])
    proba = class_probabilities("str", SklearnModel(est), X, classes)
    np.testing.assert_array_equal(proba[:, 0], 0.0)
    np.testing.assert_allclose(proba[:, 1:], est.predict_proba(X))
    # Object-dtype labels match the same unicode labels.
    m = CallableModel(
        lambda Z: est.predict_proba(Z)[:, ::-1],
        classes=np.array(["virginica", "versicolor"], dtype=object),
    )
    np.testing.assert_allclose(class_probabilities("obj", m, X, classes), proba)


def test_binary_decision_is_sigmoid(cancer):
    X, y = cancer
    est = LinearSVC().fit(X, y)
    m = SklearnModel(est)
    assert m.output == "decision" and m.predict_raw(X).shape == (len(X), 1)
    proba = class_probabilities("svm", m, X, np.array([0, 1]))
    s = expit(est.decision_function(X))
    np.testing.assert_allclose(proba[:, 1], s)
    np.testing.assert_allclose(proba[:, 0], 1.0 - s)


def test_multiclass_decision_is_softmax(iris):
    X, y = iris
    est = LinearSVC().fit(X, y)
    proba = class_probabilities("svm", SklearnModel(est), X, IRIS_CLASSES)
    np.testing.assert_allclose(proba, softmax(est.decision_function(X), axis=1))


def test_label_output_is_one_hot(iris):
    X, y = iris
    est = LabelOnlyClassifier().fit(X, y)
    proba = class_probabilities("tree", SklearnModel(est), X, IRIS_CLASSES)
    np.testing.assert_array_equal(proba, np.eye(3)[est.predict(X)])


def test_label_outside_target_classes_is_an_error(iris):
    X, y = iris
    est = LabelOnlyClassifier().fit(X, y)
    with pytest.raises(IncompatibleBaseModelError, match="'tree' predicts labels"):
        class_probabilities("tree", SklearnModel(est), X, np.array([0, 1]))


def test_disjoint_labels_is_an_error_naming_the_model(iris):
    X, y = iris
    est = LogisticRegression(max_iter=1000).fit(X, y + 10)
    with pytest.raises(IncompatibleBaseModelError, match="model 'shifted'.*none of"):
        class_probabilities("shifted", SklearnModel(est), X, IRIS_CLASSES)


def test_extra_labels_warn_and_renormalise(iris, iris_lr):
    X, _ = iris
    with pytest.warns(BaseModelWarning, match=r"'full' knows classes \[(np.int64\()?2\)?\]"):
        proba = class_probabilities("full", SklearnModel(iris_lr), X, np.array([0, 1]))
    p = iris_lr.predict_proba(X)[:, :2]
    np.testing.assert_allclose(proba, p / p.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_unlabelled_callable_wrong_column_count(iris):
    X, _ = iris
    m = CallableModel(lambda Z: np.full((len(Z), 4), 0.25))
    with pytest.raises(IncompatibleBaseModelError, match="'four' returns 4 class col"):
        class_probabilities("four", m, X, IRIS_CLASSES)


def test_labelled_model_wrong_column_count(iris):
    X, _ = iris
    m = CallableModel(lambda Z: np.full((len(Z), 3), 1 / 3), classes=[0, 1])
    with pytest.raises(IncompatibleBaseModelError, match="'two' returned shape"):
        class_probabilities("two", m, X, IRIS_CLASSES)


def test_unlabelled_binary_single_column(cancer):
    X, _ = cancer
    m = CallableModel(lambda Z: np.full(len(Z), 0.8))
    proba = class_probabilities("p", m, X[:3], np.array(["neg", "pos"]))
    np.testing.assert_allclose(proba, [[0.2, 0.8]] * 3)
    logit = CallableModel(lambda Z: np.zeros((len(Z), 1)), output="logits")
    np.testing.assert_allclose(class_probabilities("l", logit, X[:2], [0, 1]), 0.5)


def test_raw_given_is_not_recomputed(iris, iris_lr):
    X, _ = iris
    m = CallableModel(Mock(side_effect=AssertionError("called")), classes=[0, 1, 2])
    raw = iris_lr.predict_proba(X)
    got = class_probabilities("m", m, X, IRIS_CLASSES, raw=raw)
    np.testing.assert_allclose(got, raw)


def test_header_labels_match_integer_classes_by_text(iris, iris_lr):
    X, _ = iris
    p = iris_lr.predict_proba(X)
    m = PrecomputedModel(pd.DataFrame(p[:, [1, 0, 2]], columns=["1", "0", "2"]))
    np.testing.assert_array_equal(m.classes_, ["1", "0", "2"])
    got = class_probabilities("csv", m, pd.DataFrame(X), IRIS_CLASSES)
    np.testing.assert_allclose(got, p)


# ---------------------------------------------------------------- regression


def test_regression_outputs(diabetes, iris_lr):
    X, y = diabetes
    est = Ridge().fit(X, y)
    out = regression_outputs("ridge", SklearnModel(est), X, 1)
    np.testing.assert_allclose(out, est.predict(X)[:, None])
    with pytest.raises(IncompatibleBaseModelError, match="'ridge' returns 1 outputs"):
        regression_outputs("ridge", SklearnModel(est), X, 2)
    with pytest.raises(IncompatibleBaseModelError, match="'lr' is a classifier"):
        regression_outputs("lr", SklearnModel(iris_lr), X, 1)


# -------------------------------------------------------------------- TorchModel


class Recorder(torch.nn.Module):
    """A linear model with dropout that records how it was called."""

    def __init__(self, n_in=4, n_out=3):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(n_in, n_out)
        self.dropout = torch.nn.Dropout(0.5)
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled(), len(x), x.dtype))
        return self.linear(self.dropout(x))


def test_torch_eval_mode_no_grad_and_mode_restored(iris):
    X, _ = iris
    net = Recorder()
    net.train()
    net.dropout.eval()  # a submodule the user keeps in eval mode
    out1 = TorchModel(net).predict_raw(X)
    out2 = TorchModel(net).predict_raw(X)
    # Dropout off: deterministic and equal to the plain linear map.
    np.testing.assert_array_equal(out1, out2)
    with torch.no_grad():
        ref = net.linear(torch.as_tensor(X, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(out1, ref)
    assert all(not training and not grad for training, grad, _, _ in net.calls)
    assert net.training is True and net.linear.training is True
    assert net.dropout.training is False
    net.eval()
    TorchModel(net).predict_raw(X[:3])
    assert net.training is False


def test_torch_mode_restored_after_error():
    class Boom(torch.nn.Linear):
        def forward(self, x):
            raise RuntimeError("boom")

    net = Boom(4, 3).train()
    with pytest.raises(RuntimeError, match="boom"):
        TorchModel(net).predict_raw(np.zeros((2, 4)))
    assert net.training is True


def test_torch_batching(iris):
    X, _ = iris
    net = Recorder()
    whole = TorchModel(net, batch_size=1000).predict_raw(X)
    net.calls.clear()
    parts = TorchModel(net, batch_size=64).predict_raw(X)
    assert [n for _, _, n, _ in net.calls] == [64, 64, 22]
    np.testing.assert_allclose(parts, whole, rtol=1e-6, atol=1e-7)
    assert TorchModel(net, batch_size=7).predict_raw(X[:0]).shape[0] == 0


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "8"])
def test_torch_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        TorchModel(torch.nn.Linear(2, 2), batch_size=batch_size)


def _torch_copy_of(lr) -> torch.nn.Linear:
    """A float64 torch Linear with a fitted LogisticRegression's weights."""
    net = torch.nn.Linear(lr.coef_.shape[1], lr.coef_.shape[0]).double()
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(lr.coef_))
        net.bias.copy_(torch.from_numpy(lr.intercept_))
    return net


def test_torch_logits_and_proba_outputs(iris, iris_lr):
    X, _ = iris
    net = _torch_copy_of(iris_lr)
    expected = iris_lr.predict_proba(X)
    logits = TorchModel(net, output="logits")
    np.testing.assert_allclose(
        class_probabilities("net", logits, X, IRIS_CLASSES), expected, rtol=1e-10
    )
    softmaxed = torch.nn.Sequential(net, torch.nn.Softmax(dim=1))
    proba = TorchModel(softmaxed, output="proba")
    np.testing.assert_allclose(proba.predict_raw(X), expected, rtol=1e-10)
    np.testing.assert_allclose(
        class_probabilities("net", proba, X, IRIS_CLASSES), expected, rtol=1e-10
    )


def test_torch_labelled_columns(iris, iris_lr):
    X, _ = iris
    net = _torch_copy_of(iris_lr)
    m = TorchModel(net, classes=["a", "b", "c"])
    got = class_probabilities("net", m, X, np.array(["a", "b", "c", "d"]))
    np.testing.assert_array_equal(got[:, 3], 0.0)
    np.testing.assert_allclose(got[:, :3], iris_lr.predict_proba(X), rtol=1e-10)


def test_torch_value_output(diabetes):
    X, y = diabetes
    est = Ridge().fit(X, y)
    net = torch.nn.Linear(X.shape[1], 1).double()
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(est.coef_[None, :]))
        net.bias.fill_(float(est.intercept_))
    m = TorchModel(net, output="value")
    assert m.task == "regression"
    np.testing.assert_allclose(
        regression_outputs("net", m, X, 1), est.predict(X)[:, None], rtol=1e-10
    )
    with pytest.raises(ValueError, match="output must be one of"):
        TorchModel(net, output="decision")


def test_torch_dtypes(iris):
    X, _ = iris
    assert X.dtype == np.float64
    net32 = torch.nn.Linear(4, 3)
    out = TorchModel(net32).predict_raw(X)  # float64 rows into a float32 module
    assert out.dtype == np.float64 and out.shape == (150, 3)
    net64 = torch.nn.Linear(4, 3).double()
    out64 = TorchModel(net64).predict_raw(X)  # dtype taken from the module
    with torch.no_grad():
        ref = net64(torch.from_numpy(X)).numpy()
    # Equal up to rounding: with CUDA the module runs there, the reference here.
    np.testing.assert_allclose(out64, ref, rtol=1e-12, atol=1e-15)
    explicit = TorchModel(net64, dtype="float64")
    np.testing.assert_allclose(explicit.predict_raw(X), ref, rtol=1e-12, atol=1e-15)
    # DataFrame rows and float32 rows work too.
    np.testing.assert_allclose(TorchModel(net64).predict_raw(pd.DataFrame(X)), ref, rtol=1e-12, atol=1e-15)
    TorchModel(net32).predict_raw(X.astype(np.float32))
    with pytest.raises(ValueError, match="dtype"):
        TorchModel(net32, dtype="int64")


def test_torch_lazy_module_is_unfitted():
    m = as_base_model(torch.nn.LazyLinear(3))
    with pytest.raises(UnfittedBaseModelError, match="uninitialised"):
        m.check_fitted()
    with pytest.raises(NotFittedError):
        m.predict_raw(np.zeros((2, 4)))


def test_torch_nan_parameters_are_an_error():
    net = torch.nn.Linear(4, 3)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(UnfittedBaseModelError, match="non-finite values in 'weight'"):
        TorchModel(net).predict_raw(np.zeros((2, 4)))


def test_torch_clone_and_fit_are_frozen(iris):
    X, y = iris
    net = Recorder()
    m = TorchModel(net)
    assert clone(m) is m
    w = net.linear.weight.detach().clone()
    assert m.fit(X, y) is m
    assert torch.equal(net.linear.weight, w)
    assert net.calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_on_cuda(iris, iris_lr):
    X, _ = iris
    net = _torch_copy_of(iris_lr)
    cpu = TorchModel(net, device="cpu").predict_raw(X)
    m = TorchModel(net, device="cuda", batch_size=32)
    out = m.predict_raw(X)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, cpu, rtol=1e-9, atol=1e-12)
    assert next(net.parameters()).device.type == "cpu"  # moved back home
    auto = TorchModel(net, device="auto")
    np.testing.assert_allclose(auto.predict_raw(X), cpu, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------- PrecomputedModel


@pytest.fixture(scope="module")
def stored(iris, iris_lr):
    """iris probabilities stored under string keys, and X as a keyed DataFrame."""
    X, _ = iris
    keys = np.array([f"r{i}" for i in range(len(X))])
    return iris_lr.predict_proba(X), keys, pd.DataFrame(X, index=keys)


def test_precomputed_lookup_by_index_shuffled(stored):
    p, keys, Xdf = stored
    m = PrecomputedModel(p, keys=keys)
    shuffled = Xdf.sample(frac=1.0, random_state=0)
    assert not shuffled.index.equals(Xdf.index)
    pos = np.array([int(k[1:]) for k in shuffled.index])
    np.testing.assert_array_equal(m.predict_raw(shuffled), p[pos])
    np.testing.assert_allclose(
        class_probabilities("stored", m, shuffled, IRIS_CLASSES), p[pos]
    )


def test_precomputed_key_column_by_name(stored):
    p, keys, Xdf = stored
    X = Xdf.reset_index(names="id").iloc[::-1]
    m = PrecomputedModel(p, keys=keys, key_column="id")
    np.testing.assert_array_equal(m.predict_raw(X), p[::-1])


def test_precomputed_key_column_by_position_numpy(iris, stored):
    p, _, _ = stored
    X, _ = iris
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(X))
    # Keys 0..n-1 as the last (float) column of a numpy X.
    Xk = np.column_stack([X, np.arange(len(X))])[perm]
    m = PrecomputedModel(p, key_column=-1)
    np.testing.assert_array_equal(m.predict_raw(Xk), p[perm])
    m4 = PrecomputedModel(p, key_column=4)
    np.testing.assert_array_equal(m4.predict_raw(Xk), p[perm])


@pytest.mark.parametrize(
    "key_column, X, match",
    [
        ("id", np.zeros((2, 3)), "must be a column position"),
        (7, np.zeros((2, 3)), "must be a column position below 3"),
        ("nope", pd.DataFrame({"a": [1]}), "neither a column name"),
        (None, np.zeros((2, 3)), "pass X as a DataFrame.*key_column"),
    ],
)
def test_precomputed_bad_keys_in_X(key_column, X, match):
    m = PrecomputedModel(np.zeros((3, 2)), key_column=key_column)
    with pytest.raises(ValueError, match=match):
        m.predict_raw(X)


def test_precomputed_missing_keys_are_listed(stored):
    p, keys, Xdf = stored
    m = PrecomputedModel(p, keys=keys)
    X = pd.DataFrame(np.zeros((3, 4)), index=["r0", "zz", "yy"])
    with pytest.raises(ValueError, match=r"keys \['zz', 'yy'\] \(2 rows missing\)"):
        m.predict_raw(X)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keys": ["a", "b", "a"]}, "must be unique"),
        ({"keys": ["a", "b"]}, "2 keys were given for 3 rows"),
        ({"output": "probability"}, "output must be one of"),
    ],
)
def test_precomputed_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrecomputedModel(np.zeros((3, 2)), **kwargs)


def test_precomputed_duplicate_dataframe_index():
    df = pd.DataFrame(np.zeros((2, 2)), index=[1, 1])
    with pytest.raises(ValueError, match="unique"):
        PrecomputedModel(df)


def test_precomputed_dataframe_brings_labels(iris, iris_lr):
    X, _ = iris
    p = iris_lr.predict_proba(X)
    df = pd.DataFrame(p[:, [2, 0, 1]], columns=["c", "a", "b"])
    m = PrecomputedModel(df)
    np.testing.assert_array_equal(m.classes_, ["c", "a", "b"])
    got = class_probabilities("df", m, pd.DataFrame(X), np.array(["a", "b", "c"]))
    np.testing.assert_allclose(got, p)
    # Regression values carry no labels.
    assert PrecomputedModel(df[["a"]], output="value").classes_ is None


def test_precomputed_label_output(iris):
    X, y = iris
    m = PrecomputedModel(pd.Series(y), output="label")
    assert m.task == "classification"
    np.testing.assert_array_equal(
        class_probabilities("lab", m, pd.DataFrame(X), IRIS_CLASSES), np.eye(3)[y]
    )


def test_precomputed_positional_keys_compare_rows(iris, iris_lr):
    """Keys that are row positions: a later row under a fit row's key must be that row."""
    X, _ = iris
    p = iris_lr.predict_proba(X)
    m = PrecomputedModel(p)  # keys 0..149, positions
    fit = pd.DataFrame(X[:100])
    bound = m.bind(fit)
    assert bound is not m and m._fit_rows is None  # the shared model is left alone
    # The fit rows again, in any order, and other rows of the stored frame are fine.
    np.testing.assert_array_equal(bound.predict_raw(fit.iloc[::-1]), p[:100][::-1])
    np.testing.assert_array_equal(bound.predict_raw(pd.DataFrame(X).iloc[100:]), p[100:])
    # New rows under the default index 0..49 would get the fit rows' predictions.
    with pytest.raises(ValueError, match="cannot tell 50 of these 50 rows from the rows it was"):
        bound.predict_raw(pd.DataFrame(X[100:]))
    with pytest.raises(ValueError, match=r"cannot tell rows apart.*share the keys \[0, 1, 2"):
        m.predict_raw(pd.concat([pd.DataFrame(X[:50]), pd.DataFrame(X[50:100])]))
    # Repeated rows are the same rows.
    np.testing.assert_array_equal(bound.predict_raw(pd.concat([fit, fit])), np.vstack([p[:100]] * 2))
    # Explicit keys, or a key column, are taken as given: nothing is compared.
    keyed = PrecomputedModel(p, keys=np.arange(150))
    assert keyed.bind(fit) is keyed
    by_column = PrecomputedModel(p, key_column=0)
    assert by_column.bind(fit) is by_column


def test_precomputed_dataframe_with_an_index_of_its_own_is_keyed(stored):
    p, keys, Xdf = stored
    m = PrecomputedModel(pd.DataFrame(p, index=keys))
    assert m.bind(Xdf) is m


def test_from_file_npy(tmp_path, iris, stored):
    p, _, _ = stored
    X, _ = iris
    path = tmp_path / "pred.npy"
    np.save(path, p)
    m = PrecomputedModel.from_file(path, key_column=4)
    Xk = np.column_stack([X, np.arange(len(X))])[::-1]
    np.testing.assert_array_equal(m.predict_raw(Xk), p[::-1])
    # A position also picks the column of a DataFrame X with named columns.
    Xdf = pd.DataFrame(Xk, columns=list("abcde"))
    np.testing.assert_array_equal(m.predict_raw(Xdf), p[::-1])


def test_from_file_csv_with_index_col(tmp_path, stored):
    p, keys, Xdf = stored
    path = tmp_path / "pred.csv"
    pd.DataFrame(p, index=pd.Index(keys, name="id"), columns=[0, 1, 2]).to_csv(path)
    m = PrecomputedModel.from_file(path, index_col="id")
    assert m.predictions.shape == (150, 3)
    np.testing.assert_array_equal(m.classes_, ["0", "1", "2"])
    shuffled = Xdf.sample(frac=1.0, random_state=1)
    pos = np.array([int(k[1:]) for k in shuffled.index])
    # (a CSV round trip: parsers may differ in the last bit, as pandas 3 did)
    np.testing.assert_allclose(m.predict_raw(shuffled), p[pos], rtol=1e-12)
    np.testing.assert_allclose(
        class_probabilities("csv", m, shuffled, IRIS_CLASSES), p[pos], rtol=1e-12
    )


@pytest.mark.parametrize("index_in_file", ["column", "pandas-index"])
def test_from_file_parquet(tmp_path, stored, index_in_file):
    pytest.importorskip("pyarrow")
    p, keys, Xdf = stored
    path = tmp_path / "pred.parquet"
    df = pd.DataFrame(p, index=pd.Index(keys, name="id"), columns=["0", "1", "2"])
    if index_in_file == "column":
        df.reset_index().to_parquet(path, index=False)
        m = PrecomputedModel.from_file(path, index_col="id")
    else:
        df.to_parquet(path)
        m = PrecomputedModel.from_file(path)
    assert m.predictions.shape == (150, 3)
    X = Xdf.iloc[[5, 0, 149]]
    np.testing.assert_array_equal(m.predict_raw(X), p[[5, 0, 149]])


def test_from_file_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="use .npy, .csv or .parquet"):
        PrecomputedModel.from_file(tmp_path / "pred.txt")


def test_callable_model_validation():
    with pytest.raises(TypeError, match="needs a callable"):
        CallableModel(np.zeros(3))
    with pytest.raises(ValueError, match="output must be one of"):
        CallableModel(len, output="scores")


def test_base_model_is_abstract():
    with pytest.raises(TypeError):
        BaseModel()


# --------------------------------------------------------------- device and dtype


def test_resolve_device_auto():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    dev = torch.device("cpu")
    assert resolve_device(dev) is dev


def test_resolve_device_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(device)


@pytest.mark.parametrize("device", ["gpu", "CPU please", "", None, 3.5])
def test_resolve_device_bad(device):
    with pytest.raises(ValueError, match="device must be"):
        resolve_device(device)


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("float32", torch.float32),
        ("float64", torch.float64),
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (np.float32, torch.float32),
        (np.dtype("float64"), torch.float64),
    ],
)
def test_resolve_dtype(dtype, expected):
    assert resolve_dtype(dtype) == expected


@pytest.mark.parametrize("dtype", ["float16", "int64", torch.int64, None, 3, "double"])
def test_resolve_dtype_bad(dtype):
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype(dtype)


def test_to_tensor_and_back():
    a = np.arange(6.0).reshape(2, 3)
    t = to_tensor(a, torch.device("cpu"), torch.float32)
    assert t.dtype == torch.float32 and t.shape == (2, 3)
    t.requires_grad_(True)
    back = to_numpy(t * 2)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, 2 * a)
    assert to_tensor(t, torch.device("cpu"), torch.float64).dtype == torch.float64


# ------------------------------------------------- checks on what base models give


def test_check_probabilities_tolerance(iris_lr, iris):
    X, _ = iris
    p = iris_lr.predict_proba(X)
    check_probabilities("ok", p)
    check_probabilities("float32", softmax(np.random.default_rng(0).normal(size=(50, 10)), 1)
                        .astype(np.float32))
    check_probabilities("binary-column", p[:, :1])
    check_probabilities("nan-left-to-the-caller", np.array([[np.nan, np.nan], [0.3, 0.7]]))
    with pytest.raises(IncompatibleBaseModelError, match=r"'one' declares.*1 of 150 rows do not"):
        bad = p.copy()
        bad[7] *= 1.01
        check_probabilities("one", bad)
    with pytest.raises(IncompatibleBaseModelError, match=r"'col'.*outside \[0, 1\]"):
        check_probabilities("col", 2 * p[:, :1])


def test_class_order_warning_only_when_another_order_is_far_better(iris_lr, iris):
    X, y = iris
    p = iris_lr.predict_proba(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_class_order("right", p, y, IRIS_CLASSES)
        check_class_order("uniform", np.full((150, 3), 1 / 3), y, IRIS_CLASSES)
        noise = np.random.default_rng(0).dirichlet(np.ones(3), 150)
        check_class_order("noise", noise, y, IRIS_CLASSES)
    with pytest.warns(BaseModelWarning, match=r"'swapped'.*far better as \[0, 2, 1\]"):
        check_class_order("swapped", p[:, [0, 2, 1]], y, IRIS_CLASSES)


@pytest.mark.parametrize(
    "raised, caught",
    [
        (KeyError("k"), BaseModelError),
        (RuntimeError("r"), BaseModelError),
        (ValueError("v"), BaseModelValueError),
        (TypeError("t"), BaseModelTypeError),
        (NotFittedError("n"), UnfittedBaseModelError),
    ],
)
def test_calling_names_the_model_and_keeps_the_kind(raised, caught):
    match = rf"base model 'm' failed in predict: {type(raised).__name__}"
    with pytest.raises(caught, match=match) as info:
        with calling("m", "predict"):
            raise raised
    assert info.value.__cause__ is raised
    if isinstance(raised, (ValueError, TypeError)):  # still one: callers may catch it so
        assert isinstance(info.value, type(raised))


def test_calling_leaves_our_named_errors_alone():
    err = IncompatibleBaseModelError("base model 'm' returns 3 columns")
    with pytest.raises(IncompatibleBaseModelError) as info:
        with calling("m", "predict"):
            raise err
    assert info.value is err


def test_frozen_estimator_read_through_without_copying_its_tags(monkeypatch):
    # A FrozenEstimator's tags are a deep copy of its model's; its task and
    # whether it is fitted are read from the model, without that copy.
    X, y = load_iris(return_X_y=True)
    fitted = FrozenEstimator(LogisticRegression(max_iter=500).fit(X, y))
    unfitted = FrozenEstimator(LogisticRegression())
    regressor = FrozenEstimator(Ridge().fit(X, y))

    def copy_forbidden(self):
        raise AssertionError("FrozenEstimator's tags were copied")

    monkeypatch.setattr(FrozenEstimator, "__sklearn_tags__", copy_forbidden)
    assert SklearnModel(fitted).task == "classification"
    assert SklearnModel(regressor).task == "regression"
    assert is_fitted_estimator(fitted) and not is_fitted_estimator(unfitted)
    with pytest.raises(UnfittedBaseModelError, match="not fitted"):
        SklearnModel(unfitted).predict_raw(X)
    monkeypatch.undo()
    # The same answers as scikit-learn's own, through the copy.
    assert is_classifier(fitted) and is_regressor(regressor)
    assert SklearnModel(fitted).predict_raw(X[:3]).shape == (3, 3)
